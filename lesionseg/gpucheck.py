"""GPU checks in one short run: `python jobs/gpucheck.py [--out gpu-check.json] [--quick]
[--device cuda|cpu]`.

What a host that is lent a GPU should confirm, every figure measured on the real code paths:
the environment; the training step (the real model, loss and AdamW) in fp32, fp16 + GradScaler
and bf16, contiguous and channels_last, and under torch.compile; host-to-device copies from
pageable and pinned memory; the batch-inference job against a naive per-image loop and the
bare batched forward; the training job end to end in fp16 and bf16; DDP over NCCL when there
is more than one GPU.

Each part runs in its own spawned process and session (own CUDA context, own peak memory)
under a time limit, the smaller of its own and what is left of the run's budget: a part that
fails or runs out of time is killed with everything it started, recorded as such, and the
next part runs. The JSON is rewritten after every part, so a run cut short still leaves the
finished parts' figures. `--device cpu` runs the same code at tiny sizes (the tests do); the
CUDA-only parts are then recorded as skipped. docs/gpucheck.md says what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lesionseg.bench.measure import rounded
from lesionseg.bench.table import aligned, format_value
from lesionseg.errors import EXIT_USAGE, UserError
from lesionseg.files import work_folder

log = logging.getLogger(__name__)

SCHEMA = "lesionseg-gpucheck/1"
ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "jobs" / "train.py"
# The order parts run in: the cheap and most wanted first, torch.compile (slowest, likeliest
# to fail) last, so that it can only eat time nothing else needed.
PARTS = ("environment", "train_step", "pinned_memory", "inference", "train_job", "ddp",
         "compile")
# Ratio -> (comparison, target, explanation); judged on CUDA only (issue 18: on a small CPU
# host the job's CPU stages share the cores with the forward).
TARGETS: dict[str, tuple[str, float, str]] = {
    "infer_speedup_vs_naive": (">=", 3.0, "batch job images/s ÷ naive per-image loop images/s"),
    "infer_over_pure_forward": ("<=", 1.3, "batch job loop time ÷ pure batched forward time"),
}
CUDA_ONLY = {"pinned_memory": "CUDA only (host-to-device copies)",
             "ddp": "CUDA only (DDP over NCCL)"}
PRECISION_NAMES = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}  # setting -> what it computes in
KILL_GRACE_S = 5.0  # a part's subprocesses get at most this much less time than the part


class GpuCheckError(UserError):
    """The check cannot run as asked (no CUDA, bad option); the message says what to do."""


# ============================================================================ plan


@dataclass(frozen=True)
class CheckPlan:
    """Sizes, repeats and time limits of one run (`plan_for` gives the presets)."""

    device: str = "cuda"  # cuda or cpu
    image_size: int = 384  # side of the training-step and inference images (train_job: the demo's)
    batch_size: int = 16  # images per training step and per inference forward
    warmup: int = 5  # untimed training steps / copies before the timed ones
    steps: int = 30  # timed training steps per variant (figures are medians)
    copies: int = 30  # timed host-to-device copies per memory kind
    infer_images: int = 48  # full-size synthetic images of the inference part
    infer_sides: tuple[int, int] = (1024, 4288)  # their longest sides, from … to (ISIC's largest)
    infer_repeats: int = 3  # timed rounds of the inference variants, after one warm-up round
    train_overrides: tuple[str, ...] = ("optim.epochs=8",)  # of each training run (demo data)
    ddp_steps: int = 40  # optimizer steps of the DDP run
    budget_s: float = 1200.0  # the whole run; a part gets at most what is left of it
    timeouts_s: tuple[tuple[str, float], ...] = (  # per part: at most this many seconds
        ("environment", 60), ("train_step", 300), ("pinned_memory", 60), ("inference", 420),
        ("train_job", 600), ("ddp", 300), ("compile", 420))

    def timeout(self, part: str) -> float:
        return dict(self.timeouts_s)[part]

    @property
    def precisions(self) -> tuple[str, ...]:
        """Autocast settings checked (config names): CUDA has fp16 and bf16; a CPU has no fast
        fp16, so there: no and bf16."""
        return ("fp16", "bf16") if self.device == "cuda" else ("no", "bf16")


def plan_for(device: str, quick: bool, budget_s: float | None = None) -> CheckPlan:
    """The full CUDA plan, the --quick one (about 6 minutes on one H200), or the tiny CPU
    one (the same code paths in about a minute on 2 cores; --quick changes nothing there)."""
    plan = CheckPlan(device=device)
    if device == "cpu":
        plan = dataclasses.replace(
            plan, image_size=64, batch_size=2, warmup=1, steps=3, copies=3, infer_images=3,
            infer_sides=(256, 640), infer_repeats=1,
            train_overrides=("data.demo_cases=12", "data.image_size=64", "data.batch_size=2",
                             "data.num_workers=0", "optim.max_steps=3", "train.num_threads=1"),
            ddp_steps=3, budget_s=300.0,
            timeouts_s=(("environment", 60), ("train_step", 120), ("pinned_memory", 30),
                        ("inference", 150), ("train_job", 150), ("ddp", 60),
                        ("compile", 20)))  # inductor on 2 CPU cores takes minutes: time-boxed
    elif quick:
        plan = dataclasses.replace(
            plan, warmup=3, steps=10, copies=10, infer_images=16, infer_repeats=2,
            train_overrides=("optim.epochs=3",), ddp_steps=20, budget_s=420.0,
            timeouts_s=(("environment", 60), ("train_step", 120), ("pinned_memory", 45),
                        ("inference", 180), ("train_job", 200), ("ddp", 150),
                        ("compile", 180)))
    return dataclasses.replace(plan, budget_s=budget_s) if budget_s else plan


# ============================================================================ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `jobs/gpucheck.py`."""
    parser.description = (
        "The prepared GPU checks in one time-boxed run: environment, training step (fp32, "
        "fp16, bf16,\nchannels_last, torch.compile), pinned-memory copies, the inference job "
        "vs a naive loop and the\nbare forward, the training job in fp16/bf16, DDP over NCCL "
        "with several GPUs. Prints a table\nand writes every figure to --out "
        "(docs/gpucheck.md explains them).")
    parser.add_argument("--out", default="gpu-check.json", metavar="FILE",
                        help="where to write the JSON results (default: gpu-check.json); "
                             "rewritten after every part")
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps and images: about 6 minutes on one H200")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default; exits 2 when no CUDA device is visible) or cpu "
                             "(the same code at tiny sizes, CUDA-only parts skipped)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="time for the whole run; parts get at most what is left "
                             "(default: 1200, --quick 420, cpu 300)")
    parser.add_argument("--workdir", default=None, metavar="DIR",
                        help="where data, checkpoints and run folders go; kept (default: a "
                             "temporary folder, deleted at the end)")


