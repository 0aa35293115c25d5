"""What `data.cache` keeps in memory for a run (lesionseg/data/memory.py): the val batches,
and the decoded train set when its augmentation is flips and colour only."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from lesionseg.config import Config
from lesionseg.data.memory import (
    CachedSamples,
    CachedTrainEpoch,
    ValBatches,
    fits,
    sample_bytes,
    train_cacheable,
)
from lesionseg.data.transforms import AugmentParams
from lesionseg.errors import DataError, UserError
from lesionseg.train import LOGGER
from lesionseg.train.data import DataPlan
from lesionseg.train.loader import Loader, worker_error
from lesionseg.train.streams import ValStream

log = logging.getLogger(LOGGER)


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
