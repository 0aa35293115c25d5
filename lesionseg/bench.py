"""Benchmarks: `python jobs/bench.py [data|train|infer|accuracy|all] [--quick] [--out FILE]`.

Every figure is measured on the real code paths, side by side in one run: the training input
pipeline (`training.TrainStream` over packed shards) against a plain folder loader doing the
same augmentation; the model step (fp32, bf16, channels_last, frozen encoder) against
`segmentation_models_pytorch`'s U-Net; the real training loop (`Loader`, `fetch_batches`,
`train_step`) against the pure step on pre-made tensors; and the batch-inference job
(`inference.run_inference`) against a naive per-image loop and the bare model forward.

Method: warm-up, then the median of repeats; variants that compete for the same CPU are
interleaved (A B C, A B C, …) so that a noisy machine slows them alike. Each case runs in a
fresh process (spawned), so its peak RSS is its own: the case process's VmHWM, and the largest
peak of its child processes (DataLoader and pack workers, from getrusage(RUSAGE_CHILDREN)).
Data is generated under --workdir with the synthetic ISIC generator (full-size JPEGs, mixed
sizes up to 4288x2848) and reused by later runs that name the same --workdir.
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
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lesionseg.errors import UserError
from lesionseg.peers import build_peer, peer_available
from lesionseg.threadplan import usable_cores

log = logging.getLogger(__name__)

CASES = ("data", "train", "infer", "accuracy")
SCHEMA = "lesionseg-bench/1"
SOURCE_SEED = 0  # seed of the full-size synthetic source (data and infer cases)
RACE_SEED = 1  # seed of the demo-sized data set of the equal-time training race
OTHER_STORE_SIDE = 1024  # data case: also shards stored with this longest side (more detail)
RACE_VAL_FRACTION = 0.2  # of the race's cases, validated (more than the default: less noise)
PEER_NAME = 'smp.Unet("mobilenet_v2", encoder_weights=None)'
MACS_SIDE = 384  # multiply-accumulates are counted for one image of this side
SPEED_CASE_EPOCHS = 100  # the speed cases resolve the recipe as for a schedule this long

# Ratio name -> (case, comparison, target, explanation). Scripts read the names at top level.
RATIOS: dict[str, tuple[str, str, float, str]] = {
    "data_speedup_vs_folder": ("data", ">=", 10.0,
                               "shard pipeline images/s ÷ folder loader images/s (one worker)"),
    "train_speedup_vs_smp": ("train", ">=", 2.5,
                             "smp U-Net step time ÷ our step time (fp32, trainable, best layout)"),
    "train_loop_over_pure_step": ("train", "<=", 1.15,
                                  "real loop step time ÷ pure step time (same model and batch)"),
    # This bench measures on the CPU, where the job's CPU stages share the cores with the
    # forward: ≥ 2 here; a GPU host's targets (≥ 3, ≤ 1.3) are jobs/gpucheck.py's.
    "infer_speedup_vs_naive": ("infer", ">=", 2.0,
                               "batch job images/s ÷ naive loop images/s (CPU; ≥ 3 on a GPU)"),
    "infer_over_pure_forward": ("infer", "<=", 1.3,
                                "batch job time ÷ pure batched forward time (same images; a GPU "
                                "host's target: on a CPU the job's CPU stages share the cores)"),
    "infer_efficiency": ("infer", ">=", 0.85,
                         "ideal time (pure forward + the job's per-image CPU stages spread over "
                         "the cores) ÷ the job's loop time"),
    "infer_wall_over_loop": ("infer", "<=", 1.1,
                             "the job's wall time (start to report written) ÷ its loop time"),
    "accuracy_margin_vs_plain": ("accuracy", ">=", 0.01,
                                 "our test Dice − the plain script's, hard data, equal epochs"),
    "accuracy_margin_vs_smp": ("accuracy", ">=", 0.02,
                               "our test Dice − smp U-Net's (plain script), equal epochs"),
    "accuracy_time_margin_vs_plain": ("accuracy", ">", 0.0,
                                      "our test Dice − the plain script's, equal wall time"),
    "accuracy_time_margin_vs_smp": ("accuracy", ">", 0.0,
                                    "our test Dice − smp U-Net's, equal wall time"),
}
# Top-level test Dice of each trainer in the accuracy case (equal epochs), no target alone.
ACCURACY_KEYS = ("accuracy_dice_ours", "accuracy_dice_smp", "accuracy_dice_plain")

EPILOG = """what each case measures (see lesionseg/bench.py for the method):
  data   training input pipeline (shards -> decoded, augmented 384² batches) in images/s per
         worker (one process, one thread, as a DataLoader worker) vs a plain folder loader on
         the same full-size JPEGs (full PIL decode + the same transforms); also shards packed
         at 1024 px instead of the default 512. Target >= 10x.
  train  fwd+bwd+AdamW step at 384², batch 8: fp32, bf16 autocast, channels_last on/off, frozen
         encoder; smp U-Net (if installed); the real loop fed by the shard pipeline vs the pure
         step; val Dice of ours vs smp after the same wall-clock budget on the same demo data.
         Targets: >= 2.5x faster than smp, loop <= 1.15x pure step, Dice >= smp's.
  infer  batch job images/s on full-size images with truth vs a naive per-image loop (the
         checkpoint's model as loaded) vs the job's own pure batched forward (BatchNorm
         folded) on pre-decoded tensors. Targets >= 3x naive, <= 1.3x forward.
  accuracy  hard synthetic ISIC-layout set (120 train, 40 test: faint borders, hair, rulers,
         ink, bubbles, vignettes, dark skin): pack -> train -> infer with our defaults vs a
         plain 50-line PyTorch script with our model and with smp's U-Net, 12 epochs at 256²
         (--quick 128²), random encoders; official-scorer test Dice at equal epochs and at
         equal wall time (the peers get our training command's seconds), each the mean over
         training seeds 0 and 1 (--quick: seed 0; --accuracy-seeds N). Targets: ours >=
         plain + 0.01 and >= smp + 0.02 at equal epochs, ahead of both at equal time.

examples:
  python jobs/bench.py all --quick --out bench.json          # ~12 minutes on 2 cores
  python jobs/bench.py accuracy --quick                      # the accuracy case alone
  python jobs/bench.py train --workdir /tmp/bench --threads 2
  python jobs/bench.py infer --images 64 --repeats 5

bench.json holds the machine, every figure, peak RSS per case, model parameters and
multiply-accumulates, and at its top level the ratios data_speedup_vs_folder,
train_speedup_vs_smp (null without segmentation-models-pytorch), train_loop_over_pure_step,
infer_speedup_vs_naive, infer_over_pure_forward, infer_efficiency, infer_wall_over_loop,
accuracy_dice_ours, accuracy_dice_plain,
accuracy_dice_smp and the accuracy margins."""


class BenchError(UserError):
    """A benchmark that cannot run (bad option, failed case); the message says why."""


# ============================================================================ plan


@dataclass(frozen=True)
class BenchPlan:
    """Sizes, repeats and budgets of one run (`plan_for` gives the presets)."""

    images: int = 48  # full-size synthetic cases (data and infer cases)
    min_side: int = 1024  # longest side of the synthetic source images: from …
    max_side: int = 4288  # … to (4288x2848 is the largest ISIC 2016 image)
    image_size: int = 384  # training/inference side
    batch_size: int = 8  # images per step / forward
    warmup: int = 1  # untimed rounds before the repeats
    repeats: int = 5  # timed rounds; figures are medians over them
    data_batches: int = 4  # batches per timed round in the data case
    loop_steps: int = 8  # timed steps per block in the loop-vs-pure comparison
    train_workers: int = 2  # DataLoader workers of the real training loop
    race_cases: int = 240  # synthetic cases of the equal-time race (demo-like sizes)
    race_sides: tuple[int, int] = (320, 1024)  # their longest sides: from, to
    race_size: int = 256  # training/validation side of the race
    race_budget_s: float = 300.0  # training seconds each model gets in the race
    race_slice_s: float = 10.0  # models alternate every this many training seconds
    race_lr: float = 3e-3  # constant learning rate (after warm-up) of both models in the race
    peer: bool = True  # include segmentation-models-pytorch when it is installed
    accuracy_size: int = 256  # training side of the accuracy case
    accuracy_epochs: int = 12  # epochs of every trainer in the accuracy case (equal epochs)
    accuracy_train: int = 120  # hard training cases (the official train split)
    accuracy_test: int = 40  # hard test cases scored
    accuracy_sides: tuple[int, int] = (400, 4288)  # longest sides of the hard cases
    accuracy_seeds: int = 2  # training seeds 0..N-1 of every trainer; scores are their means


def plan_for(quick: bool, **overrides: Any) -> BenchPlan:
    """The full plan, or the --quick one (about 12 minutes on a quiet 2-core machine, half of
    it the accuracy case at 128²); overrides win."""
    plan = BenchPlan()
    if quick:
        plan = dataclasses.replace(
            plan, images=16, repeats=3, data_batches=2, loop_steps=5, race_cases=200,
            race_sides=(160, 480), race_size=128, race_budget_s=90.0, race_slice_s=6.0,
            accuracy_size=128, accuracy_seeds=1)
    return dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})


# ============================================================================ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lesionseg bench` / `jobs/bench.py`."""
    parser.description = (
        "Benchmarks of the real code paths, side by side in one run: the training input\n"
        "pipeline, the training step and loop, and batch inference, each against a baseline.\n"
        "Prints a table and writes every figure with a machine description to --out.")
    parser.epilog = EPILOG
    full, quick = plan_for(False), plan_for(True)  # the help quotes the plans, never a copy
    parser.add_argument("case", nargs="?", default="all", choices=(*CASES, "all"),
                        help="which benchmark to run (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer images and repeats, a {quick.race_budget_s:g} s training race "
                             f"at {quick.race_size}², the accuracy case at "
                             f"{quick.accuracy_size}² (about 12 minutes on 2 quiet cores)")
    parser.add_argument("--out", default="bench.json", metavar="FILE",
                        help="where to write the JSON results (default: bench.json)")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="torch threads of the measuring process (default: every core); "
                             "the data case always measures one thread, as a DataLoader worker")
    parser.add_argument("--workdir", default=None, metavar="DIR",
                        help="where generated data and outputs go; kept and reused by later "
                             "runs (default: a temporary folder, deleted at the end)")
    parser.add_argument("--images", type=int, default=None, metavar="N",
                        help="full-size synthetic images of the data and infer cases "
                             f"(default {full.images}, --quick {quick.images})")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help=f"timed rounds per figure, after a warm-up (default {full.repeats}, "
                             f"--quick {quick.repeats})")
    parser.add_argument("--race-budget", type=float, default=None, metavar="SECONDS",
                        help="training seconds per model in the equal-time Dice race "
                             f"(default {full.race_budget_s:g}, --quick {quick.race_budget_s:g})")
    parser.add_argument("--accuracy-seeds", type=int, default=None, metavar="N",
                        help="training seeds 0..N-1 of every trainer in the accuracy case, "
                             f"scores averaged (default {full.accuracy_seeds}, --quick "
                             f"{quick.accuracy_seeds})")
    parser.add_argument("--no-peer", action="store_true",
                        help="skip segmentation-models-pytorch even when it is installed")


