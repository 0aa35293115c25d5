"""`lesionseg train` / `accelerate launch jobs/train.py [--config FILE] [key=value …]`: the
command line of the train job (lesionseg.train.loop runs it)."""

from __future__ import annotations

import argparse
import os

from lesionseg.commands.launch import maybe_relaunch_cpu_ranks
from lesionseg.config import load_config, was_set
from lesionseg.files import check_output_dir
from lesionseg.train.demo import apply_demo_defaults
from lesionseg.train.loop import train, train_folds
from lesionseg.weights import check_encoder_weights

EPILOG = """configuration: defaults <- --config FILE.yaml <- key=value overrides (later wins).
Every key, its default and a one-line explanation: lesionseg/config.py (sections data, model,
loss, optim, train, tracking); the resolved tree is saved as <train.output_dir>/config.yaml.

most used keys:
  data.shards=DIR            packed shard folder (jobs/pack.py); null = build and train a demo set
  data.image_size=384        training/validation side;  data.batch_size=8 (per process)
  data.num_workers=2         decode+augment workers per process
  model.encoder_weights=imagenet|null|FILE    model.freeze_encoder=false
  optim.epochs=30  optim.max_steps=0 (>0 wins)  optim.grad_accum_steps=1
  optim.lr, optim.encoder_lr_mult, optim.warmup_steps, data.scale_min, data.rotate_degrees,
  data.color_jitter: null = chosen from the encoder weights and the schedule length (the
  "recipe:" start-up line says what and why; lesionseg/recipe.py); set any to override
  train.mixed_precision=no|bf16|fp16          train.seed=0
  train.output_dir=runs/x (default runs/<data.shards folder name>, runs/demo for the demo)
  train.resume=auto|none|STATE_DIR (none moves an old run and its exports aside)
  train.resume_with_changes=false (true: resume a state despite other settings, not exactly)
  train.val_every_steps=0 (0 = every epoch)   train.select=final|best (what best.pt holds)
  train.num_threads=0 (set >0 for bit-exact CPU resume)
  data.folds=0 (K >= 2: K-fold cross-validation into <train.output_dir>/fold-I/, out-of-fold
  scores in <train.output_dir>/cv/)   data.fold=all|I (all: every fold in turn)  data.fold_seed=0
  tracking.backend=wandb|none  tracking.mode=offline|online|disabled (WANDB_MODE wins)

examples:
  python jobs/train.py                                   # demo data: 56 s on a quiet 2-core CPU
  accelerate launch jobs/train.py data.shards=shards/isic2016 train.mixed_precision=bf16
  ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
      --mixed_precision no --dynamo_backend no jobs/train.py data.shards=…   # 2 CPU ranks
  python jobs/train.py data.shards=shards/isic2016 data.folds=5 train.output_dir=runs/cv5

outputs in train.output_dir: best.pt, last.pt (weights-only), config.yaml, metrics.jsonl,
states/step-N (full states for resume), wandb/ (tracking.backend=wandb).
demo (data.shards=null): shards/demo is built once; unless set, model.encoder_weights=null,
data.image_size=128, optim.epochs=8 (see DEMO_DEFAULTS in lesionseg/train/demo.py).

exit status: 0 done, 2 bad config/input, 75 stopped by Ctrl-C (SIGINT), SIGTERM or SIGUSR1
after saving a state (rerun the same command to resume; a second Ctrl-C quits at once without
saving; a rank stuck waiting for a rank that stopped answering ends after train.stop_grace_s
with no progress, without saving), 1 other failure (a data worker or another rank died or stopped
answering: data.worker_timeout_s, train.collective_timeout_s)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lesionseg train` / `jobs/train.py`."""
    parser.description = (
        "Train the MobileNetV2 encoder-decoder on packed WebDataset shards with Accelerate: one "
        "CPU, one GPU or many (use `accelerate launch` for several processes). Without "
        "data.shards it builds a small synthetic demo set and trains on it.")
    parser.epilog = EPILOG
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML file with config sections (data:, model:, optim:, train:, …)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. optim.lr=0.0005 data.batch_size=16")


def command(args: argparse.Namespace) -> int:
    """Run the train job; returns the exit status (0, or EXIT_RESUME after a stop signal).
    The config and the encoder weights file are checked before any rank, worker or decode
    starts."""
    cfg = load_config(args.config, args.overrides)
    check_output_dir(cfg.train.output_dir, "train.output_dir")
    demo = cfg.data.shards is None
    if demo:
        apply_demo_defaults(cfg, args.config, args.overrides)
    check_encoder_weights(cfg.model.encoder_weights)
    relaunched = maybe_relaunch_cpu_ranks(cfg.train.stop_grace_s)
    if relaunched is not None:
        return relaunched
    if not was_set("train.mixed_precision", args.config, args.overrides):
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
        if launcher in ("fp16", "bf16"):  # `accelerate launch --mixed_precision X` as the default
            cfg.train.mixed_precision = launcher
    if cfg.data.folds:
        return train_folds(cfg, demo=demo)
    return train(cfg, demo=demo)