def command(args: argparse.Namespace) -> int:
    """Run every part, print the table, write --out; returns 0 once the JSON is written (the
    parts' failures are in it, and listed under failed_parts)."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise GpuCheckError("no CUDA device is visible here; run it on a GPU host, or pass "
                            "--device cpu for the CPU code paths at tiny sizes")
    if args.budget is not None and args.budget <= 0:
        raise GpuCheckError(f"--budget must be > 0 seconds, got {args.budget}")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise GpuCheckError(f"--out {out}: folder {out.parent} does not exist")
    plan = plan_for(args.device, args.quick, args.budget)
    with work_folder(args.workdir, "lesionseg-gpucheck-") as workdir:
        doc = run_checks(plan, workdir, out, quick=args.quick)
    print(format_table(doc))
    print(f"\nresults written to {out}")
    return 0


def main(argv: list[str] | None = None, prog: str = "jobs/gpucheck.py") -> int:
    """`jobs/gpucheck.py`: parse, run, one-line errors with exit status 2."""
    from lesionseg.cli import setup_logging

    parser = argparse.ArgumentParser(prog=prog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        return command(args)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


# ============================================================================ the run


def run_checks(plan: CheckPlan, workdir: Path, out: Path, quick: bool = False) -> dict[str, Any]:
    """Every part in order, each in its own time-boxed process; the JSON is written to `out`
    after each. Returns the document."""
    from lesionseg.files import atomic_write_text

    started = time.monotonic()
    deadline = started + plan.budget_s
    doc: dict[str, Any] = {
        "schema": SCHEMA, "quick": quick, "device": plan.device,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]], "plan": dataclasses.asdict(plan),
        "parts": {}}
    for part in PARTS:
        left = deadline - time.monotonic()
        skip = not_applicable(part, plan)
        if skip:
            doc["parts"][part] = {"status": "skipped", "reason": skip}
        elif left < 2 * KILL_GRACE_S:
            doc["parts"][part] = {"status": "skipped", "reason": "out of time (--budget)"}
        else:
            limit = min(plan.timeout(part), left)
            log.info("gpucheck %s: starting (at most %.0f s)", part, limit)
            doc["parts"][part] = run_part(part, plan, workdir, limit)
            log.info("gpucheck %s: %s in %.0f s", part, doc["parts"][part]["status"],
                     doc["parts"][part].get("seconds", 0))
        _summarize(doc)
        doc["total_seconds"] = round(time.monotonic() - started, 1)
        atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
    return doc


def not_applicable(part: str, plan: CheckPlan) -> str | None:
    """Why a part does not run on this host (None: it runs)."""
    import torch

    if plan.device != "cuda" and part in CUDA_ONLY:
        return CUDA_ONLY[part]
    if part == "ddp" and torch.cuda.device_count() < 2:
        return f"{torch.cuda.device_count()} GPU (NCCL refuses two ranks on one GPU)"
    return None


def run_part(part: str, plan: CheckPlan, workdir: Path, limit_s: float) -> dict[str, Any]:
    """Run one part in a fresh spawned process that leads its own session; past `limit_s` the
    whole session (DataLoader workers, training subprocesses, compile workers) is killed."""
    result_file = workdir / f"part-{part}.json"
    result_file.unlink(missing_ok=True)
    deadline = time.monotonic() + limit_s  # CLOCK_MONOTONIC is system-wide on Linux
    default_method = multiprocessing.get_start_method()
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_part_main, name=f"gpucheck-{part}",
                       args=(part, plan, str(workdir), deadline, str(result_file),
                             default_method))
    t0 = time.monotonic()
    proc.start()
    timed_out = True
    try:
        proc.join(limit_s)
        timed_out = proc.is_alive()
    finally:
        if proc.is_alive():
            _kill_session(proc.pid)
            proc.kill()  # in case it was killed before it led its own session
            proc.join()
    seconds = round(time.monotonic() - t0, 1)
    if result_file.is_file():
        return {**json.loads(result_file.read_text()), "seconds": seconds}
    if timed_out:
        return {"status": "timeout", "seconds": seconds,
                "error": f"killed after {limit_s:.0f} s (the part's time limit)"}
    return {"status": "failed", "seconds": seconds,
            "error": f"the part's process ended with exit status {proc.exitcode} and no result"}


def _kill_session(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _part_main(part: str, plan: CheckPlan, workdir: str, deadline: float, result_file: str,
               start_method: str) -> None:
    """Entry point of a part's process: own session, logging, run, write the result JSON."""
    os.setsid()
    # The jobs' own worker processes start with the platform's default method, as for a user.
    multiprocessing.set_start_method(start_method, force=True)
    from lesionseg.cli import setup_logging
    from lesionseg.files import atomic_write_text

    setup_logging()
    try:
        result = {"status": "ok", **PART_FUNCTIONS[part](plan, Path(workdir), deadline)}
    except Exception as e:  # noqa: BLE001 (recorded in the JSON; the next part runs)
        log.error("gpucheck %s failed: %s: %s", part, type(e).__name__, e)
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()[-3000:]}
    atomic_write_text(result_file, json.dumps(result, indent=1, default=str))