def command(args: argparse.Namespace) -> int:
    """Run the chosen cases, print the table, write --out; returns 0."""
    if args.threads < 0:
        raise BenchError(f"--threads must be >= 0, got {args.threads}")
    for name in ("images", "repeats", "accuracy_seeds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.race_budget is not None and args.race_budget <= 0:
        raise BenchError(f"--race-budget must be > 0 seconds, got {args.race_budget}")
    plan = plan_for(args.quick, images=args.images, repeats=args.repeats,
                    race_budget_s=args.race_budget, accuracy_seeds=args.accuracy_seeds,
                    peer=False if args.no_peer else None)
    cases = CASES if args.case == "all" else (args.case,)
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise BenchError(f"--out {out}: folder {out.parent} does not exist")
    with _workdir(args.workdir) as workdir:
        results = run_bench(plan, cases, workdir, threads=args.threads, quick=args.quick)
    results["command"] = [Path(sys.argv[0]).name, *sys.argv[1:]]
    from lesionseg.files import atomic_write_text

    atomic_write_text(out, json.dumps(results, indent=1) + "\n")
    print(format_table(results))
    print(f"\nresults written to {out}")
    return 0


@contextlib.contextmanager
def _workdir(path: str | None) -> Iterator[Path]:
    """The given folder (created, kept), or a temporary one removed afterwards."""
    if path:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder.resolve()
        return
    folder = Path(tempfile.mkdtemp(prefix="lesionseg-bench-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ============================================================================ the run


def run_bench(plan: BenchPlan, cases: tuple[str, ...], workdir: Path, threads: int = 0,
              quick: bool = False) -> dict[str, Any]:
    """Run each case in its own spawned process; returns the bench.json document."""
    started = time.perf_counter()
    doc: dict[str, Any] = {"schema": SCHEMA,
                           "created": datetime.datetime.now().astimezone().isoformat(
                               timespec="seconds"),
                           "quick": quick, "plan": dataclasses.asdict(plan),
                           "machine": machine_info(threads)}
    doc.update(dict.fromkeys(RATIOS))
    doc.update(dict.fromkeys(ACCURACY_KEYS))
    doc["cases"] = {}
    for case in cases:
        log.info("bench %s: starting (own process)", case)
        t0 = time.perf_counter()
        result = run_case_isolated(case, plan, workdir, threads)
        result["case_seconds"] = round(time.perf_counter() - t0, 1)
        doc["cases"][case] = result
        for name, value in result.get("ratios", {}).items():
            doc[name] = value
        for name, value in result.get("top_level", {}).items():
            doc[name] = value
        log.info("bench %s: done in %.0f s", case, result["case_seconds"])
    doc["targets"] = target_table(doc)
    doc["machine"]["load_average_end"] = _load_average()
    doc["total_seconds"] = round(time.perf_counter() - started, 1)
    return doc


def run_case_isolated(case: str, plan: BenchPlan, workdir: Path, threads: int) -> dict[str, Any]:
    """Run one case in a fresh spawned process (own peak RSS, no state shared with others)."""
    result_file = workdir / f"result-{case}.json"
    result_file.unlink(missing_ok=True)
    # The jobs' own processes (DataLoader, pack and inference workers) start with the
    # platform's default method; a spawned child would otherwise inherit "spawn" for them.
    default_method = multiprocessing.get_start_method()
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_case_main, args=(case, plan, str(workdir), threads,
                                                str(result_file), default_method),
                       name=f"bench-{case}")
    proc.start()
    proc.join()
    if proc.exitcode != 0 or not result_file.is_file():
        raise BenchError(f"bench case {case!r} failed (exit status {proc.exitcode}); its error "
                         "is printed above")
    return json.loads(result_file.read_text())


def _case_main(case: str, plan: BenchPlan, workdir: str, threads: int, result_file: str,
               start_method: str) -> None:
    """Entry point of a case process: set threads, run the case, add peak RSS, write JSON."""
    multiprocessing.set_start_method(start_method, force=True)
    import torch

    from lesionseg.cli import setup_logging
    from lesionseg.files import atomic_write_text

    setup_logging()
    if threads > 0:
        torch.set_num_threads(threads)
    runner = {"data": bench_data, "train": bench_train, "infer": bench_infer,
              "accuracy": bench_accuracy}[case]
    try:
        result = runner(plan, Path(workdir))
    except UserError as e:
        log.error("bench %s: %s", case, e)
        sys.exit(2)
    result["memory"] = peak_memory()
    atomic_write_text(result_file, json.dumps(result, indent=1))


# ============================================================================ measuring


def peak_memory() -> dict[str, Any]:
    """Peak RSS of this process (VmHWM) and of its largest finished child (RUSAGE_CHILDREN)."""
    self_kb = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                self_kb = int(line.split()[1])
    if self_kb is None:  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
        self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"peak_rss_mb": round(self_kb / 1024, 1),
            "children_peak_rss_mb": round(children_kb / 1024, 1) if children_kb else None,
            "source": "case process: /proc/self/status VmHWM; children: the largest single "
                      "child's peak, getrusage(RUSAGE_CHILDREN).ru_maxrss"}


def stats(values: list[float]) -> dict[str, Any]:
    """Median, mean, min, max and the raw values (rounded) of a list of measurements."""
    return {"median": _r(statistics.median(values)), "mean": _r(statistics.fmean(values)),
            "min": _r(min(values)), "max": _r(max(values)), "n": len(values),
            "values": [_r(v) for v in values]}


def _r(x: float) -> float:
    """Round to 4 significant digits (plenty for timings on a noisy machine)."""
    return float(f"{x:.4g}") if x and math.isfinite(x) else x


def interleaved(variants: dict[str, Callable[[], float]], warmup: int,
                repeats: int) -> dict[str, list[float]]:
    """Call every variant once per round (A B C, A B C, …): `warmup` untimed rounds, then
    `repeats` rounds whose returned figures (seconds or a rate) are collected per variant."""
    from tqdm import tqdm

    for _ in range(warmup):
        for fn in variants.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in variants}
    for _ in tqdm(range(repeats), desc="rounds", unit="round", leave=False):
        for name, fn in variants.items():
            out[name].append(fn())
    return out


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of `fn` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def machine_info(threads: int) -> dict[str, Any]:
    """CPU, cores, memory, library versions, threads and device of this run."""
    import torch
    import torchvision

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024**2, 1)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb,
            "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "threads": threads or torch.get_num_threads(), "device": device,
            "load_average_start": _load_average()}


