"""Case `train`: the model step (fp32, bf16, channels_last, frozen encoder) against smp's
U-Net, the real loop against the pure step, and the equal-time Dice race."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from lesionseg.bench.case_data import shard_loader
from lesionseg.bench.datasets import bench_config, full_size_source, packed, race_source
from lesionseg.bench.measure import interleaved, rounded, stats, timed
from lesionseg.bench.plan import MACS_SIDE, RACE_VAL_FRACTION, BenchError, BenchPlan
from lesionseg.data.transforms import to_float_images
from lesionseg.losses import SegmentationLoss
from lesionseg.peers import build_peer, peer_available
from lesionseg.train.batches import fetch_batches
from lesionseg.train.build import build_model, build_optimizer, make_accelerator
from lesionseg.train.data import plan_data
from lesionseg.train.evaluate import summarize_results, validation_counts
from lesionseg.train.loader import Loader
from lesionseg.train.step import train_step
from lesionseg.train.streams import ValStream

log = logging.getLogger(__name__)

def model_cost(model: Any, size: int = MACS_SIDE) -> dict[str, Any]:
    """Parameters (all, trainable) and multiply-accumulates of one size×size forward."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.rand(1, 3, size, size))
    model.train(was_training)
    return {"params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            f"gmacs_{size}": rounded(counter.get_total_flops() / 2e9)}


@dataclass
class StepVariant:
    """One model/precision/layout of the pure step benchmark."""

    model: Any
    optimizer: Any
    channels_last: bool
    amp: Any  # torch dtype for autocast, or None


def direct_step(v: StepVariant, loss_fn: Any, x: Any, y: Any, grad_clip: float) -> float:
    """One plain-PyTorch optimizer step (autocast forward, fp32 loss, backward, clip, AdamW),
    the same sequence as lesionseg.train.step.train_step on one process; returns the loss."""
    x = to_float_images(x)
    if v.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=v.amp or torch.bfloat16, enabled=v.amp is not None):
        logits = v.model(x)
    loss, _ = loss_fn(logits, y)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(v.model.parameters(), grad_clip)
    v.optimizer.step()
    v.optimizer.zero_grad(set_to_none=True)
    return loss.item()


def step_variants(plan: BenchPlan, with_peer: bool) -> dict[str, StepVariant]:
    """Ours in fp32/bf16, channels_last on/off, frozen encoder; the peer in both layouts."""
    specs = {"ours fp32 channels_last": ([], torch.float32),
             "ours fp32 contiguous": (["model.channels_last=false"], torch.float32),
             "ours bf16 channels_last": ([], torch.bfloat16),
             "ours fp32 channels_last frozen": (["model.freeze_encoder=true"], torch.float32)}
    variants = {}
    for name, (overrides, dtype) in specs.items():
        torch.manual_seed(0)
        cfg = bench_config(overrides)
        model = build_model(cfg).train()
        variants[name] = StepVariant(model, build_optimizer(model, cfg), cfg.model.channels_last,
                                     None if dtype == torch.float32 else dtype)
    if with_peer:
        for layout in ("contiguous", "channels_last"):
            torch.manual_seed(0)
            model = build_peer().train()
            cl = layout == "channels_last"
            if cl:
                model = model.to(memory_format=torch.channels_last)
            variants[f"smp fp32 {layout}"] = StepVariant(
                model, build_optimizer(model, bench_config([])), cl, None)
        torch.manual_seed(0)
        model = build_peer().train().to(memory_format=torch.channels_last)
        variants["smp bf16 channels_last"] = StepVariant(
            model, build_optimizer(model, bench_config([])), True, torch.bfloat16)
    return variants


def bench_steps(plan: BenchPlan, batch: dict[str, Any], with_peer: bool) -> dict[str, Any]:
    """Pure step time of every variant on the same pre-made batch, interleaved."""
    loss_fn = SegmentationLoss()
    x, y = batch["image"], batch["mask"].float()
    grad_clip = bench_config([]).optim.grad_clip
    variants = step_variants(plan, with_peer)
    runs = interleaved({name: (lambda v=v: timed(lambda: direct_step(v, loss_fn, x, y, grad_clip)))
                        for name, v in variants.items()}, plan.warmup, plan.repeats)
    return {name: stats(values) for name, values in runs.items()}


