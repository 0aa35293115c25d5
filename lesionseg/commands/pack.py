"""`lesionseg pack` / `jobs/pack.py` and `lesionseg verify`: the shard commands' arguments
and runs (lesionseg.data.shards packs and verifies)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lesionseg.config import Config, PackConfig, load_config, save_config
from lesionseg.data.shard_format import SPLITS, read_manifest
from lesionseg.data.shards import pack, summary
from lesionseg.data.verify import verify
from lesionseg.errors import EXIT_FAILED, EXIT_OK


def add_pack_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lesionseg pack` / jobs/pack.py; option defaults come from the config."""
    d = PackConfig()
    parser.description = (
        "Pack ISIC 2016 Part 1 data into WebDataset shards: train/val/test tar files plus "
        "manifest.json (written last). Training cases are split into train/val by a hash of "
        "(seed, id); the official test set stays test. Precedence: defaults < --config file < "
        "key=value overrides < the options below.")
    parser.add_argument("--source", action="append", required=True, metavar="PATH",
                        help="an ISIC root folder, an official zip (e.g. "
                             "ISBI2016_ISIC_Part1_Training_Data.zip), or an image or mask folder; "
                             "repeat for several. Prefix test= to treat a plain folder as test data")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder, e.g. shards/isic2016 (old shards there are replaced)")
    parser.add_argument("--val-fraction", type=float,
                        help=f"fraction of training cases held out as val (default {d.val_fraction})")
    parser.add_argument("--seed", type=int, help=f"seed of the train/val split (default {d.split_seed})")
    parser.add_argument("--max-side", type=int,
                        help=f"store images with at most this longest side; 0 keeps the original "
                             f"JPEG bytes where possible (default {d.max_side})")
    parser.add_argument("--jpeg-quality", type=int,
                        help=f"quality of re-encoded JPEGs (default {d.jpeg_quality})")
    parser.add_argument("--shard-max-samples", type=int,
                        help=f"at most this many samples per shard (default {d.shard_max_samples})")
    parser.add_argument("--shard-max-bytes", type=int,
                        help=f"at most about this many bytes per shard (default {d.shard_max_bytes})")
    parser.add_argument("--workers", type=int,
                        help=f"encoding worker processes (default {d.workers})")
    parser.add_argument("--on-error", choices=("raise", "skip"),
                        help="bad case: stop naming the files (raise, default) or leave it out "
                             "and print a report (skip)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--config", metavar="FILE", help="YAML config file (its pack: section)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. pack.shard_max_samples=200")


_FLAG_KEYS = {"val_fraction": "val_fraction", "seed": "split_seed", "max_side": "max_side",
              "jpeg_quality": "jpeg_quality", "shard_max_samples": "shard_max_samples",
              "shard_max_bytes": "shard_max_bytes", "workers": "workers", "on_error": "on_error"}


def pack_config_from_args(args: argparse.Namespace) -> Config:
    """Defaults <- --config <- key=value <- explicit flags, validated (ConfigError names the key)."""
    overrides = list(args.overrides or [])
    for attr, key in _FLAG_KEYS.items():
        value = getattr(args, attr)
        if value is not None:
            overrides.append(f"pack.{key}={value}")
    return load_config(args.config, overrides)


def pack_command(args: argparse.Namespace) -> int:
    """Run the pack job and print its summary."""
    cfg = pack_config_from_args(args)
    out = Path(args.out)
    manifest = pack(args.source, out, cfg.pack, progress=not args.no_progress)
    save_config(cfg, out / "config.yaml")
    print(summary(manifest, out, cfg.pack.workers))
    return EXIT_OK


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lesionseg verify`."""
    parser.description = (
        "Check a packed shard folder against its manifest.json: every shard present with its "
        "size, sha256 and sample count, split counts consistent, no unlisted shards. Exit 1 and "
        "name each problem if anything is wrong.")
    parser.add_argument("folder", metavar="FOLDER", help="packed folder, e.g. shards/isic2016")
    parser.add_argument("--decode", action="store_true",
                        help="also decode every sample (image readable, mask binary and aligned)")


def verify_command(args: argparse.Namespace) -> int:
    """Run verify: print problems (one a line) or a one-line OK."""
    problems = verify(args.folder, decode=args.decode)
    manifest = read_manifest(args.folder)
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        print(f"{args.folder}: {len(problems)} problem(s)")
        return EXIT_FAILED
    counts = ", ".join(f"{s} {manifest['splits'][s]['count']}" for s in SPLITS)
    print(f"OK {args.folder}: {len(manifest['shards'])} shards, {manifest['total_samples']} "
          f"samples ({counts}) match the manifest")
    return EXIT_OK