# ============================================================================ measuring


def _median(values: list[float]) -> float | None:
    return rounded(statistics.median(values)) if values else None


def _device(plan: CheckPlan) -> Any:
    import torch

    return torch.device(plan.device)


def _sync(device: Any) -> None:
    """Wait for queued CUDA work (the timers must not stop before the GPU does)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: Any) -> float | None:
    """Peak CUDA memory allocated since the last reset, MB (None on the CPU)."""
    import torch

    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def timed_calls(fn: Callable[[], Any], warmup: int, n: int, device: Any) -> list[float]:
    """Seconds of each of `n` calls after `warmup` untimed ones, synchronized on CUDA."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


# ============================================================================ environment


def check_environment(plan: CheckPlan, workdir: Path, deadline: float) -> dict[str, Any]:
    """Library versions, device, capability, GPU count and memory, bf16, cuDNN, host CPU."""
    import accelerate
    import torch
    import torchvision

    from lesionseg.bench.measure import machine_info
    from lesionseg.inference import cpu_has_bf16

    env: dict[str, Any] = {
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "accelerate": accelerate.__version__, "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        # TF32 in fp32 convolutions / matmuls (torch's defaults: on / off): the fp32 figures
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "host": machine_info(0)}
    if plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update({"device_name": props.name, "capability": f"{props.major}.{props.minor}",
                    "gpu_count": torch.cuda.device_count(),
                    "memory_gb": round(props.total_memory / 2**30, 1),
                    "multiprocessors": props.multi_processor_count,
                    "bf16_supported": torch.cuda.is_bf16_supported(),
                    "nccl": _nccl_version()})
    else:
        env.update({"device_name": "cpu", "capability": None, "gpu_count": 0,
                    "memory_gb": env["host"]["memory_gb"], "bf16_supported": cpu_has_bf16()})
    return env


