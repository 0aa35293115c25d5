"""Validation: every val sample exactly once across all ranks, per-image confusion counts
gathered with their ids, deduplicated, then averaged (lesionseg.metrics); metrics.jsonl and
best.pt (train.select=best) after each validation."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object

from lesionseg import tracking
from lesionseg.checkpoint import build_model_from_checkpoint, save_weights
from lesionseg.config import Config, save_config
from lesionseg.data.memory import ValBatches
from lesionseg.device import autocast, precision_dtype, to_model_input
from lesionseg.errors import DataError, RankError, UserError
from lesionseg.metrics import confusion_counts, predicted_fraction, summarize
from lesionseg.train import LOGGER
from lesionseg.train.data import DataPlan, plan_data
from lesionseg.train.loader import Loader, is_worker_failure, worker_error, worker_failure
from lesionseg.train.resume import METRICS_FILE, Progress
from lesionseg.train.signals import beat
from lesionseg.train.step import scalar_line
from lesionseg.train.streams import ValStream

log = logging.getLogger(LOGGER)


def validation_counts(model: torch.nn.Module, loader: Any, device: torch.device,
                      precision: str = "no", keep_images: int = 0,
                      channels_last: bool = True) -> tuple[list[tuple[str, list[int]]], list, int]:
    """(id, [tp, fp, fn, tn]) for every sample of the loader, the first `keep_images`
    (id, image, prediction, truth) for overlays, and the number of skipped samples.
    Prediction = logit > 0 (probability > 0.5), at the loader's resolution."""
    results: list[tuple[str, list[int]]] = []
    kept: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    skipped = 0
    model.eval()
    with torch.no_grad():
        for batch in loader:
            beat()  # progress: a stop's watch leaves a long validation be
            skipped += len(batch["skipped"])
            for msg in batch["skipped"]:
                log.warning("skipped a bad val sample: %s", msg)
            if not batch["id"]:
                continue
            x = to_model_input(batch["image"], device, channels_last)
            truth = batch["mask"].to(device, non_blocking=True) > 0
            with autocast(device, precision_dtype(precision)):
                logits = model(x)
            pred = logits.float() > 0
            counts = confusion_counts(pred, truth).cpu().tolist()
            results.extend(zip(batch["id"], counts, strict=True))
            for i in range(min(len(batch["id"]), keep_images - len(kept))):
                kept.append((batch["id"][i], batch["image"][i], pred[i].cpu(), truth[i].cpu()))
    return results, kept, skipped


def summarize_results(results: list[tuple[str, list[int]]]) -> dict[str, float]:
    """Deduplicate (id, counts) by id and take the macro means (lesionseg.metrics.summarize),
    and the mean predicted lesion share (a degenerate model's sign)."""
    unique = dict(results)
    ordered = [unique[key] for key in sorted(unique)]  # the same summation order everywhere
    counts = torch.tensor(ordered, dtype=torch.long).reshape(-1, 4)
    return {**summarize(counts), "pred_fraction": predicted_fraction(counts)}


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
        if not isinstance(e, UserError) and worker_failure(e) is None:
            log.exception("validation failed on rank %d", accelerator.process_index)
            if accelerator.num_processes == 1:
                raise
        error = worker_error(e) if accelerator.num_processes == 1 else \
            f"rank {accelerator.process_index}: {worker_error(e)}"
    finally:
        model.train()
    gathered = gather_object([(results, error, skipped)])
    errors = [err for _, err, _ in gathered if err]
    if errors and is_worker_failure(errors[0]):
        raise RankError(f"validation failed: {errors[0]}", shared=True)
    if errors:
        error = DataError(f"validation failed: {errors[0]}")
        error.shared = True
        raise error
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
    model, cfg, _ = build_model_from_checkpoint(checkpoint)
    cfg.data.batch_size, cfg.data.num_workers = batch_size, num_workers
    if image_size:
        cfg.data.image_size = image_size
    data = plan_data(str(shards or cfg.data.shards))
    device = torch.device("cpu")
    with Loader(ValStream(data.val_urls, cfg, 0, 1), cfg, device) as loader:
        results, _, _ = validation_counts(model, loader, device, "no", 0, channels_last=False)
    return summarize_results(results)


def validate_and_keep_best(accelerator: Any, model: Any, data: DataPlan, cfg: Config,
                           progress: Progress, run_dir: Path,
                           val_memory: ValBatches | None = None) -> None:
    """Validate, log metrics and overlays, append metrics.jsonl, and write best.pt when the
    val train.best_metric improved (main process writes; every rank updates `progress`)."""
    metrics, overlays = evaluate(accelerator, model, data, cfg, val_memory)
    tracking.log_metrics(accelerator, {f"val/{k}": v for k, v in metrics.items()}, progress.step)
    tracking.log_overlays(accelerator, cfg, overlays, progress.step)
    progress.extra["last_val"] = metrics
    main = accelerator.is_main_process
    if main:
        log.info("step %d validation: %s", progress.step, scalar_line(metrics))
        write_metrics_line(run_dir, {"step": progress.step, "epoch": progress.epoch, **metrics})
    value = metrics[cfg.train.best_metric]
    if value > progress.best:
        progress.best, progress.best_step = value, progress.step
        if main and cfg.train.select == "best":
            net = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
            save_weights(run_dir / "best.pt", net.state_dict(), cfg, step=progress.step,
                         epoch=progress.epoch, val=metrics, best_metric=cfg.train.best_metric,
                         trained_on=tracking.trained_on(accelerator))
            save_config(cfg, run_dir / "config.yaml")


def write_metrics_line(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one validation record to metrics.jsonl (main process)."""
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
