"""The training job: `accelerate launch jobs/train.py [--config FILE] [key=value …]`.

One file, read top to bottom: command line → data pipeline → model and optimizer → the loop
(like the Accelerate examples: `prepare`, `accumulate`, `backward`, `save_state`) → outputs.
The same code runs on one CPU, one GPU, or many GPUs on many nodes.

Data (WebDataset shards, see shards/README.md):
- Training: every rank reads its own endless, seeded stream of shards (a fresh permutation of
  all train shards per cycle, dealt round-robin to the world's `world × num_workers` "lanes")
  through a seeded shuffle buffer, and yields exactly `steps_per_epoch × grad_accum_steps`
  micro-batches per epoch, batched inside the DataLoader workers; so no rank ever waits on
  another, whatever the shard count. Lane l of rank r in epoch e is fully determined by
  (train.seed, e, r, l), and each augmentation by (seed, e, r, l, position, sample id).
- Memory (`data.cache`, lesionseg/data/memory.py): when the augmentation is flips and colour
  only, the train set is decoded once and each epoch is a seeded permutation of it
  (`CachedTrainEpoch`, no workers); val batches are kept after the first validation.
- The WebDataset loader is NOT given to `accelerator.prepare` (it would re-split or dispatch
  the already rank-split stream); batches are moved to the device here.
- Validation: every val sample exactly once whatever the world size (sample i goes to lane
  i mod lanes), per-image confusion counts gathered with their ids after the loop, deduplicated,
  then averaged. Scored at data.image_size: the whole image resized (`eval_transform`, as
  inference does), the mask with nearest; inference scores at the original size instead.

Resume (`train.resume=auto|none|PATH`, lesionseg/states.py): states are written with
`accelerator.save_state` to `<output_dir>/states/.tmp-step-N`, then renamed to `step-N`, so a
kill leaves only complete states; the newest `train.keep_states` are kept. A state holds
model, optimizer, RNG, the scheduler and a `Progress` (epoch, micro-batch, optimizer step,
best metric) as JSON, and a marker with every file's size and sha256; a damaged newest state
is skipped for the next one, and no state file is unpickled beyond weights_only. On resume
the epoch's pipeline is rebuilt and each worker skips the raw samples of the batches already
done before decoding them. With the same world size, batch size, data.num_workers, grad accumulation and
train.num_threads (torch CPU threads; set it > 0 for exactness on CPU), a CPU run killed
at any moment and resumed ends with bit-identical weights (tested). On GPU,
train.deterministic=true is needed too (not verified: no GPU here). Each state's progress also
holds the settings an exact resume needs (`resume_settings`): a resume with others is refused
unless train.resume_with_changes; raising optim.max_steps/epochs extends a finished run.

Signals: SIGTERM or SIGUSR1 asks to stop; ranks agree at the next optimizer-step boundary
(one tiny all-reduce per step, which also carries "my data failed", so no rank is ever left
waiting in a collective), save a state and exit with status 75 (`EXIT_RESUME`: rerun/requeue
the same command). Each rank exits 75; torchrun/accelerate launch then report a failure
(status 1) themselves. DataLoader workers ignore both signals (see `_WorkerSignals`).

Cross-validation (data.folds=K, `train_folds`): fold I of the train + val cases
(lesionseg.data.folds) is held out for validation and the rest trained on, in
<train.output_dir>/fold-I/ as an ordinary run (resume, signals and all); data.fold=all trains
the folds one after another. Each fold ends by predicting its held-out cases
(lesionseg.crossval.predict_held_out) and the command that completes the set pools them.

Outputs in train.output_dir: config.yaml (at start), best.pt (the weights to use: the final
ones, or with train.select=best those of the best val train.best_metric),
last.pt (end), metrics.jsonl (one line per validation), states/, W&B files (tracking.py).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import signal
import tarfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lesionseg import states
from lesionseg.config import Config, ConfigError, load_config, save_config, to_dict, was_set
from lesionseg.crossval import evaluate_when_complete, predict_held_out
from lesionseg.data.folds import fold_dir, fold_split, parse_fold
from lesionseg.data.memory import (
    CachedSamples,
    CachedTrainEpoch,
    ValBatches,
    fits,
    sample_bytes,
    train_cacheable,
)
from lesionseg.data.transforms import (
    AugmentParams,
    apply_augmentation,
    draw_augmentation,
    eval_transform,
    generator_for,
    stack_images,
    to_float_images,
)
from lesionseg.errors import EXIT_OK, EXIT_RESUME, UserError, first_line
from lesionseg.files import check_output_dir
from lesionseg.launch import maybe_relaunch_cpu_ranks, requested_cpu_processes  # noqa: F401
from lesionseg.recipe import resolve as resolve_recipe
from lesionseg.tuning import tune_checkpoint
from lesionseg.workers import WorkerInit

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# A lane that reads this many shards in a row without one sample gives up (all bad or empty).
MAX_EMPTY_SHARDS = 64

# Demo defaults, applied when data.shards is null and the user did not set the key.
DEMO_DEFAULTS: dict[str, Any] = {
    "model.encoder_weights": None,  # offline machine: no ImageNet weights
    "data.image_size": 128,
    "data.batch_size": 8,
    "optim.epochs": 8,
    "train.val_every_steps": 0,
    "train.log_every_steps": 10,
}
DEMO_SOURCE_SIDES = (160, 480)  # min/max longest side of the demo's synthetic images
DEMO_PACK_MAX_SIDE = 320  # demo images are stored at most this large

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
  train.output_dir=runs/demo  train.resume=auto|none|STATE_DIR (none moves an old run aside)
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
data.image_size=128, optim.epochs=8 (see DEMO_DEFAULTS in training.py).

exit status: 0 done, 2 bad config/input, 75 stopped by SIGTERM/SIGUSR1 after saving a
state (rerun the same command to resume), 1 other failure."""


class TrainingError(UserError):
    """Training cannot go on (non-finite losses, another rank failed); the message says why."""


class DataError(UserError, ValueError):
    """A bad shard or sample met while training; the message names it."""


# ============================================================================ command line


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
    """Run the train job; returns the exit status (0, or EXIT_RESUME after a stop signal)."""
    maybe_relaunch_cpu_ranks()
    cfg = load_config(args.config, args.overrides)
    check_output_dir(cfg.train.output_dir, "train.output_dir")
    demo = cfg.data.shards is None
    if demo:
        apply_demo_defaults(cfg, args.config, args.overrides)
    if not was_set("train.mixed_precision", args.config, args.overrides):
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
        if launcher in ("fp16", "bf16"):  # `accelerate launch --mixed_precision X` as the default
            cfg.train.mixed_precision = launcher
    if cfg.data.folds:
        return train_folds(cfg, demo=demo)
    return train(cfg, demo=demo)