def _nccl_version() -> str | None:
    """NCCL's version as torch reports it (None where this build has no NCCL)."""
    import torch

    try:
        version = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


# ============================================================================ training step


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

    from lesionseg.bench.datasets import bench_config
    from lesionseg.train.build import build_model, build_optimizer

    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    cfg = bench_config([f"data.image_size={plan.image_size}",
                   f"model.channels_last={str(channels_last).lower()}"])
    device = _device(plan)
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
    device = _device(plan)
    return x.to(device), y.to(device)


def train_step(v: StepVariant, loss_fn: Any, x: Any, y: Any) -> Any:
    """One optimizer step: autocast forward, fp32 loss, scaled backward, unscale, clip, AdamW
    (skipped by the scaler on inf/NaN gradients in fp16). Returns the loss (on the device)."""
    import torch

    from lesionseg.device import autocast, precision_dtype

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
    from lesionseg.losses import SegmentationLoss

    device = _device(plan)
    loss_fn = SegmentationLoss()
    x, y = step_batch(plan, v.channels_last)
    last: dict[str, Any] = {}

    def step() -> None:
        last["loss"] = train_step(v, loss_fn, x, y)

    _reset_peak(device)
    times = timed_calls(step, plan.warmup, plan.steps, device)
    median = statistics.median(times)
    loss = float(last["loss"])
    return {"step_s": _median(times), "step_s_min": rounded(min(times)),
            "step_s_max": rounded(max(times)), "images_per_s": rounded(plan.batch_size / median),
            "peak_memory_mb": _peak_mb(device), "last_loss": rounded(loss),
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
    from lesionseg.losses import SegmentationLoss

    device = _device(plan)
    v = step_variant(plan, "bf16", True, compile_model=True)
    x, y = step_batch(plan, True)
    t0 = time.perf_counter()
    train_step(v, SegmentationLoss(), x, y)
    _sync(device)
    compile_s = time.perf_counter() - t0
    log.info("compile: first step %.1f s", compile_s)
    return {"variant": "bf16 channels_last, torch.compile(model)",
            "first_step_s": rounded(compile_s), **time_variant(plan, v)}


# ============================================================================ pinned memory


def check_pinned_memory(plan: CheckPlan, workdir: Path, deadline: float) -> dict[str, Any]:
    """Host-to-device copy of one uint8 batch, pageable vs pinned, non_blocking=True."""
    import torch

    device = _device(plan)
    batch = torch.randint(0, 256, (plan.batch_size, 3, plan.image_size, plan.image_size),
                          dtype=torch.uint8)
    sources = {"pageable": batch, "pinned": batch.pin_memory()}
    result: dict[str, Any] = {"bytes": batch.numel(), "shape": list(batch.shape)}
    for name, src in sources.items():
        times = timed_calls(lambda src=src: src.to(device, non_blocking=True), plan.warmup,
                            plan.copies, device)
        median = statistics.median(times)
        result[name] = {"copy_s": rounded(median), "gb_per_s": rounded(batch.numel() / median / 1e9)}
    result["pinned_speedup"] = rounded(result["pageable"]["copy_s"] / result["pinned"]["copy_s"])
    return result


# ============================================================================ inference


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
    from lesionseg.bench.case_infer import bench_checkpoint
    from lesionseg.bench.datasets import full_size_source, source_pairs
    from lesionseg.bench.plan import plan_for as bench_plan_for
    from lesionseg.checkpoint import build_model_from_checkpoint
    from lesionseg.data.images import load_image
    from lesionseg.data.transforms import eval_transform, stack_images

    bplan = bench_plan_for(True, images=plan.infer_images, min_side=plan.infer_sides[0],
                           max_side=plan.infer_sides[1], image_size=plan.image_size,
                           batch_size=plan.batch_size)
    source = full_size_source(workdir, bplan)
    pairs = source_pairs(source)
    ckpt = bench_checkpoint(workdir, plan.image_size)
    images8 = stack_images([
        eval_transform(load_image(p.read_bytes(), str(p))[0], None, plan.image_size)[0]
        for p, _ in pairs])
    naive_model = build_model_from_checkpoint(ckpt)[0].to(_device(plan)).eval()
    return InferInputs(source, pairs, ckpt, images8, naive_model, workdir / "infer-runs")


def time_job(inputs: InferInputs, cfg: Any) -> dict[str, Any]:
    """One run of the batch job (`run_inference`): its loop and forward seconds (from the
    summary), wall seconds (start to summary) and thread plan."""
    from lesionseg.inference import run_inference

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
    from lesionseg.bench.case_infer import naive_pass

    device = _device(plan)
    t0 = time.perf_counter()
    naive_pass(inputs.naive_model, inputs.pairs, inputs.runs_dir / "naive", plan.image_size,
               device, precision)
    _sync(device)
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
    from lesionseg.bench.datasets import bench_config
    from lesionseg.inference import load_predictor

    device = _device(plan)
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
            "job_wall_s": _median([j["wall_s"] for j in jobs]),
            "job_forward_inside_s": _median([j["forward_s"] for j in jobs]),
            "naive_s": rounded(naive), "forward_s": rounded(forward),
            "job_images_per_s": rounded(n / loop), "naive_images_per_s": rounded(n / naive),
            "forward_images_per_s": rounded(n / forward),
            "infer_speedup_vs_naive": rounded(naive / loop),
            "infer_over_pure_forward": rounded(loop / forward), "threads": jobs[-1]["threads"]}


