"""Part `inference`: the batch-inference job against a naive per-image loop and the bare
batched forward of its own predictor, at each precision."""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lesionseg.bench.case_infer import bench_checkpoint, naive_pass
from lesionseg.bench.datasets import bench_config, full_size_source, source_pairs
from lesionseg.bench.measure import rounded
from lesionseg.bench.plan import plan_for as bench_plan_for
from lesionseg.checkpoint import build_model_from_checkpoint
from lesionseg.data.images import load_image
from lesionseg.data.transforms import eval_transform, stack_images
from lesionseg.gpucheck.common import device_of, peak_mb, reset_peak, rounded_median, sync
from lesionseg.gpucheck.plan import PRECISION_NAMES, CheckPlan
from lesionseg.inference import load_predictor, run_inference

log = logging.getLogger("lesionseg.gpucheck")


@dataclass
class InferInputs:
    """What every inference variant reads, made once: the full-size source folder and its
    (image, mask) pairs, the checkpoint, the images pre-decoded to uint8 S×S for the bare
    forward, and the checkpoint's model as loaded (fp32, not fused) for the naive loop."""

    source: Path
    pairs: list[tuple[Path, Path]]
    checkpoint: Path
    images8: Any
    naive_model: Any
    runs_dir: Path


def infer_inputs(plan: CheckPlan, workdir: Path) -> InferInputs:
    """The bench's full-size synthetic source and random-weight checkpoint, at this plan's
    sizes (cached under workdir like the bench's)."""

    bplan = bench_plan_for(True, images=plan.infer_images, min_side=plan.infer_sides[0],
                           max_side=plan.infer_sides[1], image_size=plan.image_size,
                           batch_size=plan.batch_size)
    source = full_size_source(workdir, bplan)
    pairs = source_pairs(source)
    ckpt = bench_checkpoint(workdir, plan.image_size)
    images8 = stack_images([
        eval_transform(load_image(p.read_bytes(), str(p))[0], None, plan.image_size)[0]
        for p, _ in pairs])
    naive_model = build_model_from_checkpoint(ckpt)[0].to(device_of(plan)).eval()
    return InferInputs(source, pairs, ckpt, images8, naive_model, workdir / "infer-runs")


def time_job(inputs: InferInputs, cfg: Any) -> dict[str, Any]:
    """One run of the batch job (`run_inference`): its loop and forward seconds (from the
    summary), wall seconds (start to summary) and thread plan."""

    out = inputs.runs_dir / "job"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_inference(inputs.checkpoint, [inputs.source], out, cfg)
    wall = time.perf_counter() - t0
    n = len(inputs.pairs)
    if summary is None or summary["scored"] != n:
        raise RuntimeError(f"inference run in {out} scored {summary and summary['scored']} "
                           f"of {n} images")
    process = summary["throughput"]["processes"][0]
    return {"loop_s": process["seconds"], "wall_s": wall,
            "forward_s": process["forward_seconds"], "threads": process.get("threads")}


def time_naive(inputs: InferInputs, plan: CheckPlan, precision: str) -> float:
    """Seconds of one naive pass (the CPU bench's, on this device) over every image."""

    device = device_of(plan)
    t0 = time.perf_counter()
    naive_pass(inputs.naive_model, inputs.pairs, inputs.runs_dir / "naive", plan.image_size,
               device, precision)
    sync(device)
    return time.perf_counter() - t0


def time_forward(predictor: Any, images8: Any, batch_size: int) -> float:
    """Seconds of the job's predictor over the pre-decoded batches (each call returns CPU
    probabilities, so it is synchronized)."""
    t0 = time.perf_counter()
    for i in range(0, len(images8), batch_size):
        predictor(images8[i:i + batch_size])
    return time.perf_counter() - t0


def infer_precision(plan: CheckPlan, inputs: InferInputs, precision: str) -> dict[str, Any]:
    """Job, naive and forward at one infer.mixed_precision, in rounds (job, naive, forward)
    after one warm-up round (cuDNN, allocator, worker start-up); medians of the rounds."""

    device = device_of(plan)
    cfg = bench_config([f"infer.batch_size={plan.batch_size}", "infer.tta=false",
                   f"infer.device={device}", f"infer.mixed_precision={precision}"])
    predictor = load_predictor(inputs.checkpoint, cfg.infer, device)[0]
    jobs, naive_s, forward_s = [], [], []
    for round_ in range(1 + plan.infer_repeats):
        log.info("inference %s: round %d of %d", PRECISION_NAMES[precision], round_,
                 plan.infer_repeats)
        job = time_job(inputs, cfg)
        naive = time_naive(inputs, plan, precision)
        forward = time_forward(predictor, inputs.images8, plan.batch_size)
        if round_ > 0:
            jobs.append(job)
            naive_s.append(naive)
            forward_s.append(forward)
    n = len(inputs.pairs)
    loop, naive, forward = (statistics.median(v) for v in
                            ([j["loop_s"] for j in jobs], naive_s, forward_s))
    return {"setting": f"infer.mixed_precision={precision}", "job_loop_s": rounded(loop),
            "job_wall_s": rounded_median([j["wall_s"] for j in jobs]),
            "job_forward_inside_s": rounded_median([j["forward_s"] for j in jobs]),
            "naive_s": rounded(naive), "forward_s": rounded(forward),
            "job_images_per_s": rounded(n / loop), "naive_images_per_s": rounded(n / naive),
            "forward_images_per_s": rounded(n / forward),
            "infer_speedup_vs_naive": rounded(naive / loop),
            "infer_over_pure_forward": rounded(loop / forward), "threads": jobs[-1]["threads"]}


def check_inference(plan: CheckPlan, workdir: Path, deadline: float) -> dict[str, Any]:
    """The batch job (run_inference, TTA off, report on) vs the naive loop vs the job's own
    predictor on pre-decoded batches, at each precision; the first one is the headline."""
    device = device_of(plan)
    inputs = infer_inputs(plan, workdir)
    reset_peak(device)
    results = {PRECISION_NAMES[p]: infer_precision(plan, inputs, p) for p in plan.precisions}
    shutil.rmtree(inputs.runs_dir, ignore_errors=True)
    headline = results[PRECISION_NAMES[plan.precisions[0]]]
    return {"images": len(inputs.pairs), "sides": list(plan.infer_sides),
            "image_size": plan.image_size, "batch_size": plan.batch_size,
            "repeats": plan.infer_repeats, "tta": False, "precisions": results,
            "headline_precision": PRECISION_NAMES[plan.precisions[0]],
            "infer_speedup_vs_naive": headline["infer_speedup_vs_naive"],
            "infer_over_pure_forward": headline["infer_over_pure_forward"],
            "threads": headline["threads"], "peak_memory_mb": peak_mb(device),
            "note": "job loop time from its summary (model load, listing and merge are in the "
                    "wall time); naive: fp32 weights, the same autocast; forward: the job's "
                    "predictor (BatchNorm folded, channels_last) on pre-decoded uint8 batches"}
