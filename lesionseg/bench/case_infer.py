"""Case `infer`: the batch-inference job against a naive per-image loop and the bare
batched forward; its efficiency against the ideal on the usable cores."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from lesionseg.bench.datasets import bench_config, full_size_source, megapixels, source_pairs
from lesionseg.bench.measure import interleaved, rounded, stats, timed
from lesionseg.bench.plan import BenchError, BenchPlan
from lesionseg.checkpoint import build_model_from_checkpoint, save_weights
from lesionseg.data.images import load_image
from lesionseg.data.sources import collect
from lesionseg.data.transforms import eval_transform, stack_images, to_float_images
from lesionseg.device import autocast, precision_dtype
from lesionseg.infer.decode import decode_item
from lesionseg.infer.outputs import THUMB_SIDE, OutputSpec
from lesionseg.infer.predict import load_predictor
from lesionseg.inference import applied_postprocess, finish_item, run_inference
from lesionseg.metrics import confusion_counts
from lesionseg.threadplan import usable_cores
from lesionseg.train.build import build_model

log = logging.getLogger(__name__)

def bench_checkpoint(workdir: Path, image_size: int) -> Path:
    """A seeded random-weight checkpoint (speed does not depend on the weights), written
    afresh each run so that it always has this version's architecture."""
    path = workdir / f"bench-model-{image_size}.pt"
    cfg = bench_config([f"data.image_size={image_size}"])
    torch.manual_seed(0)
    save_weights(path, build_model(cfg).state_dict(), cfg, note="random weights (bench)")
    return path


def naive_pass(model: Any, pairs: list[tuple[Path, Path]], out: Path, size: int,
               device: torch.device | str = "cpu", precision: str = "no") -> None:
    """The baseline a user writes first: per image, full PIL decode, resize to size², one
    forward on `device` (autocast per `precision`), upsample to the original size there,
    threshold, copy back, save the PNG, score against the truth. One image at a time."""
    device = torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    for image_path, mask_path in pairs:
        with Image.open(image_path) as raw:
            img = ImageOps.exif_transpose(raw).convert("RGB")
        w, h = img.size
        x = torch.from_numpy(np.array(img.resize((size, size), Image.BILINEAR)))
        x = x.permute(2, 0, 1).unsqueeze(0).to(device).float().div(255)
        with torch.inference_mode(), autocast(device, precision_dtype(precision)):
            prob = torch.sigmoid(model(x).float())
            full = F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            pred = (full > 0.5).cpu().numpy()
        mask = Image.fromarray((pred * 255).astype(np.uint8), mode="L")
        mask.save(out / f"{image_path.stem}_Segmentation.png")
        with Image.open(mask_path) as t:
            truth = torch.from_numpy(np.asarray(t) > 128)
        confusion_counts(torch.from_numpy(pred), truth)


def infer_stage_costs(source: Path, cfg: Any, predictor: Any, image_size: int,
                      out: Path) -> dict[str, Any]:
    """Milliseconds per image on one thread of the job's two CPU stages, with its defaults:
    `decode_item` (a decode worker: read, reduced-scale decode, resize, truth) and
    `finish_item` (a finishing thread: upsample, threshold, mask PNG, scores, thumbnail)."""
    icfg = cfg.infer
    post, _ = applied_postprocess(icfg, {})  # the bench checkpoint holds no choice: 0.5, none
    spec = OutputSpec(out, post, icfg.save_probs, icfg.save_overlays, icfg.report)
    preview = icfg.overlay_max_side if icfg.save_overlays else (THUMB_SIDE if icfg.report else 0)
    items = collect([source], splits=tuple(cfg.infer.splits)).items
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    decode_s = finish_s = 0.0
    try:
        for item in items:
            t0 = time.perf_counter()
            sample = decode_item(item, image_size, preview)
            decode_s += time.perf_counter() - t0
            prob = predictor(sample.pop("image")[None])[0]
            t0 = time.perf_counter()
            finish_item(item, sample, prob, spec)
            finish_s += time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(out, ignore_errors=True)
    return {"decode_item_ms": rounded(1000 * decode_s / len(items)),
            "finish_item_ms": rounded(1000 * finish_s / len(items)), "threads": 1}