def check_inference(plan: CheckPlan, workdir: Path, deadline: float) -> dict[str, Any]:
    """The batch job (run_inference, TTA off, report on) vs the naive loop vs the job's own
    predictor on pre-decoded batches, at each precision; the first one is the headline."""
    device = _device(plan)
    inputs = infer_inputs(plan, workdir)
    _reset_peak(device)
    results = {PRECISION_NAMES[p]: infer_precision(plan, inputs, p) for p in plan.precisions}
    shutil.rmtree(inputs.runs_dir, ignore_errors=True)
    headline = results[PRECISION_NAMES[plan.precisions[0]]]
    return {"images": len(inputs.pairs), "sides": list(plan.infer_sides),
            "image_size": plan.image_size, "batch_size": plan.batch_size,
            "repeats": plan.infer_repeats, "tta": False, "precisions": results,
            "headline_precision": PRECISION_NAMES[plan.precisions[0]],
            "infer_speedup_vs_naive": headline["infer_speedup_vs_naive"],
            "infer_over_pure_forward": headline["infer_over_pure_forward"],
            "threads": headline["threads"], "peak_memory_mb": _peak_mb(device),
            "note": "job loop time from its summary (model load, listing and merge are in the "
                    "wall time); naive: fp32 weights, the same autocast; forward: the job's "
                    "predictor (BatchNorm folded, channels_last) on pre-decoded uint8 batches"}