def _load_average() -> list[float] | None:
    with contextlib.suppress(OSError):
        return [round(v, 2) for v in os.getloadavg()]
    return None


# ============================================================================ data sets


def full_size_source(workdir: Path, plan: BenchPlan) -> Path:
    """The full-size synthetic ISIC source (plan.images training cases, with masks), cached."""
    from lesionseg.data.synthetic import write_isic_dataset

    spec = {"n": plan.images, "seed": SOURCE_SEED, "min_side": plan.min_side,
            "max_side": plan.max_side}
    return _cached_source(workdir / "source-full", spec, lambda root: write_isic_dataset(
        root, plan.images, seed=SOURCE_SEED, min_side=plan.min_side, max_side=plan.max_side,
        progress=True))


def race_source(workdir: Path, plan: BenchPlan) -> Path:
    """The demo-sized synthetic source of the training race, cached."""
    from lesionseg.data.synthetic import write_isic_dataset

    lo, hi = plan.race_sides
    spec = {"n": plan.race_cases, "seed": RACE_SEED, "min_side": lo, "max_side": hi}
    return _cached_source(workdir / "source-race", spec, lambda root: write_isic_dataset(
        root, plan.race_cases, seed=RACE_SEED, min_side=lo, max_side=hi, progress=True))


def _cached_source(root: Path, spec: dict[str, Any], write: Callable[[Path], Any]) -> Path:
    """Write the data set unless `root` already holds one made with the same spec."""
    marker = root / "bench-source.json"
    with contextlib.suppress(OSError, ValueError):
        if json.loads(marker.read_text()) == spec:
            return root
    shutil.rmtree(root, ignore_errors=True)
    log.info("writing %d synthetic cases (longest side %d-%d) to %s", spec["n"],
             spec["min_side"], spec["max_side"], root)
    write(root)
    marker.write_text(json.dumps(spec))
    return root