def train_folds(cfg: Config, demo: bool = False) -> int:
    """data.folds=K: train the fold(s) data.fold names (all: one after another, each resumed
    where it stands) into <train.output_dir>/fold-I/; the last fold to finish evaluates the
    cross-validation (lesionseg.crossval). Returns the first non-zero status (EXIT_RESUME
    after a stop signal: rerun the same command)."""
    from lesionseg.tracking import cross_validation_group

    root = Path(cfg.train.output_dir)
    name = cfg.tracking.run_name or root.resolve().name
    folds = parse_fold(cfg.data.fold, cfg.data.folds)
    for fold in folds:
        fold_cfg = copy.deepcopy(cfg)
        fold_cfg.data.fold = str(fold)
        fold_cfg.train.output_dir = str(fold_dir(root, fold))
        fold_cfg.tracking.group = cross_validation_group(root, cfg)  # W&B: one group per run
        fold_cfg.tracking.run_name = f"{name}-fold-{fold}"
        log.info("cross-validation %s: fold %d of %d (%s)", root, fold, cfg.data.folds,
                 "every fold, one after another" if len(folds) > 1 else "this fold only")
        status = train(fold_cfg, demo=demo)
        if status != EXIT_OK:
            return status
    from accelerate import PartialState

    if PartialState().is_main_process:  # the command that completes the folds pools them all
        evaluate_when_complete(root, cfg)
    return EXIT_OK


def apply_demo_defaults(cfg: Config, config_file: str | None, overrides: list[str]) -> None:
    """Demo settings for every key in DEMO_DEFAULTS that the user did not set."""
    for key, value in DEMO_DEFAULTS.items():
        if not was_set(key, config_file, overrides):
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)


# ============================================================================ data


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
    from lesionseg.data.shards import read_manifest, split_urls

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
    from lesionseg.data.shards import shard_keys

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


_WARNED_SHARDS: set[str] = set()