# ============================================================================ training job


def run_command(cmd: list[str], cwd: Path, log_path: Path, timeout_s: float) -> dict[str, Any]:
    """Run `cmd` in its own session, output to `log_path`; past `timeout_s` the session is
    killed (accelerate's ranks and DataLoader workers with it, which subprocess.run's timeout
    would leave running). Returns exit status (None on timeout), wall seconds and the log."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            _kill_session(proc.pid)
            proc.wait()
            rc = None
        finally:
            if proc.poll() is None:
                _kill_session(proc.pid)
                proc.wait()
    return {"exit_status": rc, "wall_s": round(time.monotonic() - t0, 1),
            "log": log_path.read_text(errors="replace")}


LOSS_RE = re.compile(r"step (\d+): loss=(\S+)")
STEP_TIME_RE = re.compile(r"step_time=(\S+)")
WORLD_RE = re.compile(r"world size (\d+)")


def read_train_run(ran: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """What a finished training run shows: the final val Dice (metrics.jsonl), whether every
    logged loss was finite and no step was skipped, the median logged step time."""
    text = ran.pop("log")
    losses = [float(v) for _, v in LOSS_RE.findall(text)]
    step_times = [float(v) for v in STEP_TIME_RE.findall(text)]
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    dice = json.loads(lines[-1])["dice"] if lines else None
    world = WORLD_RE.search(text)
    finite = bool(losses) and all(map(math.isfinite, losses)) and "non-finite" not in text
    result = {**ran, "ok": ran["exit_status"] == 0 and dice is not None,
              "final_val_dice": rounded(dice), "loss_finite": finite,
              "logged_losses": len(losses), "first_loss": rounded(losses[0]) if losses else None,
              "last_loss": rounded(losses[-1]) if losses else None,
              "step_time_s": _median(step_times[1:] or step_times),
              "world_size": int(world.group(1)) if world else None}
    if not result["ok"]:
        result["log_tail"] = text[-3000:]
    return result


def train_overrides(plan: CheckPlan, precision: str, run: str) -> list[str]:
    """The training job on the built-in demo data (data.shards unset), no tracking, every
    step's scalars logged (the finite-loss check reads them)."""
    return [*plan.train_overrides, f"train.mixed_precision={precision}",
            "tracking.backend=none", "train.log_every_steps=1", f"train.output_dir=runs/{run}"]