def bench_infer(plan: BenchPlan, workdir: Path) -> dict[str, Any]:
    """The batch job (run_inference, job defaults) vs the naive loop vs the pure forward."""
    source = full_size_source(workdir, plan)
    pairs = source_pairs(source)
    ckpt = bench_checkpoint(workdir, plan.image_size)
    cfg = bench_config([f"infer.batch_size={plan.batch_size}",
                   "infer.tta=false"])  # one forward per image, like the naive loop
    naive_model, _, _ = build_model_from_checkpoint(ckpt)
    predictor, _, _ = load_predictor(ckpt, cfg.infer, torch.device("cpu"))
    # The job's precision is auto (bf16 on a CPU with bf16 hardware): fp32 side by side too.
    fp32 = (None if predictor.precision == "fp32" else
            load_predictor(ckpt, dataclasses.replace(cfg.infer, mixed_precision="no"),
                           torch.device("cpu"))[0])
    ort_predictor = onnxruntime_predictor(ckpt, cfg.infer)
    log.info("infer: decoding %d images for the pure-forward baseline", len(pairs))
    images8 = stack_images([
        eval_transform(load_image(p.read_bytes(), str(p))[0], None, plan.image_size)[0]
        for p, _ in pairs])
    tensors = to_float_images(images8)
    runs_dir = workdir / "infer-runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    counter = {"n": 0}
    job: dict[str, Any] = {"loop_s": [], "wall_s": [], "forward_s": [], "phases": [],
                           "threads": None}

    def pipeline() -> float:
        counter["n"] += 1
        out = runs_dir / f"job-{counter['n']}"
        t0 = time.perf_counter()
        summary = run_inference(ckpt, [source], out, cfg)
        wall = time.perf_counter() - t0
        if summary is None or summary["scored"] != len(pairs):
            raise BenchError(f"inference run in {out} scored "
                             f"{summary and summary['scored']} of {len(pairs)} images")
        process = summary["throughput"]["processes"][0]
        job["loop_s"].append(process["seconds"])
        job["wall_s"].append(wall)
        job["forward_s"].append(process["forward_seconds"])
        job["threads"] = process.get("threads")
        job["phases"].append((process.get("phases") or {}).get("mode"))
        shutil.rmtree(out, ignore_errors=True)
        return process["seconds"]

    def naive() -> float:
        out = runs_dir / "naive"
        seconds = timed(lambda: naive_pass(naive_model, pairs, out, plan.image_size))
        shutil.rmtree(out, ignore_errors=True)
        return seconds

    def forward() -> float:
        return timed(lambda: [predictor(tensors[i:i + plan.batch_size])
                              for i in range(0, len(tensors), plan.batch_size)])

    def forward_ort() -> float:  # the same batches, uint8 as the job feeds them
        return timed(lambda: [ort_predictor(images8[i:i + plan.batch_size])
                              for i in range(0, len(images8), plan.batch_size)])

    def forward_fp32() -> float:
        return timed(lambda: [fp32(tensors[i:i + plan.batch_size])
                              for i in range(0, len(tensors), plan.batch_size)])

    variants = {"job": pipeline, "naive": naive, "forward": forward}
    if fp32 is not None:
        variants["forward_fp32"] = forward_fp32
    if ort_predictor is not None:
        variants["forward_ort"] = forward_ort
    runs = interleaved(variants, plan.warmup, plan.repeats)
    for key in ("loop_s", "wall_s", "forward_s", "phases"):  # the job's: timed rounds only
        job[key] = job[key][plan.warmup:]
    n = len(pairs)
    ort_s = stats(runs["forward_ort"]) if ort_predictor is not None else None
    job_s, naive_s, fwd_s = (stats(runs[k]) for k in ("job", "naive", "forward"))
    stages = infer_stage_costs(source, cfg, predictor, plan.image_size, runs_dir / "stages")
    rate = {k: rounded(n / s["median"]) for k, s in (("job", job_s), ("naive", naive_s),
                                                 ("forward", fwd_s))}
    mps = megapixels([p for p, _ in pairs])
    ideal = ideal_infer_seconds(fwd_s["median"], stages, n, usable_cores())
    wall_s = stats(job["wall_s"])
    wall_over_loop = statistics.median(w / loop for w, loop in zip(job["wall_s"], job["loop_s"],
                                                                   strict=True))
    return {
        "threads": torch.get_num_threads(), "image_size": plan.image_size,
        "batch_size": plan.batch_size, "job_threads": job["threads"],
        "job_phases": job["phases"], "images": n,
        "source_megapixels_mean": rounded(statistics.fmean(mps)),
        "source_megapixels_max": rounded(max(mps)),
        "job_loop_s": job_s, "job_wall_s": wall_s,
        "job_forward_inside_s": stats(job["forward_s"]), "naive_s": naive_s,
        "forward_s": fwd_s, "stages_ms_per_image": stages, "cores": usable_cores(),
        "ideal_s": rounded(ideal),
        "job_images_per_s": rate["job"], "job_wall_images_per_s": rounded(
            n / wall_s["median"]),
        "naive_images_per_s": rate["naive"], "forward_images_per_s": rate["forward"],
        "precision": predictor.precision,
        "forward_fp32_s": stats(runs["forward_fp32"]) if fp32 is not None else None,
        "forward_onnxruntime_s": ort_s,
        "forward_onnxruntime_images_per_s": rounded(n / ort_s["median"]) if ort_s else None,
        "note": "job = run_inference with the job's defaults (report on); loop time excludes "
                "model load, input listing and the merge, which the wall time includes; "
                "wall over loop is the median of each round's ratio",
        "ratios": {"infer_speedup_vs_naive": rounded(naive_s["median"] / job_s["median"]),
                   "infer_over_pure_forward": rounded(job_s["median"] / fwd_s["median"]),
                   "infer_efficiency": rounded(ideal / job_s["median"]),
                   "infer_wall_over_loop": rounded(wall_over_loop)},
    }


def ideal_infer_seconds(forward_s: float, stages: dict[str, Any], images: int,
                        cores: int) -> float:
    """The best any pipeline could do on these cores with the job's own work: the bare batched
    forward, plus each image's CPU stages (decode + finish, measured on one thread) spread over
    every core."""
    per_image_s = (stages["decode_item_ms"] + stages["finish_item_ms"]) / 1000
    return forward_s + images * per_image_s / max(1, cores)


def onnxruntime_predictor(ckpt: Path, icfg: Any) -> Any:
    """The job's onnxruntime predictor (an on-the-fly ONNX export, CPU provider, the same
    threads as torch); None where onnxruntime is not installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        log.info("infer: onnxruntime not installed; no onnxruntime forward row")
        return None
    return load_predictor(ckpt, dataclasses.replace(icfg, backend="onnxruntime"),
                          torch.device("cpu"))[0]