def packed(source: Path, out: Path, **pack_overrides: Any) -> tuple[Path, float | None]:
    """Pack `source` with the default pack config (plus overrides) unless `out` holds it;
    returns the folder and the packing seconds (None when reused)."""
    from lesionseg.data.shards import MANIFEST, pack

    cfg = _config([f"pack.{k}={v}" for k, v in pack_overrides.items()])
    stamp = out / "bench-pack.json"
    spec = {"source": str(source), "pack": dataclasses.asdict(cfg.pack),
            "source_spec": json.loads((source / "bench-source.json").read_text())}
    with contextlib.suppress(OSError, ValueError):
        if json.loads(stamp.read_text()) == spec and (out / MANIFEST).is_file():
            return out, None
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    pack([source], out, cfg.pack, progress=True)
    seconds = time.perf_counter() - t0
    stamp.write_text(json.dumps(spec))
    return out, seconds


def _config(overrides: list[str]) -> Any:
    """A Config from the defaults plus overrides (encoder random: no download here), its
    automatic recipe resolved for a long schedule: the strong augmentation, the costliest one,
    is what the speed cases measure."""
    from lesionseg.config import load_config
    from lesionseg.recipe import resolve

    cfg = load_config(None, ["model.encoder_weights=null", "tracking.backend=none", *overrides])
    resolve(cfg, total_steps=SPEED_CASE_EPOCHS, steps_per_epoch=1)
    return cfg


def source_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(image, mask) paths of the training cases of an ISIC-layout folder, sorted by id."""
    from lesionseg.data.synthetic import OFFICIAL_NAMES

    images = sorted((root / OFFICIAL_NAMES[("train", "image")]).glob("*.jpg"))
    masks = root / OFFICIAL_NAMES[("train", "mask")]
    return [(p, masks / f"{p.stem}_Segmentation.png") for p in images]


def _megapixels(paths: list[Path]) -> list[float]:
    from PIL import Image

    sizes = []
    for p in paths:
        with Image.open(p) as img:
            sizes.append(img.width * img.height / 1e6)
    return sizes


# ============================================================================ case: data


class FolderLoader:
    """The baseline: a plain loader over an image folder, one case at a time, full PIL decode
    with the project's one image loader, then the SAME training transform as the pipeline."""

    def __init__(self, pairs: list[tuple[Path, Path]], batch_size: int, data_cfg: Any) -> None:
        from lesionseg.data.transforms import AugmentParams

        self.pairs, self.batch_size = pairs, batch_size
        self.augment = AugmentParams.from_config(data_cfg)
        self.position = 0

    def next_batch(self) -> dict[str, Any]:
        """Decode and augment the next batch_size cases (cycling over the folder)."""
        import torch

        from lesionseg.data.images import load_image, load_mask
        from lesionseg.data.transforms import generator_for, stack_images, train_transform

        images, masks = [], []
        for _ in range(self.batch_size):
            image_path, mask_path = self.pairs[self.position % len(self.pairs)]
            image, size = load_image(image_path.read_bytes(), str(image_path))  # full decode
            mask = load_mask(mask_path.read_bytes(), str(mask_path), expected_size=size)
            g = generator_for(0, 0, 0, self.position, image_path.stem)
            x, y = train_transform(image, mask, self.augment, g)
            images.append(x)
            masks.append(y)
            self.position += 1
        return {"image": stack_images(images), "mask": torch.stack(masks)}


def shard_loader(shards: Path, cfg: Any, workers: int) -> Any:
    """The real training input pipeline: TrainStream over the train shards in the training
    job's Loader (workers=0: in this process), endless for benchmarking. Use it as a context
    manager (it stops its workers on exit) and iterate it for batches."""
    import torch

    from lesionseg.training import Loader, TrainStream, plan_data

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=workers))
    data = plan_data(str(shards))
    dataset = TrainStream(data.train_urls, cfg, epoch=0, rank=0, world=1, batches=10**9)
    return Loader(dataset, cfg, torch.device("cpu"))


