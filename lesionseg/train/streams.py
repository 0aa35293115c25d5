"""The training and validation streams, built inside DataLoader workers.

Training: every rank reads its own endless, seeded stream of shards (a fresh permutation of
all train shards per cycle, dealt round-robin to the world's `world × num_workers` "lanes")
through a seeded shuffle buffer, and yields exactly the micro-batches its epoch asks for,
batched inside the workers; so no rank ever waits on another, whatever the shard count. Lane l
of rank r in epoch e is fully determined by (train.seed, e, r, l), and each augmentation by
(seed, e, r, l, position, sample id); a resumed epoch skips the raw samples of the batches
already done before decoding them.

Validation: every val sample exactly once whatever the world size (sample i goes to lane
i mod lanes), scored at data.image_size: the whole image resized (`eval_transform`, as
inference does), the mask with nearest.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lesionseg.config import Config
from lesionseg.data.shard_format import decode_sample, raw_image_size, raw_mask, read_shard
from lesionseg.data.transforms import (
    AugmentParams,
    apply_augmentation,
    draw_augmentation,
    eval_transform,
    generator_for,
    lesion_box,
    stack_images,
)
from lesionseg.errors import DataError, UserError, first_line
from lesionseg.train import LOGGER

log = logging.getLogger(LOGGER)

# A lane that reads this many shards in a row without one sample gives up (all bad or empty).
MAX_EMPTY_SHARDS = 64
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
    height, width = raw_image_size(raw)
    lesion = lesion_box(np.asarray(raw_mask(raw)) > 127) if params.skin_crop_prob > 0 else None
    aug = draw_augmentation(height, width, params, g, lesion)
    sample = decode_sample(raw, draft_size=aug.decode_size())
    image, mask = apply_augmentation(sample.image, sample.mask, aug, soft)
    return sample.id, image, mask


def _evaluated(raw: dict[str, Any], size: int,
               soft: bool = False) -> tuple[str, torch.Tensor, torch.Tensor]:
    """A validation sample: the whole image resized to size×size (`eval_transform`)."""
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


def _collate(rows: list[tuple[str, torch.Tensor, torch.Tensor]],
             skipped: list[str]) -> dict[str, Any]:
    """(id, image, mask) rows as a batch: uint8 images stacked channels_last (float conversion
    happens on the device), masks stacked."""
    return {"id": [r[0] for r in rows], "image": stack_images([r[1] for r in rows]),
            "mask": torch.stack([r[2] for r in rows]), "skipped": skipped}


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
        rows, skipped = [], []
        for index, raw in items:
            g = generator_for(self.seed, self.epoch, lane_id, index, raw.get("__key__"))
            done = _prepare(lambda raw=raw, g=g: _augmented(raw, self.augment, g, self.soft),
                            self.on_error, skipped)
            if done is not None:
                rows.append(done)
        if not rows:
            raise DataError(f"every sample of a training batch was bad, e.g. {skipped[0]}")
        for k in range(len(items) - len(rows)):
            rows.append(rows[k])
        return _collate(rows, skipped)


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
        rows, skipped = [], []
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
                rows.append(done)
                if len(rows) == self.batch_size:
                    yield _collate(rows, skipped)
                    rows, skipped = [], []
        if rows or skipped:
            yield (_collate(rows, skipped) if rows
                   else {"id": [], "image": None, "mask": None, "skipped": skipped})
