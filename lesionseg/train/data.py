"""The shards a run trains and validates on: the manifest's train and val shards, or a fold
of their cases (data.folds=K)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from lesionseg.data.folds import fold_split
from lesionseg.data.shard_format import read_manifest, shard_keys, split_urls
from lesionseg.errors import DataError
from lesionseg.train import LOGGER

log = logging.getLogger(LOGGER)


@dataclass(frozen=True)
class DataPlan:
    """The shard folder, its train/val shard paths and counts (from manifest.json). A fold of
    a cross-validation reads the train and val shards for both, keeping only `train_ids` /
    `val_ids` (None: every sample of the shards)."""

    folder: str
    train_urls: tuple[str, ...]
    val_urls: tuple[str, ...]
    train_count: int
    val_count: int
    max_side: int = 0  # pack.max_side the shards were packed with (0: original sizes)
    train_ids: frozenset[str] | None = None
    val_ids: frozenset[str] | None = None


def plan_data(folder: str, folds: int = 0, fold: int = 0, fold_seed: int = 0) -> DataPlan:
    """Read the manifest and check that train and val shards exist; errors name the folder.
    With `folds` > 0: fold `fold` of the train + val cases is validated on, the rest trained on
    (lesionseg.data.folds)."""
    if Path(folder).is_file():
        raise DataError(f"data.shards={folder}: a file, not a packed shard folder; pack it "
                        f"first: python jobs/pack.py --source {folder} --out shards/NAME, then "
                        "data.shards=shards/NAME")
    if not Path(folder).is_dir():
        raise DataError(f"data.shards={folder}: folder not found (pack one with jobs/pack.py)")
    manifest = read_manifest(folder)
    counts = {s: int(manifest["splits"][s].get("count", 0)) for s in ("train", "val")}
    urls = {s: tuple(split_urls(folder, s)) for s in ("train", "val")}
    for split in ("train", "val"):
        if (counts[split] == 0 or not urls[split]) and not (split == "val" and folds):
            hint = (" (pack with pack.val_fraction > 0, or cross-validate: data.folds=K)"
                    if split == "val" else "")
            raise DataError(f"data.shards={folder}: no {split} samples in its manifest{hint}")
        for url in urls[split]:
            if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
                raise DataError(f"{url}: shard listed in {folder}/manifest.json is missing")
    stored = int(manifest.get("options", {}).get("max_side") or 0)
    if folds:
        return plan_fold(folder, urls["train"] + urls["val"], stored, folds, fold, fold_seed)
    return DataPlan(folder, urls["train"], urls["val"], counts["train"], counts["val"], stored)


def plan_fold(folder: str, urls: tuple[str, ...], max_side: int, folds: int, fold: int,
              seed: int) -> DataPlan:
    """Fold `fold` of the cases in `urls` (every train and val shard): its ids validate, the
    other folds' train."""
    ids = shard_keys(urls)
    if len(set(ids)) < folds:
        raise DataError(f"data.shards={folder}: {len(set(ids))} train + val cases cannot make "
                        f"data.folds={folds} folds")
    train_ids, val_ids = fold_split(ids, folds, fold, seed)
    return DataPlan(folder, urls, urls, len(train_ids), len(val_ids), max_side,
                    train_ids, val_ids)


def check_stored_size(data: DataPlan, image_size: int) -> None:
    """Warn when the shards were packed too small for data.image_size: every crop would be
    upsampled (blurred) before the network sees it."""
    if data.max_side and data.max_side * 3 < image_size * 4:
        log.warning("data.image_size=%d but %s was packed at pack.max_side=%d: whole-image crops "
                    "are upsampled; re-pack with pack.max_side >= %d for full detail",
                    image_size, data.folder, data.max_side, math.ceil(image_size * 4 / 3))