def data_stage_costs(pairs: list[tuple[Path, Path]], shards: Path,
                     cfg: Any) -> dict[str, Any]:
    """Milliseconds per image (one thread) of each stage, for both paths: decode (shard
    sample at the JPEG scale its drawn crop needs vs the full-size files) and the same
    training transform."""
    from lesionseg.data.images import load_image, load_mask
    from lesionseg.data.shards import decode_sample, iter_raw, raw_image_size, split_urls
    from lesionseg.data.transforms import (
        AugmentParams,
        apply_augmentation,
        draw_augmentation,
        generator_for,
        train_transform,
    )

    augment = AugmentParams.from_config(cfg.data)
    raws = list(iter_raw(split_urls(shards, "train")))
    files = [(p.read_bytes(), m.read_bytes(), str(p), str(m)) for p, m in pairs]
    spent = dict.fromkeys(("shard_decode", "shard_transform", "folder_decode",
                           "folder_transform"), 0.0)
    for i, raw in enumerate(raws):
        t0 = time.perf_counter()
        aug = draw_augmentation(*raw_image_size(raw), augment, generator_for(0, i))
        sample = decode_sample(raw, draft_size=aug.decode_size())
        t1 = time.perf_counter()
        apply_augmentation(sample.image, sample.mask, aug)
        spent["shard_decode"] += t1 - t0
        spent["shard_transform"] += time.perf_counter() - t1
    for i, (image_bytes, mask_bytes, image_name, mask_name) in enumerate(files):
        t0 = time.perf_counter()
        image, size = load_image(image_bytes, image_name)
        mask = load_mask(mask_bytes, mask_name, expected_size=size)
        t1 = time.perf_counter()
        train_transform(image, mask, augment, generator_for(0, i))
        spent["folder_decode"] += t1 - t0
        spent["folder_transform"] += time.perf_counter() - t1
    counts = {"shard": len(raws), "folder": len(files)}
    return {f"{k}_ms": _r(1000 * v / counts[k.split("_")[0]]) for k, v in spent.items()}


def bench_data(plan: BenchPlan, workdir: Path) -> dict[str, Any]:
    """Shard pipeline vs folder loader, images/s with one worker (one process, one thread)."""
    import torch

    from lesionseg.data.shards import read_manifest

    torch.set_num_threads(1)  # what a DataLoader worker runs with
    source = full_size_source(workdir, plan)
    pairs = source_pairs(source)
    shards, pack_s = packed(source, workdir / "shards-full")
    manifest = read_manifest(shards)
    cfg = _config([f"data.image_size={plan.image_size}", f"data.batch_size={plan.batch_size}"])
    folder = FolderLoader(pairs, plan.batch_size, cfg.data)
    images = plan.data_batches * plan.batch_size
    # The same pipeline on shards stored larger: how much the stored size (pack.max_side)
    # decides, for a choice between image detail and decode time.
    other_side = OTHER_STORE_SIDE
    other, _ = packed(source, workdir / f"shards-full-{other_side}", max_side=other_side)
    with shard_loader(shards, cfg, workers=0) as loader, \
            shard_loader(other, cfg, workers=0) as other_loader:
        pipeline, other_pipeline = iter(loader), iter(other_loader)
        log.info("data: first shard batches (fill the %d-sample shuffle buffers)",
                 cfg.data.shuffle_buffer)
        next(pipeline)
        next(other_pipeline)

        def rate(fn: Callable[[], Any]) -> float:
            return images / timed(lambda: [fn() for _ in range(plan.data_batches)])

        runs = interleaved({"folder": lambda: rate(folder.next_batch),
                            "shards": lambda: rate(lambda: next(pipeline)),
                            "shards_other": lambda: rate(lambda: next(other_pipeline))},
                           plan.warmup, plan.repeats)
    shard_s, folder_s = stats(runs["shards"]), stats(runs["folder"])
    stages = data_stage_costs(pairs, shards, cfg)
    source_bytes = sum(p.stat().st_size + m.stat().st_size for p, m in pairs)
    mps = _megapixels([p for p, _ in pairs])
    speedup = shard_s["median"] / folder_s["median"]
    return {
        "threads": 1, "image_size": plan.image_size, "batch_size": plan.batch_size,
        "images": len(pairs), "source_megapixels_mean": _r(statistics.fmean(mps)),
        "source_megapixels_max": _r(max(mps)),
        "source_bytes_per_case": round(source_bytes / len(pairs)),
        "shard_bytes_per_sample": round(manifest["total_bytes"] / manifest["total_samples"]),
        "pack_max_side": manifest.get("options", {}).get("max_side"),
        "pack_seconds": _r(pack_s) if pack_s else None,
        "pack_cases_per_s": _r(len(pairs) / pack_s) if pack_s else None,
        "pack_workers": cfg.pack.workers,
        "shards_images_per_s": shard_s, "folder_images_per_s": folder_s,
        "stages_ms_per_image": stages,
        f"shards_max_side_{other_side}_images_per_s": stats(runs["shards_other"]),
        f"speedup_at_max_side_{other_side}": _r(statistics.median(runs["shards_other"])
                                                / folder_s["median"]),
        "ratios": {"data_speedup_vs_folder": _r(speedup)},
    }


# ============================================================================ case: train