def bench_loop(plan: BenchPlan, shards: Path, workdir: Path) -> dict[str, Any]:
    """The real loop (shard pipeline with DataLoader workers → fetch_batches → train_step)
    against train_step on a pre-made batch, in blocks: pure, loop, pure. The loop's first
    workers × prefetch + 2 steps are not timed, so no timed loop step is served from a buffer
    that filled up while a pure block ran."""
    cfg = bench_config([f"data.image_size={plan.image_size}", f"data.batch_size={plan.batch_size}",
                   f"data.num_workers={plan.train_workers}",
                   f"train.output_dir={workdir / 'run-loop'}"])
    accelerator = make_accelerator(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    loss_fn = SegmentationLoss(cfg.loss.bce_weight, cfg.loss.dice_weight, cfg.loss.iou_weight,
                               smooth=cfg.loss.smooth, per_image=cfg.loss.per_image)
    settle = plan.train_workers * 2 + 2  # prefetch_factor 2 per worker, plus two
    pure: list[float] = []
    loop: list[float] = []
    with shard_loader(shards, cfg, workers=plan.train_workers) as loader:
        batches = iter(loader)
        first, error = fetch_batches(batches, 1)
        if error:
            raise BenchError(f"training pipeline failed: {error}")
        premade = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                   for k, v in first[0].items()}

        def pure_step() -> None:
            train_step(accelerator, model, optimizer, loss_fn, [premade], cfg)

        def loop_step() -> None:
            fetched, err = fetch_batches(batches, cfg.optim.grad_accum_steps)
            if err:
                raise BenchError(f"training pipeline failed: {err}")
            train_step(accelerator, model, optimizer, loss_fn, fetched, cfg)

        pure_step()  # warm-up
        blocks = [(pure_step, plan.loop_steps, pure), (loop_step, settle, None),
                  (loop_step, plan.loop_steps, loop), (pure_step, plan.loop_steps, pure)]
        with tqdm(total=sum(n for _, n, _ in blocks), desc="loop vs pure", unit="step",
                  leave=False) as bar:
            for fn, n, sink in blocks:
                for _ in range(n):
                    seconds = timed(fn)
                    if sink is not None:
                        sink.append(seconds)
                    bar.update(1)
    pure_s, loop_s = stats(pure), stats(loop)
    return {"num_workers": plan.train_workers, "settle_steps": settle,
            "pure_step_s": pure_s, "loop_step_s": loop_s,
            "ratio_rule": "mean loop step ÷ mean pure step (steady state, throughput)",
            "ratio": rounded(loop_s["mean"] / pure_s["mean"])}


def race(racers: dict[str, dict[str, Any]], loss_fn: Any, plan: BenchPlan,
         grad_clip: float) -> None:
    """Train every racer for plan.race_budget_s seconds (its own data fetching included),
    alternating in slices of plan.race_slice_s so that machine noise hits all alike."""
    with tqdm(total=round(plan.race_budget_s * len(racers)), desc="race", unit="s",
              leave=False) as bar:
        while any(r["seconds"] < plan.race_budget_s for r in racers.values()):
            for r in racers.values():
                slice_end = min(plan.race_budget_s, r["seconds"] + plan.race_slice_s)
                while r["seconds"] < slice_end:
                    t0 = time.perf_counter()
                    batch = next(r["batches"])
                    direct_step(r["variant"], loss_fn, batch["image"], batch["mask"].float(),
                                grad_clip)
                    r["scheduler"].step()
                    dt = time.perf_counter() - t0
                    bar.update(round(r["seconds"] + dt) - round(r["seconds"]))
                    r["seconds"] += dt
                    r["steps"] += 1


