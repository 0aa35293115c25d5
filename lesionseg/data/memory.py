"""Decoded samples held in memory: train once-decoded images when the augmentation allows it,
and the val set for every validation.

Streaming from shards decodes and resizes every sample again in every epoch, in DataLoader
workers that are started anew each epoch and share the CPU with the training step. When the
augmentation only flips and recolours whole images (`data.scale_min=1`,
`data.rotate_degrees=0`: the recipe's choice for schedules under 25 epochs), that work gives
the same pixels every epoch, so it is done once: the train set is decoded and resized by the
eval resize (`eval_transform`) into memory, and each epoch only draws an order and the flips
and colour of each sample (`CachedTrainEpoch`). Validation always sees the same resized
pixels, so its batches are kept after the first validation (`ValBatches`).

`data.cache=true` (default) uses memory for both when their decoded size fits in
`data.cache_max_mb` per process; `data.cache=false` always streams. The cached epoch is as
deterministic as the streamed one: epoch e's order is a seeded permutation of every train
sample (seed, e), the micro-batch i of rank r takes the permutation's positions
((i·world + r)·B …), wrapping at the end, and each sample's flips and colour are drawn from
(seed, e, position, id), so a resume at micro-batch i is exact.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lesionseg.data.transforms import (
    AugmentParams,
    draw_augmentation,
    flip_and_colour,
    generator_for,
    stack_images,
)


def sample_bytes(size: int) -> int:
    """Memory of one resized sample: a uint8 3×S×S image and a 1×S×S mask."""
    return 4 * size * size


def fits(count: int, size: int, max_mb: int) -> bool:
    """Whether `count` resized samples fit in `max_mb` MiB."""
    return count * sample_bytes(size) <= max_mb * 2**20


def train_cacheable(params: AugmentParams) -> bool:
    """Whether every training augmentation frames the whole image unrotated (flips and colour
    only), so a once-resized copy of each sample gives exactly the pixels to flip (a skin crop
    moves the frame, so it streams)."""
    return params.scale_min >= 1 and params.rotate_degrees == 0 and params.skin_crop_prob == 0


@dataclass
class CachedSamples:
    """Every decoded, resized sample of a split, sorted by id (independent of worker count)."""

    ids: list[str]
    images: list[torch.Tensor]  # uint8 3×S×S over H×W×C memory
    masks: list[torch.Tensor]  # uint8 1×S×S in {0, 1}
    skipped: list[str]  # bad samples left out (data.on_error=skip), one line each

    @classmethod
    def from_batches(cls, batches: Iterable[dict[str, Any]]) -> CachedSamples:
        """Unbatch eval-transformed batches (those of `lesionseg.train.streams.ValStream`)."""
        rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        skipped: list[str] = []
        for batch in batches:
            skipped.extend(batch["skipped"])
            for i, key in enumerate(batch["id"]):
                # copies: a batch's images are views into its one stacked tensor
                rows[key] = (_own(batch["image"][i]), batch["mask"][i].clone())
        ids = sorted(rows)
        return cls(ids, [rows[k][0] for k in ids], [rows[k][1] for k in ids], skipped)

    def __len__(self) -> int:
        return len(self.ids)


def _own(image: torch.Tensor) -> torch.Tensor:
    """A 3×H×W view → its own H×W×C memory (so `stack_images` stays channels_last)."""
    return image.permute(1, 2, 0).contiguous().permute(2, 0, 1)


class CachedTrainEpoch:
    """One rank's micro-batches `start` … `batches - 1` of an epoch, from `CachedSamples`:
    an iterable with the `lesionseg.train.loader.Loader` interface (iterate once, `close`)."""

    def __init__(self, samples: CachedSamples, params: AugmentParams, seed: int, epoch: int,
                 rank: int, world: int, batch_size: int, batches: int, start: int = 0,
                 pin_memory: bool = False) -> None:
        if not samples.ids:
            raise ValueError("no cached train samples")
        self.samples, self.params, self.seed, self.epoch = samples, params, seed, epoch
        self.rank, self.world, self.batch_size = rank, world, batch_size
        self.batches, self.start, self.pin = batches, start, pin_memory

    def order(self) -> list[int]:
        """This epoch's permutation of the sample indices (the same on every rank)."""
        order = list(range(len(self.samples)))
        random.Random(f"{self.seed}/{self.epoch}/cached").shuffle(order)
        return order

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order, n = self.order(), len(self.samples)
        for i in range(self.start, self.batches):
            ids, images, masks = [], [], []
            for k in range(self.batch_size):
                position = (i * self.world + self.rank) * self.batch_size + k
                index = order[position % n]
                key = self.samples.ids[index]
                g = generator_for(self.seed, self.epoch, "cached", position, key)
                aug = draw_augmentation(self.params.size, self.params.size, self.params, g)
                image, mask = flip_and_colour(self.samples.images[index],
                                              self.samples.masks[index], aug)
                ids.append(key)
                images.append(image)
                masks.append(mask)
            batch = {"id": ids, "image": stack_images(images), "mask": torch.stack(masks),
                     "skipped": []}
            if self.pin:
                batch["image"], batch["mask"] = batch["image"].pin_memory(), \
                    batch["mask"].pin_memory()
            yield batch

    def close(self) -> None:
        """Nothing to stop (no workers); the `Loader` interface."""


class ValBatches:
    """A rank's val batches, kept after the first validation when they fit in memory."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.batches: list[dict[str, Any]] | None = None

    def keep(self, batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Hold `batches` for the next validations (the caller checks `enabled`)."""
        self.batches = batches
        return batches