def model_cost(model: Any, size: int = MACS_SIDE) -> dict[str, Any]:
    """Parameters (all, trainable) and multiply-accumulates of one size×size forward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.rand(1, 3, size, size))
    model.train(was_training)
    return {"params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            f"gmacs_{size}": _r(counter.get_total_flops() / 2e9)}


@dataclass
class StepVariant:
    """One model/precision/layout of the pure step benchmark."""

    model: Any
    optimizer: Any
    channels_last: bool
    amp: Any  # torch dtype for autocast, or None


def direct_step(v: StepVariant, loss_fn: Any, x: Any, y: Any, grad_clip: float) -> float:
    """One plain-PyTorch optimizer step (autocast forward, fp32 loss, backward, clip, AdamW),
    the same sequence as training.train_step on one process; returns the loss."""
    import torch

    from lesionseg.data.transforms import to_float_images

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
    import torch

    from lesionseg.training import build_model, build_optimizer

    specs = {"ours fp32 channels_last": ([], torch.float32),
             "ours fp32 contiguous": (["model.channels_last=false"], torch.float32),
             "ours bf16 channels_last": ([], torch.bfloat16),
             "ours fp32 channels_last frozen": (["model.freeze_encoder=true"], torch.float32)}
    variants = {}
    for name, (overrides, dtype) in specs.items():
        torch.manual_seed(0)
        cfg = _config(overrides)
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
                model, build_optimizer(model, _config([])), cl, None)
        torch.manual_seed(0)
        model = build_peer().train().to(memory_format=torch.channels_last)
        variants["smp bf16 channels_last"] = StepVariant(
            model, build_optimizer(model, _config([])), True, torch.bfloat16)
    return variants


def bench_steps(plan: BenchPlan, batch: dict[str, Any], with_peer: bool) -> dict[str, Any]:
    """Pure step time of every variant on the same pre-made batch, interleaved."""
    from lesionseg.losses import SegmentationLoss

    loss_fn = SegmentationLoss()
    x, y = batch["image"], batch["mask"].float()
    grad_clip = _config([]).optim.grad_clip
    variants = step_variants(plan, with_peer)
    runs = interleaved({name: (lambda v=v: timed(lambda: direct_step(v, loss_fn, x, y, grad_clip)))
                        for name, v in variants.items()}, plan.warmup, plan.repeats)
    return {name: stats(values) for name, values in runs.items()}


def bench_loop(plan: BenchPlan, shards: Path, workdir: Path) -> dict[str, Any]:
    """The real loop (shard pipeline with DataLoader workers → fetch_batches → train_step)
    against train_step on a pre-made batch, in blocks: pure, loop, pure. The loop's first
    workers × prefetch + 2 steps are not timed, so no timed loop step is served from a buffer
    that filled up while a pure block ran."""
    import torch
    from tqdm import tqdm

    from lesionseg.losses import SegmentationLoss
    from lesionseg.training import (
        build_model,
        build_optimizer,
        fetch_batches,
        make_accelerator,
        train_step,
    )

    cfg = _config([f"data.image_size={plan.image_size}", f"data.batch_size={plan.batch_size}",
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
            "ratio": _r(loop_s["mean"] / pure_s["mean"])}


def race(racers: dict[str, dict[str, Any]], loss_fn: Any, plan: BenchPlan,
         grad_clip: float) -> None:
    """Train every racer for plan.race_budget_s seconds (its own data fetching included),
    alternating in slices of plan.race_slice_s so that machine noise hits all alike."""
    from tqdm import tqdm

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
    import torch

    from lesionseg.losses import SegmentationLoss
    from lesionseg.training import (
        Loader,
        ValStream,
        build_model,
        build_optimizer,
        plan_data,
        summarize_results,
        validation_counts,
    )

    source = race_source(workdir, plan)
    shards, _ = packed(source, workdir / "shards-race", max_side=2 * plan.race_size,
                       val_fraction=RACE_VAL_FRACTION, shard_max_samples=32)
    cfg = _config([f"data.image_size={plan.race_size}", f"data.batch_size={plan.batch_size}",
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
        out[name] = {"steps": r["steps"], "train_seconds": _r(r["seconds"]),
                     "images_seen": r["steps"] * plan.batch_size,
                     "val_dice": _r(metrics["dice"]), "val_jaccard": _r(metrics["jaccard"])}
    return out


def bench_train(plan: BenchPlan, workdir: Path) -> dict[str, Any]:
    """Pure step variants, ours vs smp, the real loop vs the pure step, and the Dice race."""
    import torch

    from lesionseg.training import build_model

    with_peer = plan.peer and peer_available()
    if plan.peer and not with_peer:
        log.warning("segmentation-models-pytorch is not installed (pip install -e '.[bench]'): "
                    "train_speedup_vs_smp will be null")
    source = full_size_source(workdir, plan)
    shards, _ = packed(source, workdir / "shards-full")
    cfg = _config([f"data.image_size={plan.image_size}", f"data.batch_size={plan.batch_size}"])
    with shard_loader(shards, cfg, workers=0) as loader:
        batch = next(iter(loader))

    cost = {"ours": model_cost(build_model(cfg)),
            "ours_frozen_encoder": model_cost(build_model(_config(["model.freeze_encoder=true"])))}
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
        speedup = _r(steps[peer]["median"] / steps[ours]["median"])
        other = {  # the same ratio under other rules, for the record
            "speedup_vs_smp_default_nchw": _r(steps["smp fp32 contiguous"]["median"]
                                              / steps[ours]["median"]),
            "speedup_vs_smp_bf16": _r(steps["smp bf16 channels_last"]["median"]
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


# ============================================================================ case: infer


def bench_checkpoint(workdir: Path, image_size: int) -> Path:
    """A seeded random-weight checkpoint (speed does not depend on the weights), written
    afresh each run so that it always has this version's architecture."""
    import torch

    from lesionseg.checkpoint import save_weights
    from lesionseg.training import build_model

    path = workdir / f"bench-model-{image_size}.pt"
    cfg = _config([f"data.image_size={image_size}"])
    torch.manual_seed(0)
    save_weights(path, build_model(cfg).state_dict(), cfg, note="random weights (bench)")
    return path


