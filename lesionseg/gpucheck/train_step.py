"""Parts `train_step` and `compile`: the real model, loss and AdamW step in each precision
and memory layout, and under torch.compile; median step time, images/s, peak memory."""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lesionseg.bench.datasets import bench_config
from lesionseg.bench.measure import rounded
from lesionseg.device import autocast, precision_dtype
from lesionseg.gpucheck.common import (
    device_of,
    peak_mb,
    reset_peak,
    rounded_median,
    sync,
    timed_calls,
)
from lesionseg.gpucheck.plan import PRECISION_NAMES, CheckPlan
from lesionseg.losses import SegmentationLoss
from lesionseg.train.build import build_model, build_optimizer

log = logging.getLogger("lesionseg.gpucheck")


@dataclass
class StepVariant:
    """The real model, loss and optimizer of one precision/layout, with its GradScaler
    (enabled for fp16 only: bf16 has fp32's range)."""

    model: Any
    optimizer: Any
    scaler: Any
    precision: str  # train.mixed_precision name: no, fp16, bf16
    channels_last: bool
    grad_clip: float  # optim.grad_clip (0 = off)


def step_variant(plan: CheckPlan, precision: str, channels_last: bool,
                 compile_model: bool = False) -> StepVariant:
    """MobileNetEncoderDecoder (random encoder) and AdamW as the training job builds them,
    cuDNN autotuning on as in the training job (train.deterministic=false)."""
    import torch


    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    cfg = bench_config([f"data.image_size={plan.image_size}",
                   f"model.channels_last={str(channels_last).lower()}"])
    device = device_of(plan)
    model = build_model(cfg).to(device).train()
    optimizer = build_optimizer(model, cfg)
    if compile_model:
        model = torch.compile(model)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return StepVariant(model, optimizer, scaler, precision, channels_last, cfg.optim.grad_clip)


def step_batch(plan: CheckPlan, channels_last: bool) -> tuple[Any, Any]:
    """A seeded random batch on the device: float images in [0, 1], 0/1 masks."""
    import torch

    g = torch.Generator().manual_seed(0)
    n, s = plan.batch_size, plan.image_size
    x = torch.rand(n, 3, s, s, generator=g)
    y = (torch.rand(n, 1, s, s, generator=g) > 0.7).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    device = device_of(plan)
    return x.to(device), y.to(device)


def train_step(v: StepVariant, loss_fn: Any, x: Any, y: Any) -> Any:
    """One optimizer step: autocast forward, fp32 loss, scaled backward, unscale, clip, AdamW
    (skipped by the scaler on inf/NaN gradients in fp16). Returns the loss (on the device)."""
    import torch


    with autocast(x.device, precision_dtype(v.precision)):
        logits = v.model(x)
    loss, _ = loss_fn(logits, y)
    v.scaler.scale(loss).backward()
    if v.grad_clip:
        v.scaler.unscale_(v.optimizer)
        torch.nn.utils.clip_grad_norm_(v.model.parameters(), v.grad_clip)
    v.scaler.step(v.optimizer)
    v.scaler.update()
    v.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def time_variant(plan: CheckPlan, v: StepVariant) -> dict[str, Any]:
    """Median step time, images/s, peak memory and the last loss of one variant."""

    device = device_of(plan)
    loss_fn = SegmentationLoss()
    x, y = step_batch(plan, v.channels_last)
    last: dict[str, Any] = {}

    def step() -> None:
        last["loss"] = train_step(v, loss_fn, x, y)

    reset_peak(device)
    times = timed_calls(step, plan.warmup, plan.steps, device)
    median = statistics.median(times)
    loss = float(last["loss"])
    return {"step_s": rounded_median(times), "step_s_min": rounded(min(times)),
            "step_s_max": rounded(max(times)), "images_per_s": rounded(plan.batch_size / median),
            "peak_memory_mb": peak_mb(device), "last_loss": rounded(loss),
            "loss_finite": math.isfinite(loss)}


def check_train_step(plan: CheckPlan, workdir: Path, deadline: float) -> dict[str, Any]:
    """Every precision × layout of the eager training step, one after another."""
    import torch

    variants: dict[str, Any] = {}
    for precision in ("no", *(p for p in plan.precisions if p != "no")):
        for channels_last in (False, True):
            layout = "channels_last" if channels_last else "contiguous"
            name = f"{PRECISION_NAMES[precision]} {layout}"
            log.info("train step: %s", name)
            variants[name] = time_variant(plan, step_variant(plan, precision, channels_last))
            if plan.device == "cuda":
                torch.cuda.empty_cache()
    fastest = min(variants, key=lambda k: variants[k]["step_s"])
    base = variants["fp32 contiguous"]["step_s"]
    return {"image_size": plan.image_size, "batch_size": plan.batch_size,
            "warmup": plan.warmup, "steps": plan.steps, "variants": variants,
            "fastest": fastest,
            "speedup_fastest_vs_fp32_contiguous": rounded(base / variants[fastest]["step_s"])}


def check_compile(plan: CheckPlan, workdir: Path, deadline: float) -> dict[str, Any]:
    """torch.compile of the model (default mode), bf16, channels_last: the first step's
    seconds (compiling forward and backward), then the step time as in train_step."""

    device = device_of(plan)
    v = step_variant(plan, "bf16", True, compile_model=True)
    x, y = step_batch(plan, True)
    t0 = time.perf_counter()
    train_step(v, SegmentationLoss(), x, y)
    sync(device)
    compile_s = time.perf_counter() - t0
    log.info("compile: first step %.1f s", compile_s)
    return {"variant": "bf16 channels_last, torch.compile(model)",
            "first_step_s": rounded(compile_s), **time_variant(plan, v)}