def bench_race(plan: BenchPlan, workdir: Path, layouts: dict[str, bool]) -> dict[str, Any]:
    """Ours vs the peer trained for the same wall-clock seconds on the same demo data (same
    pipeline, loss, AdamW and learning rate, alternating in slices), then both validated.
    `layouts` says per model whether it runs channels_last (its faster fp32 layout)."""
    source = race_source(workdir, plan)
    shards, _ = packed(source, workdir / "shards-race", max_side=2 * plan.race_size,
                       val_fraction=RACE_VAL_FRACTION, shard_max_samples=32)
    cfg = bench_config([f"data.image_size={plan.race_size}", f"data.batch_size={plan.batch_size}",
                   f"optim.lr={plan.race_lr}", "optim.encoder_lr_mult=1.0",
                   f"model.channels_last={str(layouts['ours']).lower()}"])
    data = plan_data(str(shards))

    def peer() -> Any:
        model = build_peer()
        return model.to(memory_format=torch.channels_last) if layouts.get("smp") else model

    builders = {"ours": (lambda: build_model(cfg), layouts["ours"])}
    if "smp" in layouts:
        builders["smp"] = (peer, layouts["smp"])
    racers: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        for name, (build, channels_last) in builders.items():
            torch.manual_seed(0)
            model = build().train()
            optimizer = build_optimizer(model, cfg)
            loader = stack.enter_context(shard_loader(shards, cfg, workers=0))
            racers[name] = {
                "variant": StepVariant(model, optimizer, channels_last, None),
                "scheduler": torch.optim.lr_scheduler.LambdaLR(
                    optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.optim.warmup_steps))),
                "batches": iter(loader), "seconds": 0.0, "steps": 0}
        race(racers, SegmentationLoss(), plan, cfg.optim.grad_clip)
    out: dict[str, Any] = {"image_size": plan.race_size, "budget_s": plan.race_budget_s,
                           "batch_size": plan.batch_size, "lr": plan.race_lr,
                           "train_images": data.train_count, "val_images": data.val_count,
                           "source_sides": list(plan.race_sides),
                           "channels_last": layouts,
                           "note": "same shards, pipeline (in-process), loss, AdamW, constant "
                                   "lr after warm-up; models alternate in slices"}
    device = torch.device("cpu")
    for name, r in racers.items():
        v = r["variant"]
        with Loader(ValStream(data.val_urls, cfg, 0, 1), cfg, device) as loader:
            results, _, _ = validation_counts(v.model, loader, device, "no", 0,
                                              channels_last=v.channels_last)
        metrics = summarize_results(results)
        out[name] = {"steps": r["steps"], "train_seconds": rounded(r["seconds"]),
                     "images_seen": r["steps"] * plan.batch_size,
                     "val_dice": rounded(metrics["dice"]),
                     "val_jaccard": rounded(metrics["jaccard"])}
    return out


def bench_train(plan: BenchPlan, workdir: Path) -> dict[str, Any]:
    """Pure step variants, ours vs smp, the real loop vs the pure step, and the Dice race."""
    with_peer = plan.peer and peer_available()
    if plan.peer and not with_peer:
        log.warning("segmentation-models-pytorch is not installed (pip install -e '.[bench]'): "
                    "train_speedup_vs_smp will be null")
    source = full_size_source(workdir, plan)
    shards, _ = packed(source, workdir / "shards-full")
    cfg = bench_config([f"data.image_size={plan.image_size}", f"data.batch_size={plan.batch_size}"])
    with shard_loader(shards, cfg, workers=0) as loader:
        batch = next(iter(loader))

    cost = {"ours": model_cost(build_model(cfg)),
            "ours_frozen_encoder": model_cost(
                build_model(bench_config(["model.freeze_encoder=true"])))}
    if with_peer:
        cost["smp"] = model_cost(build_peer())
    log.info("train: pure step variants (%d rounds after %d warm-up)", plan.repeats, plan.warmup)
    steps = bench_steps(plan, batch, with_peer)
    log.info("train: real loop vs pure step")
    loop = bench_loop(plan, shards, workdir)
    ours = min(("ours fp32 channels_last", "ours fp32 contiguous"),
               key=lambda k: steps[k]["median"])
    layouts = {"ours": ours.endswith("channels_last")}
    speedup = None
    other: dict[str, Any] = {}
    if with_peer:
        peer = min(("smp fp32 contiguous", "smp fp32 channels_last"),
                   key=lambda k: steps[k]["median"])
        layouts["smp"] = peer.endswith("channels_last")
        speedup = rounded(steps[peer]["median"] / steps[ours]["median"])
        other = {  # the same ratio under other rules, for the record
            "speedup_vs_smp_default_nchw": rounded(steps["smp fp32 contiguous"]["median"]
                                              / steps[ours]["median"]),
            "speedup_vs_smp_bf16": rounded(steps["smp bf16 channels_last"]["median"]
                                      / steps["ours bf16 channels_last"]["median"])}
    log.info("train: equal-time race, %.0f s per model at %d²", plan.race_budget_s,
             plan.race_size)
    race_result = bench_race(plan, workdir, layouts)
    dice_ok = None
    if "smp" in race_result:
        dice_ok = race_result["ours"]["val_dice"] >= race_result["smp"]["val_dice"]
    return {
        "threads": torch.get_num_threads(), "image_size": plan.image_size,
        "batch_size": plan.batch_size, "model": cost, "step_s": steps,
        "speedup_rule": "median step of the peer's faster fp32 layout ÷ ours' faster fp32 "
                        "layout, both trainable", **other,
        "loop": loop, "race": race_result, "race_dice_ours_ge_smp": dice_ok,
        "ratios": {"train_speedup_vs_smp": speedup, "train_loop_over_pure_step": loop["ratio"]},
    }