def naive_pass(model: Any, pairs: list[tuple[Path, Path]], out: Path, size: int) -> None:
    """The baseline: per image, full PIL decode, resize to size², one forward, upsample to the
    original size, threshold, save the PNG, score against the truth. One image at a time."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image, ImageOps

    from lesionseg.metrics import confusion_counts

    out.mkdir(parents=True, exist_ok=True)
    for image_path, mask_path in pairs:
        with Image.open(image_path) as raw:
            img = ImageOps.exif_transpose(raw).convert("RGB")
        w, h = img.size
        x = torch.from_numpy(np.array(img.resize((size, size), Image.BILINEAR)))
        x = x.permute(2, 0, 1).float().div(255).unsqueeze(0)
        with torch.inference_mode():
            prob = torch.sigmoid(model(x))
        full = F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        mask = Image.fromarray(((full > 0.5).numpy() * 255).astype(np.uint8), mode="L")
        mask.save(out / f"{image_path.stem}_Segmentation.png")
        with Image.open(mask_path) as t:
            truth = torch.from_numpy(np.asarray(t) > 128)
        confusion_counts(torch.from_numpy(np.asarray(mask) > 128), truth)


def infer_stage_costs(source: Path, cfg: Any, predictor: Any, image_size: int,
                      out: Path) -> dict[str, Any]:
    """Milliseconds per image on one thread of the job's two CPU stages, with its defaults:
    `decode_item` (a decode worker: read, reduced-scale decode, resize, truth) and
    `finish_item` (a finishing thread: upsample, threshold, mask PNG, scores, thumbnail)."""
    import torch

    from lesionseg.data.sources import collect
    from lesionseg.inference import (
        THUMB_SIDE,
        OutputSpec,
        applied_postprocess,
        decode_item,
        finish_item,
    )

    icfg = cfg.infer
    post, _ = applied_postprocess(icfg, {})  # the bench checkpoint holds no choice: 0.5, none
    spec = OutputSpec(out, post.threshold, icfg.save_probs, icfg.save_overlays, icfg.report,
                      post.steps)
    preview = icfg.overlay_max_side if icfg.save_overlays else (THUMB_SIDE if icfg.report else 0)
    items = collect([source]).items
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
    return {"decode_item_ms": _r(1000 * decode_s / len(items)),
            "finish_item_ms": _r(1000 * finish_s / len(items)), "threads": 1}


def bench_infer(plan: BenchPlan, workdir: Path) -> dict[str, Any]:
    """The batch job (run_inference, job defaults) vs the naive loop vs the pure forward."""
    import torch

    from lesionseg.checkpoint import build_model_from_checkpoint
    from lesionseg.data.images import load_image
    from lesionseg.data.transforms import eval_transform, stack_images, to_float_images
    from lesionseg.inference import load_predictor, run_inference

    source = full_size_source(workdir, plan)
    pairs = source_pairs(source)
    ckpt = bench_checkpoint(workdir, plan.image_size)
    cfg = _config([f"infer.batch_size={plan.batch_size}",
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
    job: dict[str, Any] = {"loop_s": [], "wall_s": [], "forward_s": [], "threads": None}

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
    n = len(pairs)
    ort_s = stats(runs["forward_ort"]) if ort_predictor is not None else None
    job_s, naive_s, fwd_s = (stats(runs[k]) for k in ("job", "naive", "forward"))
    stages = infer_stage_costs(source, cfg, predictor, plan.image_size, runs_dir / "stages")
    rate = {k: _r(n / s["median"]) for k, s in (("job", job_s), ("naive", naive_s),
                                                 ("forward", fwd_s))}
    mps = _megapixels([p for p, _ in pairs])
    ideal = ideal_infer_seconds(fwd_s["median"], stages, n, usable_cores())
    wall_s = stats(job["wall_s"])
    return {
        "threads": torch.get_num_threads(), "image_size": plan.image_size,
        "batch_size": plan.batch_size, "job_threads": job["threads"], "images": n,
        "source_megapixels_mean": _r(statistics.fmean(mps)), "source_megapixels_max": _r(max(mps)),
        "job_loop_s": job_s, "job_wall_s": wall_s,
        "job_forward_inside_s": stats(job["forward_s"]), "naive_s": naive_s,
        "forward_s": fwd_s, "stages_ms_per_image": stages, "cores": usable_cores(),
        "ideal_s": _r(ideal),
        "job_images_per_s": rate["job"], "job_wall_images_per_s": _r(
            n / wall_s["median"]),
        "naive_images_per_s": rate["naive"], "forward_images_per_s": rate["forward"],
        "precision": predictor.precision,
        "forward_fp32_s": stats(runs["forward_fp32"]) if fp32 is not None else None,
        "forward_onnxruntime_s": ort_s,
        "forward_onnxruntime_images_per_s": _r(n / ort_s["median"]) if ort_s else None,
        "note": "job = run_inference with the job's defaults (report on); loop time excludes "
                "model load, input listing and the merge, which the wall time includes",
        "ratios": {"infer_speedup_vs_naive": _r(naive_s["median"] / job_s["median"]),
                   "infer_over_pure_forward": _r(job_s["median"] / fwd_s["median"]),
                   "infer_efficiency": _r(ideal / job_s["median"]),
                   "infer_wall_over_loop": _r(wall_s["median"] / job_s["median"])},
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
    import importlib.util

    import torch

    from lesionseg.inference import load_predictor

    if importlib.util.find_spec("onnxruntime") is None:
        log.info("infer: onnxruntime not installed; no onnxruntime forward row")
        return None
    return load_predictor(ckpt, dataclasses.replace(icfg, backend="onnxruntime"),
                          torch.device("cpu"))[0]


# ============================================================================ accuracy


def bench_accuracy(plan: BenchPlan, workdir: Path) -> dict[str, Any]:
    """Test Dice on hard synthetic data: ours (the jobs, defaults) vs the plain script with our
    model and with smp's U-Net, at equal epochs and equal wall time (lesionseg.accuracy)."""
    from lesionseg import accuracy

    aplan = accuracy.AccuracyPlan(
        image_size=plan.accuracy_size, epochs=plan.accuracy_epochs,
        train_cases=plan.accuracy_train, test_cases=plan.accuracy_test,
        min_side=plan.accuracy_sides[0], max_side=plan.accuracy_sides[1],
        train_seeds=tuple(range(plan.accuracy_seeds)))
    result = accuracy.bench_accuracy(aplan, workdir / "accuracy",
                                     with_peer=plan.peer and peer_available())
    epochs, times = result["equal_epochs"], result["equal_time"]
    ours = epochs["ours"]["dice"]
    result["top_level"] = {f"accuracy_dice_{k}": epochs[k]["dice"] if k in epochs else None
                           for k in ("ours", "plain", "smp")}
    result["ratios"] = {
        "accuracy_margin_vs_plain": _r(ours - epochs["plain"]["dice"]),
        "accuracy_margin_vs_smp": _r(ours - epochs["smp"]["dice"]) if "smp" in epochs else None,
        "accuracy_time_margin_vs_plain": _r(ours - times["plain"]["dice"]),
        "accuracy_time_margin_vs_smp": _r(ours - times["smp"]["dice"]) if "smp" in times else None,
    }
    return result


# ============================================================================ report


def target_table(doc: dict[str, Any]) -> dict[str, Any]:
    """Each ratio with its target and whether it is met (None when not measured)."""
    table = {}
    for name, (_, op, target, what) in RATIOS.items():
        value = doc.get(name)
        met = None if value is None else {">=": value >= target, ">": value > target,
                                          "<=": value <= target}[op]
        table[name] = {"value": value, "target": f"{op} {target:g}", "met": met, "what": what}
    race = doc.get("cases", {}).get("train", {}).get("race", {})
    if "ours" in race:
        ours, peer = race["ours"]["val_dice"], race.get("smp", {}).get("val_dice")
        table["train_race_val_dice"] = {
            "value": {"ours": ours, "smp": peer}, "target": "ours >= smp",
            "met": None if peer is None else ours >= peer,
            "what": f"val Dice after {race['budget_s']:g} s of training each at "
                    f"{race['image_size']}²"}
    return table


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}{unit}" if abs(value) < 100 else f"{value:.0f}{unit}"
    return f"{value}{unit}"


