"""`lesionseg bench` / `jobs/bench.py`: the benchmark command's arguments, help and run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lesionseg.bench.case_real import check_real_source
from lesionseg.bench.harness import run_bench
from lesionseg.bench.plan import CASES, BenchError, plan_for
from lesionseg.bench.table import format_table
from lesionseg.files import atomic_write_text, work_folder

EPILOG = """what each case measures (see lesionseg/bench/ for the method):
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
         Equal epochs are not equal data: the peers train on every training case, ours on
         the pack's train split, holding its val out for the quality fit; each row says on
         how many images it trained (train_images, val_images).
         With --real DIR (a folder in the ISIC 2016 Part 1 layout) the same three trainers
         also train on those real images, 30 epochs at 128², random encoders, every seed, and
         are scored on its test split by the official scorer: Dice, Jaccard, the mean Dice of
         the worst tenth of the images and the count below Dice 0.5 (real_dice_*,
         real_jaccard_*, real_worst10_*, real_below_half_* in bench.json). Targets: ours >=
         plain + 0.01 and >= smp + 0.02, Jaccard >= 0.87, worst tenth >= 0.78 and >= plain +
         0.03; ours's review flags (seed means): AUROC >= 0.92 for Dice < 0.8, <= 15 %
         flagged, >= 80 % of those images caught, expected-Dice error <= 0.06
         (real_review_*). --real-fullsize DIR applies ours's 128² model to full-size
         photographs without masks and writes a contact sheet of its outlines
         (WORKDIR/accuracy/real-fullsize/).

examples:
  python jobs/bench.py all --quick --out bench.json          # ~12 minutes on 2 cores
  python jobs/bench.py accuracy --quick                      # the accuracy case alone
  python jobs/bench.py accuracy --real ~/data/isic2016 --real-fullsize ~/data/isic-full \
      --workdir /tmp/bench --out bench-real.json                # + real images (~2 h on 2 cores)
  python jobs/bench.py train --workdir /tmp/bench --threads 2
  python jobs/bench.py infer --images 64 --repeats 5

bench.json holds the machine, every figure, peak RSS per case, model parameters and
multiply-accumulates, and at its top level the ratios data_speedup_vs_folder,
train_speedup_vs_smp (null without segmentation-models-pytorch), train_loop_over_pure_step,
infer_speedup_vs_naive, infer_over_pure_forward, infer_efficiency, infer_wall_over_loop,
accuracy_dice_ours, accuracy_dice_plain,
accuracy_dice_smp and the accuracy margins."""



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
    parser.add_argument("--real", metavar="DIR",
                        help="also race the trainers on real images: a folder in the ISIC 2016 "
                             "Part 1 layout (the four official folders); accuracy case only")
    parser.add_argument("--real-fullsize", metavar="DIR",
                        help="with --real: full-size photographs without masks that ours's "
                             "128² model segments for a contact sheet you look at")
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
    cases = CASES if args.case == "all" else (args.case,)
    if args.real_fullsize and not args.real:
        raise BenchError("--real-fullsize needs --real DIR (its model is trained there)")
    if args.real and "accuracy" not in cases:
        raise BenchError(f"--real belongs to the accuracy case; run `accuracy` or `all`, "
                         f"not {args.case!r}")
    for name in ("real", "real_fullsize"):
        value = getattr(args, name)
        if value and not Path(value).is_dir():
            raise BenchError(f"--{name.replace('_', '-')} {value}: not a folder")
    if args.real:
        check_real_source(Path(args.real))
    plan = plan_for(args.quick, images=args.images, repeats=args.repeats,
                    race_budget_s=args.race_budget, accuracy_seeds=args.accuracy_seeds,
                    peer=False if args.no_peer else None,
                    real=str(Path(args.real).resolve()) if args.real else None,
                    real_fullsize=(str(Path(args.real_fullsize).resolve())
                                   if args.real_fullsize else None))
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise BenchError(f"--out {out}: folder {out.parent} does not exist")
    with work_folder(args.workdir, "lesionseg-bench-") as workdir:
        results = run_bench(plan, cases, workdir, threads=args.threads, quick=args.quick)
    results["command"] = [Path(sys.argv[0]).name, *sys.argv[1:]]
    atomic_write_text(out, json.dumps(results, indent=1) + "\n")
    print(format_table(results))
    print(f"\nresults written to {out}")
    return 0