def read_shard(url: str, on_error: str,
               ids: frozenset[str] | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (`__key__`, `__url__`, ext → bytes) of one shard, streamed with WebDataset's
    tar reader; with `ids`, only the samples whose key is one of them (a fold's). A corrupt
    shard is a DataError naming it, or (on_error=skip) a warning and the end of that shard."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_expander

    from lesionseg.data.shards import listed_samples

    stream = None
    try:
        stream = gopen(url)
        read = 0
        for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
            read += 1
            if ids is None or sample["__key__"] in ids:
                yield sample
        listed = listed_samples(url)
        if listed is not None and read != listed:  # tarfile stops silently at a bad header
            raise tarfile.ReadError(f"{read} of the {listed} samples its manifest lists could "
                                    "be read (a damaged tar header?)")
    except MemoryError:
        raise  # not the shard's fault (e.g. data.batch_size or data.shuffle_buffer too large)
    except Exception as e:  # tarfile, OS, zlib and webdataset errors come in many types
        msg = f"{url}: corrupt or unreadable shard ({type(e).__name__}: {first_line(e)})"
        if on_error != "skip":
            raise DataError(msg + "; repack it, or set data.on_error=skip") from None
        if url not in _WARNED_SHARDS:  # a lane may come back to it every cycle: warn once
            _WARNED_SHARDS.add(url)
            log.warning("%s; skipping the rest of this shard (every time it is read)", msg)
    finally:
        if stream is not None:
            stream.close()


def lane_shards(urls: tuple[str, ...], seed: int, epoch: int, lane: int,
                lanes: int) -> Iterator[str]:
    """Endless shard sequence of one lane: each cycle is a seeded permutation of all shards,
    dealt round-robin to the `lanes` lanes, so lanes read distinct shards where there are
    enough of them and every shard is read about equally often."""
    position = 0
    for cycle in itertools.count():
        order = list(urls)
        random.Random(f"{seed}/{epoch}/{cycle}").shuffle(order)
        for url in order:
            if position % lanes == lane:
                yield url
            position += 1


def lane_samples(urls: tuple[str, ...], seed: int, epoch: int, lane: int, lanes: int,
                 on_error: str, ids: frozenset[str] | None = None) -> Iterator[dict[str, Any]]:
    """The endless raw-sample stream of a lane (shards in `lane_shards` order; with `ids`,
    only those samples)."""
    empty = 0
    for url in lane_shards(urls, seed, epoch, lane, lanes):
        n = 0
        for sample in read_shard(url, on_error, ids):
            n += 1
            yield sample
        empty = 0 if n else empty + 1
        if empty >= MAX_EMPTY_SHARDS:
            raise DataError(f"{len(urls)} train shard(s) starting with {urls[0]}: "
                            f"{MAX_EMPTY_SHARDS} shards in a row gave no sample")


def shuffled(samples: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """A seeded shuffle buffer: fill `size` items, then emit a random one per new item."""
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def _augmented(raw: dict[str, Any], params: AugmentParams, g: torch.Generator,
               soft: bool = False) -> tuple[str, torch.Tensor, torch.Tensor]:
    """A training sample: the augmentation is drawn from the stored size (header only), then
    the JPEG is decoded at the smallest DCT scale that still holds the drawn crop at full
    resolution, and warped once."""
    from lesionseg.data.shards import decode_sample, raw_image_size

    height, width = raw_image_size(raw)
    aug = draw_augmentation(height, width, params, g)
    sample = decode_sample(raw, draft_size=aug.decode_size())
    image, mask = apply_augmentation(sample.image, sample.mask, aug, soft)
    return sample.id, image, mask


def _evaluated(raw: dict[str, Any], size: int,
               soft: bool = False) -> tuple[str, torch.Tensor, torch.Tensor]:
    """A validation sample: the whole image resized to size×size (`eval_transform`)."""
    from lesionseg.data.shards import decode_sample

    sample = decode_sample(raw, min_size=size)
    image, mask = eval_transform(sample.image, sample.mask, size, soft)
    return sample.id, image, mask


def _prepare(make: Callable[[], tuple[str, torch.Tensor, torch.Tensor]], on_error: str,
             skipped: list[str]) -> tuple[str, torch.Tensor, torch.Tensor] | None:
    """Decode and transform one raw sample: (id, image, mask). A bad sample raises DataError,
    or with data.on_error=skip is recorded in `skipped` and gives None."""
    try:
        return make()
    except (UserError, OSError, ValueError) as e:
        if on_error != "skip":
            raise DataError(f"{first_line(e)} (set data.on_error=skip to skip bad "
                            "samples)") from None
        skipped.append(first_line(e))
        return None


def _collate(ids: list[str], images: list[torch.Tensor], masks: list[torch.Tensor],
             skipped: list[str]) -> dict[str, Any]:
    """uint8 images stacked channels_last (float conversion happens on the device), masks."""
    return {"id": ids, "image": stack_images(images), "mask": torch.stack(masks),
            "skipped": skipped}


class TrainStream(IterableDataset):
    """One rank's micro-batches of one epoch, `start` … `batches - 1`, built inside workers.

    Batch i comes from lane i mod W (W = DataLoader workers, ≥ 1) as that lane's (i // W)-th
    batch; DataLoader worker w yields the batches i ≡ start + w (mod W), which is exactly the
    order the DataLoader hands them out in. Skipped batches are skipped as raw bytes.
    """

    def __init__(self, urls: tuple[str, ...], cfg: Config, epoch: int, rank: int, world: int,
                 batches: int, start: int = 0, ids: frozenset[str] | None = None) -> None:
        super().__init__()
        self.urls, self.epoch, self.rank, self.world, self.ids = urls, epoch, rank, world, ids
        self.batches, self.start = batches, start
        self.seed, self.batch_size = cfg.train.seed, cfg.data.batch_size
        self.buffer, self.on_error = cfg.data.shuffle_buffer, cfg.data.on_error
        self.augment = AugmentParams.from_config(cfg.data)
        self.soft = cfg.data.soft_masks

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        first = self.start + worker
        if first >= self.batches:
            return
        lane = first % workers
        lane_id = self.rank * workers + lane
        stream = shuffled(
            lane_samples(self.urls, self.seed, self.epoch, lane_id, self.world * workers,
                         self.on_error, self.ids),
            self.buffer, random.Random(f"{self.seed}/{self.epoch}/{lane_id}/shuffle"))
        numbered = enumerate(stream)
        skip = (first // workers) * self.batch_size
        if skip:
            next(itertools.islice(numbered, skip - 1, skip), None)
        for _ in range(first, self.batches, workers):
            items = list(itertools.islice(numbered, self.batch_size))
            yield self._batch(items, lane_id)

    def _batch(self, items: list[tuple[int, dict[str, Any]]], lane_id: int) -> dict[str, Any]:
        """Decode and augment; with on_error=skip a bad sample's slot is refilled with a good
        sample of the same batch (deterministic, and every batch keeps its size)."""
        ids, images, masks, skipped = [], [], [], []
        for index, raw in items:
            g = generator_for(self.seed, self.epoch, lane_id, index, raw.get("__key__"))
            done = _prepare(lambda raw=raw, g=g: _augmented(raw, self.augment, g, self.soft),
                            self.on_error, skipped)
            if done is None:
                continue
            ids.append(done[0])
            images.append(done[1])
            masks.append(done[2])
        if not ids:
            raise DataError(f"every sample of a training batch was bad, e.g. {skipped[0]}")
        for k in range(len(items) - len(ids)):
            ids.append(ids[k])
            images.append(images[k])
            masks.append(masks[k])
        return _collate(ids, images, masks, skipped)


class ValStream(IterableDataset):
    """A rank's share of the val samples, each exactly once: sample i (counted over the val
    shards in order) belongs to lane i mod (world × workers). Yields eval-transformed batches."""

    def __init__(self, urls: tuple[str, ...], cfg: Config, rank: int, world: int,
                 soft: bool = False, ids: frozenset[str] | None = None) -> None:
        super().__init__()
        self.urls, self.rank, self.world, self.soft, self.ids = urls, rank, world, soft, ids
        self.size, self.batch_size = cfg.data.image_size, cfg.data.batch_size
        self.on_error = cfg.data.on_error

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        lane, lanes = self.rank * workers + worker, self.world * workers
        ids, images, masks, skipped = [], [], [], []
        position = 0
        for url in self.urls:
            for raw in read_shard(url, self.on_error, self.ids):
                mine = position % lanes == lane
                position += 1
                if not mine:
                    continue
                done = _prepare(lambda raw=raw: _evaluated(raw, self.size, self.soft),
                                self.on_error, skipped)
                if done is None:
                    continue
                ids.append(done[0])
                images.append(done[1])
                masks.append(done[2])
                if len(ids) == self.batch_size:
                    yield _collate(ids, images, masks, skipped)
                    ids, images, masks, skipped = [], [], [], []
        if ids or skipped:
            yield (_collate(ids, images, masks, skipped) if ids
                   else {"id": [], "image": None, "mask": None, "skipped": skipped})


class _WorkerSignals:
    """DataLoader `worker_init_fn`: workers ignore SIGUSR1, and SIGTERM until released.

    A stop signal sent to the whole process group (Slurm does) must not kill the workers: the
    main process decides when to stop, and a dead worker would make PyTorch raise in the
    main process at a random point (its SIGCHLD handler). But workers that ignore SIGTERM for
    good could not be terminated at shutdown, so `release` (set when their loader is closed
    and at interpreter exit) makes SIGTERM end them again.
    """

    def __init__(self, release: Any) -> None:
        self.release = release

    def __call__(self, _worker_id: int) -> None:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, _signum: int, _frame: Any) -> None:
        if self.release.is_set():
            os._exit(0)


_OPEN_LOADERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _release_all_workers() -> None:
    """At exit, before multiprocessing terminates the workers, let SIGTERM end them."""
    for loader in list(_OPEN_LOADERS):
        loader.release_workers()


class Loader:
    """A DataLoader over an already-batched iterable (batch_size=None) whose workers are shut
    down by `close()` (use it as a context manager), also when an error is on its way up."""

    def __init__(self, dataset: IterableDataset, cfg: Config, device: torch.device) -> None:
        workers = cfg.data.num_workers
        self._release = multiprocessing.Event() if workers else None
        self.loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                                 pin_memory=cfg.data.pin_memory and device.type == "cuda",
                                 worker_init_fn=WorkerInit(_WorkerSignals(self._release))
                                 if workers else None,
                                 prefetch_factor=2 if workers else None, persistent_workers=False)
        self._iterator: Any = None
        _OPEN_LOADERS.add(self)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._iterator = iter(self.loader)
        return self._iterator

    def release_workers(self) -> None:
        if self._release is not None:
            self._release.set()

    def close(self) -> None:
        """Stop the workers now (PyTorch would only do it when the iterator is collected)."""
        self.release_workers()
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        _OPEN_LOADERS.discard(self)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def worker_error(e: BaseException) -> str:
    """One line from an exception that may carry a DataLoader worker's whole traceback."""
    text = str(e)
    if "Original Traceback" in text:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else text
        head, sep, tail = last.partition(": ")
        return tail if sep and "." in head and " " not in head else last
    return first_line(e)


@dataclass
class Memory:
    """What `data.cache` holds in memory for a run (lesionseg/data/memory.py): the decoded
    train set (None: train streams from the shards) and the val batches."""

    train: CachedSamples | None
    val: ValBatches
    why: str  # why the train set is (not) in memory
    seconds: float = 0.0  # spent decoding it

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.train is None:
            text = f"train images streamed from the shards ({self.why})"
        else:
            mb = len(self.train) * sample_bytes(self.train.images[0].shape[-1]) / 2**20
            text = (f"{len(self.train)} train images decoded once into memory ({mb:.0f} MB in "
                    f"{self.seconds:.1f} s; {self.why}): each epoch only draws their order, "
                    "flips and colour")
        return text + ("; val batches kept after the first validation" if self.val.enabled
                       else "")

    def train_epoch(self, cfg: Config, accelerator: Any, epoch: int, batches: int,
                    start: int) -> CachedTrainEpoch:
        assert self.train is not None
        return CachedTrainEpoch(self.train, AugmentParams.from_config(cfg.data), cfg.train.seed,
                                epoch, accelerator.process_index, accelerator.num_processes,
                                cfg.data.batch_size, batches, start,
                                pin_memory=cfg.data.pin_memory and
                                accelerator.device.type == "cuda")


def plan_memory(cfg: Config, data: DataPlan) -> Memory:
    """Decide (and load) what data.cache keeps in memory: the val batches when they fit
    in data.cache_max_mb, and the train set too when its augmentation is flips and colour
    only and train + val fit."""
    d = cfg.data
    if not d.cache:
        return Memory(None, ValBatches(False), "data.cache=false")
    val = ValBatches(fits(data.val_count, d.image_size, d.cache_max_mb))
    if not train_cacheable(AugmentParams.from_config(d)):
        return Memory(None, val, "its augmentation crops or rotates")
    if not fits(data.train_count + data.val_count, d.image_size, d.cache_max_mb):
        need = (data.train_count + data.val_count) * sample_bytes(d.image_size) / 2**20
        return Memory(None, val, f"{need:.0f} MB would exceed data.cache_max_mb="
                                 f"{d.cache_max_mb}")
    started = time.perf_counter()
    try:
        with Loader(ValStream(data.train_urls, cfg, 0, 1, soft=d.soft_masks,
                              ids=data.train_ids), cfg,
                    torch.device("cpu")) as loader:
            samples = CachedSamples.from_batches(loader)
    except MemoryError:
        raise
    except Exception as e:  # a worker's error arrives with its traceback inside: one line
        if not isinstance(e, UserError):
            log.exception("reading the training data failed")
        raise DataError(worker_error(e)) from None
    for msg in samples.skipped:
        log.warning("skipped a bad training sample: %s", msg)
    if not samples.ids:
        raise DataError(f"data.shards={data.folder}: no readable train sample")
    return Memory(samples, val, "the augmentation is flips and colour only",
                  time.perf_counter() - started)


# ============================================================================ schedule


@dataclass(frozen=True)
class Schedule:
    """Optimizer steps per epoch, total steps and epochs, and the micro-batches per epoch."""

    steps_per_epoch: int
    total_steps: int
    epochs: int
    accum: int

    def micro_batches(self, step: int, micro: int = 0) -> int:
        """Micro-batches each rank runs in the epoch that stands at optimizer step `step`,
        `micro` micro-batches in: a full epoch, or fewer when the run ends sooner. Counted
        from where the epoch stands, not from epoch × steps_per_epoch, so that a run extended
        after a cut-short last epoch (optim.max_steps raised) goes on with full epochs."""
        steps = min(self.steps_per_epoch, micro // self.accum + self.total_steps - step)
        return max(0, steps) * self.accum


def plan_schedule(cfg: Config, train_count: int, world: int) -> Schedule:
    """Steps per epoch from the train count (or optim.steps_per_epoch), total from epochs or
    optim.max_steps (which wins when > 0)."""
    o = cfg.optim
    if cfg.data.batch_size > train_count:  # a worker would collect repeats until MemoryError
        raise DataError(f"data.batch_size={cfg.data.batch_size} is more than the {train_count} "
                        f"train samples of data.shards={cfg.data.shards}; use at most "
                        f"{train_count}")
    per_step = cfg.data.batch_size * world * o.grad_accum_steps
    spe = o.steps_per_epoch or max(1, math.ceil(train_count / per_step))  # every image once
    total = o.max_steps if o.max_steps > 0 else o.epochs * spe
    return Schedule(spe, total, math.ceil(total / spe), o.grad_accum_steps)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` optimizer steps, then cosine from 1 to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ============================================================================ model, optimizer


def build_model(cfg: Config) -> torch.nn.Module:
    """The encoder-decoder of the config (frozen encoder if asked), channels_last if asked."""
    from lesionseg.model import MobileNetEncoderDecoder

    model = MobileNetEncoderDecoder(encoder_weights=cfg.model.encoder_weights,
                                    freeze_encoder=cfg.model.freeze_encoder,
                                    decoder_channels=tuple(cfg.model.decoder_channels))
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with two groups: decoder at optim.lr, encoder at optim.lr × encoder_lr_mult.
    Frozen encoder parameters stay in their group; without gradients AdamW leaves them alone."""
    o = cfg.optim
    groups = [{"params": list(model.decoder_parameters()), "lr": o.lr, "name": "decoder"},
              {"params": list(model.encoder_parameters()), "lr": o.lr * o.encoder_lr_mult,
               "name": "encoder"}]
    return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)


# ============================================================================ progress, states


@dataclass
class Progress:
    """Where training stands; saved as JSON with every state (lesionseg.states)."""

    epoch: int = 0  # current epoch
    micro: int = 0  # micro-batches of this epoch already done (a multiple of grad_accum_steps)
    step: int = 0  # optimizer steps done
    best: float = -math.inf  # best validation train.best_metric so far
    best_step: int = -1
    bad_steps: int = 0  # non-finite losses in a row
    extra: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, value)


# Settings a state can only resume exactly with: everything that shapes the data stream, the
# model, the loss and the optimizer. Not optim.epochs / optim.max_steps (a finished run asked
# for more steps goes on), nor model.encoder_weights (the state holds the weights).
RESUME_FREE_KEYS = {"optim.epochs", "optim.max_steps", "model.encoder_weights", "data.pin_memory",
                    "data.on_error", "data.demo_dir"}
RESUME_SECTIONS = ("data", "model", "loss", "optim")
RESUME_TRAIN_KEYS = ("seed", "mixed_precision", "deterministic", "num_threads", "best_metric")
NEVER_CHANGED_KEYS = ("model.decoder_channels",)  # the saved weights would not fit


def resume_settings(cfg: Config, world: int) -> dict[str, Any]:
    """The settings an exact resume needs unchanged, flat (`data.batch_size` → 8)."""
    tree = to_dict(cfg)
    flat = {f"{s}.{k}": v for s in RESUME_SECTIONS for k, v in tree[s].items()}
    flat.update({f"train.{k}": tree["train"][k] for k in RESUME_TRAIN_KEYS})
    flat["processes"] = world
    return {k: v for k, v in flat.items() if k not in RESUME_FREE_KEYS}


def changed_settings(state: Path, cfg: Config, world: int) -> list[tuple[str, Any, Any]]:
    """(key, the state's value, this run's value) for every resume setting that differs from
    the state's (saved in its progress.json); [] for states of older versions, which lack them."""
    try:
        saved = json.loads((state / states.PROGRESS_FILE).read_text()).get("extra", {}).get("settings")
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict):
        log.warning("%s: written by an older version without its settings; resuming without "
                    "checking that they match", state)
        return []
    now = resume_settings(cfg, world)
    return [(k, saved.get(k), now[k]) for k in now if k in saved and saved[k] != now[k]]


def check_resume(state: Path, run_dir: Path, cfg: Config, world: int) -> list[tuple[str, Any, Any]]:
    """Refuse a resume that cannot be exact (naming what differs and the ways out), unless
    train.resume_with_changes; returns what differs."""
    changed = changed_settings(state, cfg, world)
    if not changed:
        return []
    what = ", ".join(f"{k}={new} (was {old})" for k, old, new in changed)
    never = [k for k, _, _ in changed if k in NEVER_CHANGED_KEYS]
    if never:
        raise ConfigError(f"{run_dir}: its state {state.name} cannot be resumed with {what}: the "
                          "weights would not fit; use a new train.output_dir, or train.resume=none "
                          "to start over in this folder")
    if not cfg.train.resume_with_changes:
        raise ConfigError(f"{run_dir}: its state {state.name} was trained with other settings "
                          f"({what}), so it cannot resume exactly; use a new train.output_dir, or "
                          "train.resume=none to start over in this folder (the old run is moved "
                          "aside), or train.resume_with_changes=true to go on from its weights "
                          "with the new settings")
    log.warning("resuming %s with changed settings (%s): not an exact resume; the current "
                "epoch starts again", state, what)
    return changed


def set_aside_previous_run(run_dir: Path) -> Path | None:
    """train.resume=none in a folder holding a run: move its states, weights, config, metrics
    and W&B id into `replaced-<time>/`, so that nothing of it is resumed or mistaken for the
    new run's. Main process only."""
    names = (states.STATES, "best.pt", "last.pt", "config.yaml", METRICS_FILE, "wandb_run_id",
             "wandb_segments")
    present = [run_dir / n for n in names if (run_dir / n).exists()]
    if not any(p.name in (states.STATES, "best.pt", "last.pt") for p in present):
        return None
    aside = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for p in present:
        os.replace(p, aside / p.name)
    log.warning("train.resume=none: the run that was in %s is moved to %s", run_dir, aside)
    return aside


# ============================================================================ signals, agreement


class StopFlag:
    """Set by SIGTERM/SIGUSR1; the loop stops at the next optimizer-step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def is_set(self) -> bool:
        return self.signal is not None


def agree(accelerator: Any, *flags: bool) -> list[bool]:
    """Whether any rank has each flag set (one tiny all-reduce; free with one process)."""
    if accelerator.num_processes == 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=accelerator.device)
    t = accelerator.reduce(t, reduction="sum")
    return [bool(v > 0) for v in t.tolist()]


# ============================================================================ validation


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def validation_counts(model: torch.nn.Module, loader: Any, device: torch.device,
                      precision: str = "no", keep_images: int = 0,
                      channels_last: bool = True) -> tuple[list[tuple[str, list[int]]], list, int]:
    """(id, [tp, fp, fn, tn]) for every sample of the loader, the first `keep_images`
    (id, image, prediction, truth) for overlays, and the number of skipped samples.
    Prediction = logit > 0 (probability > 0.5), at the loader's resolution."""
    from lesionseg.metrics import confusion_counts

    results: list[tuple[str, list[int]]] = []
    kept: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    skipped = 0
    model.eval()
    with torch.no_grad():
        for batch in loader:
            skipped += len(batch["skipped"])
            for msg in batch["skipped"]:
                log.warning("skipped a bad val sample: %s", msg)
            if not batch["id"]:
                continue
            x = to_float_images(batch["image"].to(device, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            truth = batch["mask"].to(device, non_blocking=True) > 0
            with _autocast(device, precision):
                logits = model(x)
            pred = logits.float() > 0
            counts = confusion_counts(pred, truth).cpu().tolist()
            results.extend(zip(batch["id"], counts, strict=True))
            for i in range(min(len(batch["id"]), keep_images - len(kept))):
                kept.append((batch["id"][i], batch["image"][i], pred[i].cpu(), truth[i].cpu()))
    return results, kept, skipped


def summarize_results(results: list[tuple[str, list[int]]]) -> dict[str, float]:
    """Deduplicate (id, counts) by id and take the macro means (lesionseg.metrics.summarize)."""
    from lesionseg.metrics import summarize

    unique = dict(results)
    ordered = [unique[key] for key in sorted(unique)]  # the same summation order everywhere
    counts = torch.tensor(ordered, dtype=torch.long).reshape(-1, 4)
    return summarize(counts)


def _sync_buffers(accelerator: Any, model: torch.nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics: DDP broadcasts them at the start of each
    forward, so after the last step each rank still holds the ones from its own batch."""
    if accelerator.num_processes > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


def evaluate(accelerator: Any, model: torch.nn.Module, data: DataPlan, cfg: Config,
             val_memory: ValBatches | None = None) -> tuple[dict[str, float], list]:
    """Validate on every val sample exactly once across all ranks; errors on any rank stop
    all ranks (collected before the one gather, so no rank waits on a failed one). With
    `val_memory` enabled, this rank's batches are decoded at the first validation only."""
    from accelerate.utils import gather_object

    net = accelerator.unwrap_model(model)
    _sync_buffers(accelerator, net)
    dataset = ValStream(data.val_urls, cfg, accelerator.process_index, accelerator.num_processes,
                        ids=data.val_ids)
    keep = cfg.tracking.log_images if accelerator.is_main_process else 0
    results, overlays, skipped, error = [], [], 0, None
    try:
        with contextlib.ExitStack() as stack:
            batches: Any = val_memory.batches if val_memory is not None else None
            if batches is None:
                batches = stack.enter_context(Loader(dataset, cfg, accelerator.device))
                if val_memory is not None and val_memory.enabled:
                    batches = val_memory.keep(list(batches))
            results, overlays, skipped = validation_counts(
                net, batches, accelerator.device, cfg.train.mixed_precision, keep,
                cfg.model.channels_last)
    except Exception as e:  # reported to every rank below, then raised
        if not isinstance(e, UserError):
            log.exception("validation failed on rank %d", accelerator.process_index)
            if accelerator.num_processes == 1:
                raise
        error = worker_error(e) if accelerator.num_processes == 1 else \
            f"rank {accelerator.process_index}: {worker_error(e)}"
    finally:
        model.train()
    gathered = gather_object([(results, error, skipped)])
    errors = [err for _, err, _ in gathered if err]
    if errors:
        raise DataError(f"validation failed: {errors[0]}")
    metrics = summarize_results([r for res, _, _ in gathered for r in res])
    metrics["skipped"] = sum(s for _, _, s in gathered)
    if metrics["images"] != data.val_count - metrics["skipped"]:
        log.warning("validated %d images but the manifest lists %d val samples",
                    metrics["images"], data.val_count)
    return metrics, overlays


def evaluate_checkpoint(checkpoint: str | Path, shards: str | Path | None = None,
                        image_size: int | None = None, batch_size: int = 8,
                        num_workers: int = 0) -> dict[str, float]:
    """Val metrics of a best.pt/last.pt in ONE process (the reference the distributed
    validation must match). shards/image_size default to the checkpoint's config."""
    from lesionseg.checkpoint import build_model_from_checkpoint

    model, cfg, _ = build_model_from_checkpoint(checkpoint)
    cfg.data.batch_size, cfg.data.num_workers = batch_size, num_workers
    if image_size:
        cfg.data.image_size = image_size
    data = plan_data(str(shards or cfg.data.shards))
    device = torch.device("cpu")
    with Loader(ValStream(data.val_urls, cfg, 0, 1), cfg, device) as loader:
        results, _, _ = validation_counts(model, loader, device, "no", 0, channels_last=False)
    return summarize_results(results)


# ============================================================================ the loop


@dataclass
class StepStats:
    """Sums over logged optimizer steps (reset after each log line)."""

    values: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    skipped_samples: int = 0

    def add(self, stats: dict[str, float], images: int, seconds: float) -> None:
        for k, v in stats.items():
            self.values[k] = self.values.get(k, 0.0) + v
        self.steps += 1
        self.images += images
        self.seconds += seconds

    def mean(self) -> dict[str, float]:
        out = {f"train/{k}": v / max(1, self.steps) for k, v in self.values.items()}
        out["train/images_per_s"] = self.images / max(self.seconds, 1e-9)
        out["train/step_time"] = self.seconds / max(1, self.steps)
        return out


def fetch_batches(it: Iterator[dict[str, Any]], n: int) -> tuple[list[dict[str, Any]], str | None]:
    """The next n micro-batches, or the error (one line) that stopped reading them."""
    batches = []
    try:
        for _ in range(n):
            batches.append(next(it))
    except StopIteration:
        return batches, "the training pipeline ended early (internal error)"
    except Exception as e:  # any worker error; reported to every rank by the caller
        if not isinstance(e, UserError):
            log.exception("reading training data failed")
        return batches, worker_error(e)
    return batches, None


def train_step(accelerator: Any, model: torch.nn.Module, optimizer: Any, loss_fn: Any,
               batches: list[dict[str, Any]], cfg: Config) -> tuple[dict[str, float], bool]:
    """One optimizer step over the micro-batches (accumulated, clipped). Returns the world's
    mean loss components and grad norm, and whether the step was applied (False when any rank's
    loss or the gradient norm was non-finite: the step is skipped on every rank)."""
    device = accelerator.device
    # Summed on the device (no host sync per micro-batch): loss, bce, dice, iou, non-finite.
    local = torch.zeros(5, device=device)
    for i, batch in enumerate(batches):
        with accelerator.accumulate(model):
            x = to_float_images(batch["image"].to(device, non_blocking=True))
            if cfg.model.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = batch["mask"].to(device, non_blocking=True).float()
            if cfg.data.soft_masks:  # lesion shares stored as 0-255
                y = y.mul_(1 / 255)
            logits = model(x)
            loss, parts = loss_fn(logits, y)
            accelerator.backward(loss)
            values = torch.stack([loss.detach(), parts["bce"], parts["dice"], parts["iou"]]).float()
            finite = torch.isfinite(values).all()
            local += torch.cat([torch.where(finite, values, torch.zeros_like(values)),
                                (~finite).float().reshape(1)])
            if i < len(batches) - 1:
                continue
            if not accelerator.sync_gradients:
                raise TrainingError("gradient accumulation is out of step with the batches "
                                    "(internal error)")
            total = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 \
                else local
            total = total.cpu()
            max_norm = cfg.optim.grad_clip or float("inf")
            norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
            # fp16: the grad scaler skips overflowing steps itself; that is not a bad step.
            bad = bool(total[4] > 0) or (not math.isfinite(norm)
                                         and cfg.train.mixed_precision != "fp16")
            if not bad:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    n = len(batches) * accelerator.num_processes
    # Loss terms are named as losses: `train/loss_dice` is 1 - soft Dice, not the Dice score.
    stats = {"loss": float(total[0]) / n, "loss_bce": float(total[1]) / n,
             "loss_dice": float(total[2]) / n, "loss_iou": float(total[3]) / n, "grad_norm": norm}
    return stats, not bad


def set_encoder_frozen(accelerator: Any, model: Any, optimizer: Any,
                       frozen: bool) -> tuple[Any, Any]:
    """Freeze/unfreeze the encoder of a prepared model. DDP registers only the parameters that
    need gradients when it is built, so the model and optimizer are prepared again."""
    net = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if net.encoder_frozen == frozen:
        return model, optimizer
    raw_optimizer = getattr(optimizer, "optimizer", optimizer)
    net.set_encoder_frozen(frozen)
    accelerator.free_memory()
    model, optimizer = accelerator.prepare(net, raw_optimizer)
    model.train()
    return model, optimizer


def make_accelerator(cfg: Config) -> Any:
    """The Accelerator: mixed precision, accumulation (not tied to a prepared loader), trackers."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    from lesionseg import tracking

    accum = GradientAccumulationPlugin(num_steps=cfg.optim.grad_accum_steps,
                                       sync_with_dataloader=False)
    extra: dict[str, Any] = {}
    if cfg.model.compile:
        extra["dynamo_backend"] = "inductor"
    return Accelerator(mixed_precision=cfg.train.mixed_precision,
                       gradient_accumulation_plugin=accum,
                       **tracking.accelerator_kwargs(cfg), **extra)


def configure_torch(cfg: Config) -> None:
    """Thread count and determinism switches (both matter for bit-exact resume)."""
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def build_demo_data(accelerator: Any, cfg: Config) -> str:
    """Build the synthetic demo set once (main process; the others wait) and return its folder.
    Reused while its manifest exists with the configured number of cases."""
    from lesionseg.data.shards import MANIFEST, pack
    from lesionseg.data.synthetic import write_isic_dataset

    out = Path(cfg.data.demo_dir)
    source = Path(f"{cfg.data.demo_dir}-source")
    if accelerator.is_main_process:
        manifest = out / MANIFEST
        current = None
        if manifest.is_file():
            with contextlib.suppress(ValueError, OSError):
                current = json.loads(manifest.read_text()).get("total_samples")
        if current != cfg.data.demo_cases:
            log.info("building the demo data set: %d synthetic cases in %s, packed to %s",
                     cfg.data.demo_cases, source, out)
            shutil.rmtree(source, ignore_errors=True)
            write_isic_dataset(source, cfg.data.demo_cases, seed=0,
                               min_side=DEMO_SOURCE_SIDES[0], max_side=DEMO_SOURCE_SIDES[1],
                               progress=True)
            pack_cfg = cfg.pack
            pack_cfg.max_side = min(pack_cfg.max_side or DEMO_PACK_MAX_SIDE, DEMO_PACK_MAX_SIDE)
            pack_cfg.shard_max_samples = min(pack_cfg.shard_max_samples,
                                             max(8, cfg.data.demo_cases // 4))
            pack_cfg.val_fraction = pack_cfg.val_fraction or 0.1
            pack([source], out, pack_cfg, progress=True)
    accelerator.wait_for_everyone()
    return str(out)


def write_metrics_line(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one validation record to metrics.jsonl (main process)."""
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def _scalar_line(values: dict[str, float]) -> str:
    return " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in values.items())


def train(cfg: Config, demo: bool = False) -> int:
    """Train with the resolved config; returns 0, or EXIT_RESUME after a stop signal."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from lesionseg import tracking
    from lesionseg.checkpoint import save_weights
    from lesionseg.losses import SegmentationLoss
    from lesionseg.modelcard import write_run_card

    configure_torch(cfg)
    for name in ("accelerate.checkpointing", "accelerate.accelerator"):  # one line per save here
        logging.getLogger(name).setLevel(logging.WARNING)
    accelerator = make_accelerator(cfg)
    from accelerate.utils import set_seed

    world, main = accelerator.num_processes, accelerator.is_main_process
    if not main:  # progress lines from the main process only; warnings from every rank
        log.setLevel(logging.WARNING)
    run_dir = Path(cfg.train.output_dir)
    if demo:
        cfg.data.shards = build_demo_data(accelerator, cfg)
    data = plan_data(cfg.data.shards, cfg.data.folds, int(cfg.data.fold) if cfg.data.folds else 0,
                     cfg.data.fold_seed)
    if main:
        check_stored_size(data, cfg.data.image_size)
    schedule = plan_schedule(cfg, data.train_count, world)
    # The settings as given (auto keys still null) are what a resume must match: an extended
    # run's recipe is resolved anew for its longer schedule.
    given = copy.deepcopy(cfg)
    recipe = resolve_recipe(cfg, schedule.total_steps, schedule.steps_per_epoch)
    if main:
        log.info("recipe: %s", recipe.describe())
    memory = plan_memory(cfg, data)
    if main:
        log.info("memory: %s", memory.describe())
    lanes = world * max(1, cfg.data.num_workers)
    if memory.train is None and len(data.train_urls) < lanes and main:
        log.warning("%d train shard(s) for %d reader lanes (processes × data.num_workers): "
                    "lanes share shards; pack more shards (pack.shard_max_samples) for "
                    "better mixed epochs", len(data.train_urls), lanes)

    set_seed(cfg.train.seed)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    o = cfg.optim
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, o.warmup_steps, schedule.total_steps, o.min_lr_ratio))
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is stepped once per optimizer step here; Accelerate's prepared scheduler
    # would step it num_processes times per step. It and `progress` are saved as JSON in
    # every state (lesionseg.states), never registered with Accelerate (which unpickles).
    progress = Progress()
    loss_fn = SegmentationLoss(cfg.loss.bce_weight, cfg.loss.dice_weight, cfg.loss.iou_weight,
                               smooth=cfg.loss.smooth, per_image=cfg.loss.per_image,
                               pos_weight=cfg.loss.pos_weight)

    if cfg.train.resume == "none" and main and run_dir.is_dir():
        set_aside_previous_run(run_dir)
    accelerator.wait_for_everyone()
    resume_from = states.choose_state(accelerator, cfg.train.resume, run_dir)
    changed = (check_resume(resume_from, run_dir, given, world) if resume_from is not None
               else [])
    if resume_from is not None:
        accelerator.wait_for_everyone()
        states.load_state(accelerator, resume_from, progress, scheduler)
        log.info("resumed from %s: epoch %d, micro-batch %d, step %d", resume_from,
                 progress.epoch, progress.micro, progress.step)
        if changed:  # the data position and the best score mean nothing under new settings
            progress.micro = 0
            if any(k == "train.best_metric" for k, _, _ in changed):
                progress.best, progress.best_step = -math.inf, -1
        _log_extension(progress, schedule)
    progress.extra["settings"] = resume_settings(given, world)  # saved with every state
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not changed:  # else the weights beside it are the old settings' until the next save
            save_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    tracking.start(accelerator, cfg, run_dir, progress.step)

    global_batch = cfg.data.batch_size * world * o.grad_accum_steps
    if main:
        log.info("training: world size %d (%s), device %s, mixed precision %s, batch %d per "
                 "process × %d accumulation steps = effective batch %d; %d steps (%d epochs "
                 "of %d), %d train / %d val images%s", world, accelerator.distributed_type.value,
                 accelerator.device, cfg.train.mixed_precision, cfg.data.batch_size,
                 o.grad_accum_steps, global_batch, schedule.total_steps, schedule.epochs,
                 schedule.steps_per_epoch, data.train_count, data.val_count,
                 (f" (fold {cfg.data.fold} of {cfg.data.folds} held out of the train + val "
                  "cases)" if cfg.data.folds else "")
                 + (f", demo data in {data.folder}" if demo else ""))

    stop = StopFlag()
    stop.install()
    try:
        with logging_redirect_tqdm():  # log lines print above the progress bar
            status, model = _loop(accelerator, cfg, data, schedule, model, optimizer,
                                  scheduler, progress, loss_fn, run_dir, stop, resume_from,
                                  memory)
    finally:
        stop.restore()
    if status == EXIT_RESUME:
        tracking.finish(accelerator)
        return status
    if main:
        net = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        last_val = progress.extra.get("last_val", {})
        save_weights(run_dir / "last.pt", net.state_dict(), cfg, step=progress.step,
                     epoch=progress.epoch, val=last_val)
        if cfg.train.select == "final":
            save_weights(run_dir / "best.pt", net.state_dict(), cfg, step=progress.step,
                         epoch=progress.epoch, val=last_val, select="final")
        if cfg.data.folds and (run_dir / "best.pt").is_file():  # its held-out cases: out of fold
            predict_held_out(run_dir, cfg, data.val_urls, data.val_ids, accelerator.device)
        elif cfg.train.tune_postprocess and (run_dir / "best.pt").is_file():
            tune_checkpoint(run_dir / "best.pt", data.val_urls, cfg.data.image_size,
                            accelerator.device)
        save_config(cfg, run_dir / "config.yaml")  # describes the weights beside it
        write_run_card(run_dir)  # MODEL_CARD.md beside best.pt (lesionseg.modelcard)
        log.info("done: %d steps; best val %s %.4f at step %d, final %.4f; best.pt holds the "
                 "%s weights (train.select); weights in %s and %s", progress.step,
                 cfg.train.best_metric, progress.best, progress.best_step,
                 last_val.get(cfg.train.best_metric, float("nan")),
                 "final" if cfg.train.select == "final" else f"step {progress.best_step}",
                 run_dir / "best.pt", run_dir / "last.pt")
        if demo:
            log.info("This was a DEMO on synthetic data (%s), not ISIC. To train on ISIC 2016: "
                     "python jobs/pack.py --source ISIC2016/ --out shards/isic2016, then "
                     "accelerate launch jobs/train.py data.shards=shards/isic2016 "
                     "model.encoder_weights=imagenet", data.folder)
    accelerator.wait_for_everyone()
    tracking.finish(accelerator)
    return EXIT_OK


def _log_extension(progress: Progress, schedule: Schedule) -> None:
    """Say what a resume does to the end of the run: nothing left, or going on past it."""
    if progress.step >= schedule.total_steps:
        log.info("this run finished at step %d; nothing to train (raise optim.max_steps or "
                 "optim.epochs to extend it)", progress.step)
    elif progress.step and progress.micro == 0 and progress.extra.get("finished_at") == progress.step:
        log.info("extending the finished run from step %d to %d (the learning-rate schedule "
                 "is recomputed for %d steps)", progress.step, schedule.total_steps,
                 schedule.total_steps)


def count_bad_steps(progress: Progress, applied: bool, max_bad: int) -> None:
    """Count skipped (non-finite) steps in a row; too many is a TrainingError."""
    progress.bad_steps = 0 if applied else progress.bad_steps + 1
    if applied:
        return
    log.warning("step %d: non-finite loss or gradient; step skipped (%d in a row)",
                progress.step, progress.bad_steps)
    if progress.bad_steps >= max_bad:
        raise TrainingError(
            f"{progress.bad_steps} optimizer steps in a row had a non-finite loss or gradient "
            f"(step {progress.step}); lower optim.lr, raise optim.warmup_steps, use "
            "train.mixed_precision=bf16 or no, or check the data (train.max_bad_steps)")


def log_train_scalars(accelerator: Any, stats: StepStats, optimizer: Any, progress: Progress,
                      bar: Any) -> None:
    """Means since the last log line, learning rates and epoch: to the trackers, the progress
    bar and the log (main process)."""
    from lesionseg import tracking

    values = stats.mean()
    values["train/lr"] = optimizer.param_groups[0]["lr"]
    values["train/lr_encoder"] = optimizer.param_groups[1]["lr"]
    values["train/epoch"] = progress.epoch
    tracking.log_metrics(accelerator, values, progress.step)
    bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{values['train/lr']:.2e}")
    if accelerator.is_main_process:
        log.info("step %d: %s", progress.step, _scalar_line(values))


def validate_and_keep_best(accelerator: Any, model: Any, data: DataPlan, cfg: Config,
                           progress: Progress, run_dir: Path,
                           val_memory: ValBatches | None = None) -> None:
    """Validate, log metrics and overlays, append metrics.jsonl, and write best.pt when the
    val train.best_metric improved (main process writes; every rank updates `progress`)."""
    from lesionseg import tracking
    from lesionseg.checkpoint import save_weights

    metrics, overlays = evaluate(accelerator, model, data, cfg, val_memory)
    tracking.log_metrics(accelerator, {f"val/{k}": v for k, v in metrics.items()}, progress.step)
    tracking.log_overlays(accelerator, cfg, overlays, progress.step)
    progress.extra["last_val"] = metrics
    main = accelerator.is_main_process
    if main:
        log.info("step %d validation: %s", progress.step, _scalar_line(metrics))
        write_metrics_line(run_dir, {"step": progress.step, "epoch": progress.epoch, **metrics})
    value = metrics[cfg.train.best_metric]
    if value > progress.best:
        progress.best, progress.best_step = value, progress.step
        if main and cfg.train.select == "best":
            net = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
            save_weights(run_dir / "best.pt", net.state_dict(), cfg, step=progress.step,
                         epoch=progress.epoch, val=metrics, best_metric=cfg.train.best_metric)
            save_config(cfg, run_dir / "config.yaml")


def _loop(accelerator: Any, cfg: Config, data: DataPlan, schedule: Schedule, model: Any,
          optimizer: Any, scheduler: Any, progress: Progress, loss_fn: Any, run_dir: Path,
          stop: StopFlag, resume_from: Path | None, memory: Memory) -> tuple[int, Any]:
    """The epochs and steps: fetch, agree, step, log, validate, save. Returns the status (0 or
    EXIT_RESUME) and the prepared model (prepared anew if the encoder was unfrozen)."""
    from tqdm import tqdm

    rank, world, main = accelerator.process_index, accelerator.num_processes, \
        accelerator.is_main_process
    t, o = cfg.train, cfg.optim
    last_saved = progress.step if resume_from is not None else -1
    global_batch = cfg.data.batch_size * world * o.grad_accum_steps
    stats, skipped_total = StepStats(), 0
    bar = tqdm(total=schedule.total_steps, initial=progress.step, desc="train", unit="step",
               disable=not main, dynamic_ncols=True)
    loader: Loader | CachedTrainEpoch | None = None
    loader_it: Iterator[dict[str, Any]] | None = None
    epoch_len = 0  # micro-batches of the current epoch
    unfreeze = cfg.model.freeze_encoder and cfg.model.unfreeze_after_epochs > 0
    model.train()
    try:
        while progress.step < schedule.total_steps:
            started = time.perf_counter()
            if loader_it is None:
                if unfreeze and progress.epoch >= cfg.model.unfreeze_after_epochs:
                    model, optimizer = set_encoder_frozen(accelerator, model, optimizer, False)
                    log.info("epoch %d: encoder unfrozen", progress.epoch)
                    unfreeze = False
                epoch_len = schedule.micro_batches(progress.step, progress.micro)
                if memory.train is not None:
                    loader = memory.train_epoch(cfg, accelerator, progress.epoch, epoch_len,
                                                progress.micro)
                else:
                    loader = Loader(TrainStream(data.train_urls, cfg, progress.epoch, rank,
                                                world, epoch_len, progress.micro,
                                                ids=data.train_ids), cfg,
                                    accelerator.device)
                loader_it = iter(loader)
            batches, error = fetch_batches(loader_it, o.grad_accum_steps)
            # One all-reduce per step: every rank learns whether any rank was asked to stop or
            # failed to read its batches, before anyone enters the step's collectives.
            stopping, failed = agree(accelerator, stop.is_set, error is not None)
            if failed and not stopping:  # (a stop wins: the saved state needs no data)
                raise DataError(error if error else "another process failed reading its "
                                "training data; see its error above")
            if stopping:
                if progress.step != last_saved:
                    states.save_state(accelerator, run_dir, progress, scheduler, t.keep_states)
                log.info("stop requested (signal): state saved at step %d; exiting with %d so "
                         "the job is rerun to resume", progress.step, EXIT_RESUME)
                return EXIT_RESUME, model
            for b in batches:
                stats.skipped_samples += len(b["skipped"])
                for msg in b["skipped"]:
                    log.warning("rank %d: skipped a bad training sample: %s", rank, msg)

            step_stats, applied = train_step(accelerator, model, optimizer, loss_fn, batches, cfg)
            scheduler.step()
            progress.step += 1
            progress.micro += o.grad_accum_steps
            count_bad_steps(progress, applied, t.max_bad_steps)
            epoch_done = progress.micro >= epoch_len
            if epoch_done:
                progress.epoch += 1
                progress.micro = 0
                loader.close()
                loader = loader_it = None
            elapsed = time.perf_counter() - started
            stats.add(step_stats, global_batch, elapsed)
            bar.update(1)
            if progress.step % t.log_every_steps == 0 or progress.step == schedule.total_steps:
                log_train_scalars(accelerator, stats, optimizer, progress, bar)
                skipped_total += stats.skipped_samples
                stats = StepStats()

            last = progress.step == schedule.total_steps
            if last:
                progress.extra["finished_at"] = progress.step  # in the final state
            validate = last or (t.val_every_steps > 0 and progress.step % t.val_every_steps == 0) \
                or (t.val_every_steps == 0 and epoch_done)
            if validate:
                validate_and_keep_best(accelerator, model, data, cfg, progress, run_dir,
                                       memory.val)
            if validate or (t.save_every_steps and progress.step % t.save_every_steps == 0):
                states.save_state(accelerator, run_dir, progress, scheduler, t.keep_states)
                last_saved = progress.step
    finally:
        bar.close()
        if loader is not None:
            loader.close()
    skipped_total += stats.skipped_samples
    if skipped_total:
        log.warning("rank %d skipped %d bad training samples in this segment", rank,
                    skipped_total)
    return EXIT_OK, model
