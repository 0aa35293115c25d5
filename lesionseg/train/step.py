"""One optimizer step over a step's micro-batches (accumulated, clipped, skipped on every rank
when any loss or the gradient is non-finite), its result, and the means logged between log
lines."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lesionseg import tracking
from lesionseg.config import Config
from lesionseg.device import to_model_input
from lesionseg.errors import UserError
from lesionseg.train import LOGGER
from lesionseg.train.resume import Progress

log = logging.getLogger(LOGGER)


class TrainingError(UserError):
    """Training cannot go on (non-finite losses, another rank failed); the message says why."""


@dataclass(frozen=True)
class StepResult:
    """One optimizer step: the world's mean loss terms and the gradient norm. Loss terms are
    named as losses: `loss_dice` is 1 - soft Dice, not the Dice score."""

    loss: float
    loss_bce: float
    loss_dice: float
    loss_iou: float
    grad_norm: float
    applied: bool  # False: some rank's loss or the gradient norm was non-finite; skipped on all

    def scalars(self) -> dict[str, float]:
        return {"loss": self.loss, "loss_bce": self.loss_bce, "loss_dice": self.loss_dice,
                "loss_iou": self.loss_iou, "grad_norm": self.grad_norm}


def train_step(accelerator: Any, model: torch.nn.Module, optimizer: Any, loss_fn: Any,
               batches: list[dict[str, Any]], cfg: Config) -> StepResult:
    """One optimizer step over the micro-batches (accumulated, clipped). The step is skipped
    on every rank when any rank's loss or the gradient norm was non-finite."""
    # Summed on the device (no host sync per micro-batch): loss, bce, dice, iou, non-finite.
    local = torch.zeros(5, device=accelerator.device)
    for i, batch in enumerate(batches):
        with accelerator.accumulate(model):
            local += _forward_backward(accelerator, model, loss_fn, batch, cfg)
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
    return StepResult(float(total[0]) / n, float(total[1]) / n, float(total[2]) / n,
                      float(total[3]) / n, norm, applied=not bad)


def _forward_backward(accelerator: Any, model: torch.nn.Module, loss_fn: Any,
                      batch: dict[str, Any], cfg: Config) -> torch.Tensor:
    """Forward, loss and backward of one micro-batch: [loss, bce, dice, iou, non-finite], the
    four terms zeroed when any is non-finite."""
    device = accelerator.device
    x = to_model_input(batch["image"], device, cfg.model.channels_last)
    y = batch["mask"].to(device, non_blocking=True).float()
    if cfg.data.soft_masks:  # lesion shares stored as 0-255
        y = y.mul_(1 / 255)
    logits = model(x)
    loss, parts = loss_fn(logits, y)
    accelerator.backward(loss)
    values = torch.stack([loss.detach(), parts["bce"], parts["dice"], parts["iou"]]).float()
    finite = torch.isfinite(values).all()
    return torch.cat([torch.where(finite, values, torch.zeros_like(values)),
                      (~finite).float().reshape(1)])


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


@dataclass
class StepStats:
    """Sums over logged optimizer steps (reset after each log line)."""

    values: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    skipped_samples: int = 0

    def add(self, result: StepResult, images: int, seconds: float) -> None:
        for k, v in result.scalars().items():
            self.values[k] = self.values.get(k, 0.0) + v
        self.steps += 1
        self.images += images
        self.seconds += seconds

    def mean(self) -> dict[str, float]:
        out = {f"train/{k}": v / max(1, self.steps) for k, v in self.values.items()}
        out["train/images_per_s"] = self.images / max(self.seconds, 1e-9)
        out["train/step_time"] = self.seconds / max(1, self.steps)
        return out


def log_train_scalars(accelerator: Any, stats: StepStats, optimizer: Any, progress: Progress,
                      bar: Any) -> None:
    """Means since the last log line, learning rates and epoch: to the trackers, the progress
    bar and the log (main process)."""
    values = stats.mean()
    values["train/lr"] = optimizer.param_groups[0]["lr"]
    values["train/lr_encoder"] = optimizer.param_groups[1]["lr"]
    values["train/epoch"] = progress.epoch
    tracking.log_metrics(accelerator, values, progress.step)
    bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{values['train/lr']:.2e}")
    if accelerator.is_main_process:
        log.info("step %d: %s", progress.step, scalar_line(values))


def scalar_line(values: dict[str, float]) -> str:
    """`loss=0.5 dice=0.8 …`: a log line's values, named without their section."""
    return " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in values.items())
