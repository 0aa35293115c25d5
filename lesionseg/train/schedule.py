"""The schedule of a run: optimizer steps per epoch, total steps, and the learning-rate curve
(linear warm-up, then cosine)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lesionseg.config import Config
from lesionseg.errors import DataError


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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config,
                    schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """The `lr_factor` curve over the run's total steps, stepped once per optimizer step."""
    o = cfg.optim
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, o.warmup_steps, schedule.total_steps, o.min_lr_ratio))