def table_rows(doc: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(case, measurement, median, spread/notes) rows of the printed table."""
    rows: list[tuple[str, str, str, str]] = []
    cases = doc.get("cases", {})
    if "data" in cases:
        d = cases["data"]
        for key, label in (("shards_images_per_s", "shard pipeline"),
                           ("folder_images_per_s", "folder loader (full decode)")):
            s = d[key]
            rows.append(("data", f"{label}, img/s/worker", _fmt(s["median"]),
                         f"{_fmt(s['min'])}-{_fmt(s['max'])}"))
        for key, s in d.items():
            if key.startswith("shards_max_side_"):
                side = key.split("_")[3]
                rows.append(("data", f"shard pipeline, stored at {side} px, img/s/worker",
                             _fmt(s["median"]), f"{_fmt(s['min'])}-{_fmt(s['max'])}"))
        st = d["stages_ms_per_image"]
        rows.append(("data", "ms/img decode + transform: shards", _fmt(st["shard_decode_ms"]),
                     f"+ {_fmt(st['shard_transform_ms'])}"))
        rows.append(("data", "ms/img decode + transform: folder", _fmt(st["folder_decode_ms"]),
                     f"+ {_fmt(st['folder_transform_ms'])}"))
        rows.append(("data", "packing, cases/s", _fmt(d["pack_cases_per_s"]),
                     f"{d['pack_workers']} workers"))
    if "train" in cases:
        t = cases["train"]
        for name, s in t["step_s"].items():
            rows.append(("train", f"step {name}, s", _fmt(s["median"]),
                         f"{_fmt(s['min'])}-{_fmt(s['max'])}"))
        lp = t["loop"]
        rows.append(("train", "pure step (train_step, pre-made), s",
                     _fmt(lp["pure_step_s"]["mean"]), f"median {_fmt(lp['pure_step_s']['median'])}"))
        rows.append(("train", f"real loop ({lp['num_workers']} workers), s",
                     _fmt(lp["loop_step_s"]["mean"]), f"median {_fmt(lp['loop_step_s']['median'])}"))
        race = t["race"]
        for name in ("ours", "smp"):
            if name in race:
                r = race[name]
                rows.append(("train", f"race {name}: val Dice after {race['budget_s']:g} s "
                             f"at {race['image_size']}²", _fmt(r["val_dice"]),
                             f"{r['steps']} steps"))
        for name, c in t["model"].items():
            gm = next(v for k, v in c.items() if k.startswith("gmacs_"))
            rows.append(("train", f"{name}: params (trainable), GMACs", f"{c['params'] / 1e6:.2f} M",
                         f"({c['trainable_params'] / 1e6:.2f} M), {_fmt(gm)} GMAC"))
    if "infer" in cases:
        i = cases["infer"]
        rows.append(("infer", "batch job, img/s", _fmt(i["job_images_per_s"]),
                     f"wall incl. start-up {_fmt(i['job_wall_images_per_s'])}"))
        rows.append(("infer", "naive loop, img/s", _fmt(i["naive_images_per_s"]), ""))
        rows.append(("infer", f"pure forward batch {i['batch_size']}, img/s",
                     _fmt(i["forward_images_per_s"]), i.get("precision", "")))
        if i.get("forward_fp32_s"):
            rows.append(("infer", f"pure forward batch {i['batch_size']}, fp32, img/s",
                         _fmt(_r(i["images"] / i["forward_fp32_s"]["median"])), ""))
        if i.get("job_threads"):
            th = i["job_threads"]
            rows.append(("infer", "job threads: torch / decode workers / finishing",
                         f"{th['torch_threads']} / {th['decode_workers']} / "
                         f"{th['finish_threads']}", f"on {th['cores']} cores"))
        if i.get("forward_onnxruntime_images_per_s"):
            rows.append(("infer", f"pure forward batch {i['batch_size']}, onnxruntime, img/s",
                         _fmt(i["forward_onnxruntime_images_per_s"]), "same batches, uint8 in"))
        st = i["stages_ms_per_image"]
        rows.append(("infer", "ms/img on 1 core: decode_item + finish_item",
                     _fmt(st["decode_item_ms"]), f"+ {_fmt(st['finish_item_ms'])}"))
    if "accuracy" in cases:
        a = cases["accuracy"]
        for label, group in (("equal epochs", "equal_epochs"), ("equal time", "equal_time")):
            for name, r in a[group].items():
                if group == "equal_time" and name == "ours":
                    continue
                seeds = r.get("per_seed")
                per_seed = (", seeds " + " / ".join(_fmt(x["dice"]) for x in seeds)
                            if seeds else "")
                rows.append(("accuracy", f"{name}, {label}: test Dice / Jaccard at "
                             f"{a['image_size']}²", f"{_fmt(r['dice'])} / {_fmt(r['jaccard'])}",
                             f"{r['epochs']} epochs, {_fmt(r['train_seconds'])} s{per_seed}"))
    for case, c in cases.items():
        m = c.get("memory", {})
        rows.append((case, "peak RSS (process / largest child), MB", _fmt(m.get("peak_rss_mb")),
                     _fmt(m.get("children_peak_rss_mb"))))
    return rows


def format_table(doc: dict[str, Any]) -> str:
    """The printed table: machine line, figures, then the ratios against their targets."""
    m = doc["machine"]
    lines = [f"lesionseg bench{' (quick)' if doc.get('quick') else ''}: {m['cpu']}, "
             f"{m['cores']} cores, {m['threads']} threads, torch {m['torch']}, {m['device']}, "
             f"load {m.get('load_average_start')} -> {m.get('load_average_end')}", ""]
    rows = [("case", "measurement", "median", "spread / notes"), *table_rows(doc)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["", "ratios:"]
    for name, t in doc["targets"].items():
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        value = t["value"]
        shown = (", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
                 if isinstance(value, dict) else _fmt(value))
        lines.append(f"  {name:28s} {shown:>24s}  target {t['target']:11s} {verdict}")
    return "\n".join(lines)