def check_train_job(plan: CheckPlan, workdir: Path, deadline: float) -> dict[str, Any]:
    """`python jobs/train.py` on the demo data, once per precision, as a user runs it."""
    cwd = workdir / "train-job"  # the demo data is built (once) under its shards/demo
    cwd.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Any] = {}
    for k, precision in enumerate(plan.precisions):
        left = deadline - time.monotonic() - KILL_GRACE_S
        timeout = left / (len(plan.precisions) - k)
        log.info("train job %s: at most %.0f s", PRECISION_NAMES[precision], timeout)
        ran = run_command([sys.executable, str(TRAIN_SCRIPT),
                           *train_overrides(plan, precision, precision)],
                          cwd, cwd / f"train-{precision}.log", timeout)
        runs[PRECISION_NAMES[precision]] = {"setting": f"train.mixed_precision={precision}",
                                            **read_train_run(ran, cwd / "runs" / precision)}
    return {"overrides": list(plan.train_overrides), "runs": runs,
            "all_ok": all(r["ok"] and r["loss_finite"] for r in runs.values())}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_command(plan: CheckPlan, processes: int, port: int) -> list[str]:
    """`accelerate launch --multi_gpu` of the training job (bf16) over `processes` ranks."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "bf16",
            "--dynamo_backend", "no", "--main_process_port", str(port), str(TRAIN_SCRIPT),
            *train_overrides(plan, "bf16", "ddp"), f"optim.max_steps={plan.ddp_steps}"]


def check_ddp(plan: CheckPlan, workdir: Path, deadline: float) -> dict[str, Any]:
    """The training job over every GPU, DDP over NCCL (the demo data of train_job, reused)."""
    import torch

    gpus = torch.cuda.device_count()  # at least 2 (not_applicable)
    cwd = workdir / "train-job"
    cwd.mkdir(parents=True, exist_ok=True)
    ran = run_command(ddp_command(plan, gpus, _free_port()), cwd, cwd / "train-ddp.log",
                      deadline - time.monotonic() - KILL_GRACE_S)
    result = read_train_run(ran, cwd / "runs" / "ddp")
    return {"processes": gpus, "steps": plan.ddp_steps, **result,
            "ok": result["ok"] and result["world_size"] == gpus}


PART_FUNCTIONS: dict[str, Callable[[CheckPlan, Path, float], dict[str, Any]]] = {
    "environment": check_environment, "train_step": check_train_step,
    "pinned_memory": check_pinned_memory, "inference": check_inference,
    "train_job": check_train_job, "ddp": check_ddp, "compile": check_compile}


# ============================================================================ report


def _summarize(doc: dict[str, Any]) -> None:
    """Top-level figures a reader looks for first: the inference ratios against their targets
    (judged on CUDA only), compile's gain over the eager step, the failed parts."""
    parts = doc["parts"]
    infer = parts.get("inference", {})
    targets = {}
    for name, (op, target, what) in TARGETS.items():
        value = infer.get(name)
        met = None
        if value is not None and doc["device"] == "cuda":
            met = value >= target if op == ">=" else value <= target
        doc[name] = value
        targets[name] = {"value": value, "target": f"{op} {target:g}", "met": met,
                         "what": what + ("" if doc["device"] == "cuda"
                                         else " (not judged on the CPU)")}
    doc["targets"] = targets
    eager = parts.get("train_step", {}).get("variants", {}).get("bf16 channels_last", {})
    compiled = parts.get("compile", {})
    doc["compile_speedup_vs_eager"] = (
        rounded(eager["step_s"] / compiled["step_s"])
        if eager.get("step_s") and compiled.get("step_s") else None)
    doc["failed_parts"] = [p for p, r in parts.items() if r["status"] in ("failed", "timeout")]


