"""`lesionseg cv`: evaluate a cross-validation run folder (lesionseg.crossval.evaluate)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lesionseg.crossval import CV_DIR, evaluate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lesionseg cv`."""
    parser.description = (
        "Evaluate a cross-validation run folder (trained with data.folds=K): pool the "
        "out-of-fold predictions of its fold-I/ folders, choose the threshold and "
        "post-processing on them (stored in every fold's best.pt) and write cv/metrics.csv, "
        "cv/summary.json, cv/report.html and cv/masks/. Training does this by itself when its "
        "last fold finishes; run it by hand after retraining a fold, or to look again.")
    parser.epilog = """examples:
  python jobs/train.py data.shards=shards/isic2016 data.folds=5 train.output_dir=runs/cv5
  lesionseg cv runs/cv5
  python jobs/infer.py --checkpoint runs/cv5 --input shards/isic2016 --out out/cv5"""
    parser.add_argument("run", metavar="RUN_DIR", help="the run folder holding fold-0/ … fold-K-1/")
    parser.add_argument("--no-store", action="store_true",
                        help="do not write the pooled choice into the folds' best.pt (scores "
                             "at threshold 0.5 without post-processing)")
    parser.add_argument("--no-wandb", action="store_true",
                        help="do not log the summary to W&B (default: when the folds did)")


def command(args: argparse.Namespace) -> int:
    """Run `evaluate` on the folder; print where the outputs are."""
    summary = evaluate(args.run, store=False if args.no_store else None,
                       log_wandb=not args.no_wandb)
    m, s = summary["means"], summary["spread"]
    print(f"{summary['cases']} cases in {summary['folds']} folds: Dice {m['dice']:.4f} "
          f"(folds {s['dice']['mean']:.4f} ± {s['dice']['std']:.4f}), Jaccard "
          f"{m['jaccard']:.4f} (folds {s['jaccard']['mean']:.4f} ± {s['jaccard']['std']:.4f}); "
          f"threshold {summary['threshold']:g}, post-processing {summary['postprocess']}; "
          f"{Path(args.run) / CV_DIR}/")
    return 0