def table_rows(doc: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(part, measurement, value, notes) rows of the printed table."""
    rows: list[tuple[str, str, str, str]] = []
    for part, r in doc["parts"].items():
        if r["status"] != "ok":
            why = r.get("reason") or r.get("error") or ""
            rows.append((part, r["status"].upper(), "", why.splitlines()[0][:90] if why else ""))
            continue
        rows += PART_ROWS[part](r)
    return rows


def _environment_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [("environment", "device", str(r["device_name"]),
             f"capability {r['capability']}, {r['gpu_count']} GPU(s), {format_value(r['memory_gb'])} GB, "
             f"bf16 {r['bf16_supported']}"),
            ("environment", "torch / torchvision / accelerate",
             f"{r['torch']} / {r['torchvision']} / {r['accelerate']}",
             f"CUDA {r['cuda_runtime']}, cuDNN {r['cudnn']}")]


def _train_step_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [("train_step", f"{name}, batch {r['batch_size']} at {r['image_size']}², s",
             format_value(v["step_s"]), f"{format_value(v['images_per_s'])} img/s, peak "
             f"{format_value(v['peak_memory_mb'])} MB, loss finite {v['loss_finite']}")
            for name, v in r["variants"].items()]


def _compile_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [("compile", "torch.compile bf16 channels_last step, s", format_value(r["step_s"]),
             f"{format_value(r['images_per_s'])} img/s; first step (compiling) "
             f"{format_value(r['first_step_s'])} s")]


def _pinned_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [("pinned_memory", f"host→device {name}, GB/s", format_value(r[name]["gb_per_s"]),
             f"{r['bytes'] / 2**20:.1f} MB uint8 batch, non_blocking")
            for name in ("pageable", "pinned")]


def _inference_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = []
    for precision, p in r["precisions"].items():
        rows += [("inference", f"{precision}: batch job / naive / forward, img/s",
                  f"{format_value(p['job_images_per_s'])} / {format_value(p['naive_images_per_s'])} / "
                  f"{format_value(p['forward_images_per_s'])}",
                  f"{r['images']} full-size images, batch {r['batch_size']}"),
                 ("inference", f"{precision}: speedup vs naive / over pure forward",
                  f"{format_value(p['infer_speedup_vs_naive'])} / {format_value(p['infer_over_pure_forward'])}",
                  "targets >= 3 / <= 1.3 (GPU)")]
    threads = r.get("threads") or {}
    rows.append(("inference", "thread plan (torch / decode workers / finishing)",
                 f"{threads.get('torch_threads')} / {threads.get('decode_workers')} / "
                 f"{threads.get('finish_threads')}", f"{threads.get('cores')} cores"))
    return rows


def _train_run_row(part: str, name: str, run: dict[str, Any]) -> tuple[str, str, str, str]:
    return (part, f"{name}: final val Dice", format_value(run["final_val_dice"]),
            f"wall {format_value(run['wall_s'])} s, step {format_value(run['step_time_s'])} s, loss finite "
            f"{run['loss_finite']}, exit {run['exit_status']}")


def _train_job_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [_train_run_row("train_job", name, run) for name, run in r["runs"].items()]


def _ddp_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [_train_run_row("ddp", f"{r['processes']} ranks bf16", r)]


PART_ROWS: dict[str, Callable[[dict[str, Any]], list[tuple[str, str, str, str]]]] = {
    "environment": _environment_rows, "train_step": _train_step_rows,
    "pinned_memory": _pinned_rows, "inference": _inference_rows,
    "train_job": _train_job_rows, "ddp": _ddp_rows, "compile": _compile_rows}


def format_table(doc: dict[str, Any]) -> str:
    """The printed table, then the targets and the failed parts."""
    lines = [f"lesionseg gpucheck{' (quick)' if doc.get('quick') else ''} on {doc['device']}, "
             f"{doc.get('total_seconds')} s", ""]
    lines += aligned([("part", "measurement", "value", "notes"), *table_rows(doc)])
    lines += ["", "targets:"]
    for name, t in doc["targets"].items():
        verdict = {True: "met", False: "MISSED", None: "not judged"}[t["met"]]
        lines.append(f"  {name:26s} {format_value(t['value']):>8s}  target {t['target']:7s} {verdict}")
    lines.append(f"  compile_speedup_vs_eager   {format_value(doc['compile_speedup_vs_eager']):>8s}")
    if doc["failed_parts"]:
        lines.append(f"\nparts failed or timed out: {', '.join(doc['failed_parts'])}")
    return "\n".join(lines)
