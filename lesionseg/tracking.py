"""Experiment tracking with Weights & Biases through Accelerate's trackers (main process only).

What is logged: the resolved config (at start), the training scalars and validation metrics
(`accelerator.log`, with the optimizer step carried by the resumed state, so steps only ever
increase), and at each validation `tracking.log_images` images with prediction and truth masks
as W&B mask overlays. Names: `train/loss` and its terms `train/loss_bce`, `train/loss_dice`,
`train/loss_iou` (losses: 1 - soft Dice, not the score), `val/dice` etc. (scores). Declared
with `define_metric`: every train/ and val/ metric is plotted against `optim/step` (the
optimizer step), and the run's summary holds the best `val/<train.best_metric>` (max) — not
the last — and the lowest `train/loss`. An inference job with `--wandb` (`infer.log_wandb=true`)
logs its results as a run of its own (job type "inference"): a W&B Table of per-image metrics
with the overlay thumbnails (`log_inference` says how offline runs carry them), and the
summary's means and counts as the run summary.

Offline by default: `tracking.mode` (offline, online, disabled), overridden by the WANDB_MODE
environment variable when it is set; files go under `tracking.dir` (default: the run folder),
`<dir>/wandb/offline-run-*`; sync later with `wandb sync <that folder>`.
`tracking.backend=none` turns tracking off entirely.

Requeued runs: the run folder keeps the W&B run id in `wandb_run_id`.
- online: every segment of the run logs into that same W&B run (`resume="allow"`).
- offline: W&B cannot resume an offline run, and syncing two offline folders with one id
  overwrites the first's history, so every segment after the first gets its own id
  (`<id>-2`, `<id>-3`, …, counted in `wandb_segments`) in one W&B group (tracking.group, or
  the run id): sync them all and view the group.

Crashes: wandb-core writes an offline run's `.wandb` file in 32 KiB blocks, the last one when
the run's stream closes (after `finish()`, or at exit), so a run killed at once may lose up to
its last 32 KiB of records (a short run: all of them); the
resolved config is therefore also written at start as `lesionseg-config.yaml` into the W&B run's
files folder (as well as `config.yaml` in the run folder).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lesionseg.config import Config, to_dict, to_yaml
from lesionseg.files import atomic_write_text

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"
SEGMENTS_FILE = "wandb_segments"
CONFIG_COPY = "lesionseg-config.yaml"
CLASS_LABELS = {0: "background", 1: "lesion"}
STEP_METRIC = "optim/step"  # the x axis of every train/ and val/ metric


def accelerator_kwargs(cfg: Config) -> dict[str, Any]:
    """The `Accelerator(...)` arguments for tracking: log_with only when the backend is wandb."""
    if cfg.tracking.backend == "wandb":
        return {"log_with": "wandb", "project_dir": tracking_dir(cfg)}
    return {"project_dir": cfg.train.output_dir}


def tracking_dir(cfg: Config) -> str:
    """Where W&B writes its files: tracking.dir, or the run folder."""
    return cfg.tracking.dir or cfg.train.output_dir


def wandb_mode(cfg: Config) -> str:
    """offline, online or disabled: WANDB_MODE when set, otherwise tracking.mode."""
    return os.environ.get("WANDB_MODE") or cfg.tracking.mode


def run_identity(run_dir: Path, mode: str) -> tuple[str, str, int]:
    """(W&B run id, base id, segment number) for this start of the run in `run_dir`.

    The base id is created once and kept in `wandb_run_id`; offline segments after the first
    get `<base>-<n>` (see the module docstring for why). Main process only: it writes files.
    """
    id_file, seg_file = run_dir / RUN_ID_FILE, run_dir / SEGMENTS_FILE
    base = id_file.read_text().strip() if id_file.is_file() else ""
    if not base:
        base = secrets.token_hex(4)
        atomic_write_text(id_file, base + "\n")
    segment = 1
    if seg_file.is_file():
        try:
            segment = int(seg_file.read_text().strip() or 0) + 1
        except ValueError:
            segment = 1
    atomic_write_text(seg_file, f"{segment}\n")
    run_id = base if mode != "offline" or segment == 1 else f"{base}-{segment}"
    return run_id, base, segment


def start(accelerator: Any, cfg: Config, run_dir: Path, resumed_step: int = 0) -> None:
    """Start the W&B run (main process only; nothing when tracking.backend is none)."""
    if cfg.tracking.backend != "wandb" or not accelerator.is_main_process:
        return
    mode = wandb_mode(cfg)
    run_id, base, segment = run_identity(run_dir, mode)
    folder = Path(tracking_dir(cfg))
    folder.mkdir(parents=True, exist_ok=True)
    name = cfg.tracking.run_name or Path(cfg.train.output_dir).resolve().name
    if run_id != base:
        name = f"{name}-{segment}"
    init = {"id": run_id, "resume": "allow", "name": name, "dir": str(folder), "mode": mode,
            "group": cfg.tracking.group or (base if mode == "offline" else None)}
    accelerator.init_trackers(cfg.tracking.project, config=to_dict(cfg),
                              init_kwargs={"wandb": init})
    run = accelerator.get_tracker("wandb", unwrap=True)
    define_metrics(run, cfg.train.best_metric)
    run.summary.update(trained_on(accelerator, prefix="run/"))
    files_dir = getattr(run, "dir", None)
    if files_dir:
        atomic_write_text(Path(files_dir) / CONFIG_COPY, to_yaml(cfg))
    log.info("W&B run %s (%s, %s%s) under %s", run_id, mode, f"segment {segment}",
             f", resumed at step {resumed_step}" if resumed_step else "", folder)


def trained_on(accelerator: Any, prefix: str = "") -> dict[str, Any]:
    """What a training run ran on: device type, processes, mixed precision (W&B summary
    `run/*`, and the checkpoints' meta `trained_on`)."""
    return {f"{prefix}device": accelerator.device.type,
            f"{prefix}processes": accelerator.num_processes,
            f"{prefix}precision": str(accelerator.mixed_precision)}


def define_metrics(run: Any, best_metric: str) -> None:
    """Plot train/ and val/ against the optimizer step; summarize the best validation score
    and the lowest loss (W&B's default summary is the last value)."""
    run.define_metric(STEP_METRIC)
    for pattern in ("train/*", "val/*"):
        run.define_metric(pattern, step_metric=STEP_METRIC)
    run.define_metric(f"val/{best_metric}", step_metric=STEP_METRIC, summary="max")
    run.define_metric("train/loss", step_metric=STEP_METRIC, summary="min")


def log_metrics(accelerator: Any, values: dict[str, Any], step: int) -> None:
    """`accelerator.log` with the optimizer step also as the `optim/step` value that the
    declared metrics are plotted against (a no-op without trackers)."""
    accelerator.log({**values, STEP_METRIC: step}, step=step)


def overlay_image(image: torch.Tensor, pred: torch.Tensor, truth: torch.Tensor | None,
                  caption: str) -> Any:
    """A `wandb.Image` of one RGB image (3×H×W, uint8 or float in [0, 1]) with its prediction
    and truth (H×W or 1×H×W, bool or {0, 1}) as class masks 0 = background, 1 = lesion."""
    import wandb

    rgb = image.detach()
    if rgb.dtype != torch.uint8:
        rgb = (rgb.float().clamp(0, 1) * 255).round().to(torch.uint8)
    rgb = rgb.permute(1, 2, 0).cpu().numpy()
    masks = {"prediction": {"mask_data": _mask_array(pred), "class_labels": CLASS_LABELS}}
    if truth is not None:
        masks["ground_truth"] = {"mask_data": _mask_array(truth), "class_labels": CLASS_LABELS}
    return wandb.Image(rgb, masks=masks, caption=caption)


def _mask_array(mask: torch.Tensor) -> np.ndarray:
    """H×W uint8 {0, 1} numpy array from a bool / {0, 1} tensor of H×W or 1×H×W."""
    m = mask.detach().cpu()
    if m.ndim == 3:
        m = m[0]
    return (m > 0).to(torch.uint8).numpy()


def log_overlays(accelerator: Any, cfg: Config,
                 samples: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]],
                 step: int) -> None:
    """Log (id, image, prediction, truth) samples as overlays under `val/overlays`."""
    if cfg.tracking.backend != "wandb" or not accelerator.is_main_process or not samples:
        return
    images = [overlay_image(img, pred, truth, sid) for sid, img, pred, truth in samples]
    accelerator.log({"val/overlays": images}, step=step)


INFER_COLUMNS = ("id", "overlay", "status", "dice", "jaccard", "sensitivity", "specificity",
                 "pred_fraction", "uncertainty", "expected_dice", "needs_review", "fp", "fn",
                 "split", "input", "mask")


def log_inference(out: Path, summary: dict[str, Any], rows: list[dict[str, Any]], thumbs: Path,
                  tracking: dict[str, Any], images: int = 60) -> str:
    """Log an inference job's results as a W&B run of its own (job type "inference", under
    `tracking.dir` or `out`): a Table `infer/images` with a row per image and its overlay
    thumbnail (when the report wrote one) and its quality columns (lesionseg.quality),
    `infer/overlays` (the `images` worst by Dice, else largest predicted lesion first), and the
    means, counts, device, precision, a degenerate checkpoint's `warning` and review figures
    (`infer/review/*`) as the run summary. Offline, W&B writes the images of a Table as the
    word "Image" (wandb #4611), so there the Table's overlay column holds the thumbnail's path
    under `out` and the images go through `infer/overlays`. Returns the run's folder."""
    import wandb

    mode = os.environ.get("WANDB_MODE") or tracking.get("mode", "offline")
    folder = Path(tracking.get("dir") or out)
    folder.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=tracking.get("project", "lesionseg"), job_type="inference",
                     name=tracking.get("run_name") or f"infer-{Path(out).resolve().name}",
                     group=tracking.get("group"), dir=str(folder), mode=mode,
                     config={"checkpoint": summary.get("checkpoint", {}).get("path"),
                             **summary.get("config", {})})
    try:
        table = wandb.Table(columns=list(INFER_COLUMNS))
        for r in rows:
            thumb = thumbs / f"{r['id']}.jpg"
            overlay = None
            if thumb.is_file():
                overlay = (wandb.Image(str(thumb), caption=r["id"]) if mode == "online"
                           else str(thumb.relative_to(out)) if thumb.is_relative_to(out) else str(thumb))
            table.add_data(*[overlay if c == "overlay" else r.get(c) for c in INFER_COLUMNS])
        ranked = sorted(rows, key=lambda r: (r.get("dice") is None, r.get("dice") or 0,
                                             -(r.get("pred_fraction") or 0), r["id"]))
        overlays = [wandb.Image(str(thumbs / f"{r['id']}.jpg"), caption=r["id"]) for r in ranked
                    if (thumbs / f"{r['id']}.jpg").is_file()][:images]
        # commit=True: the row is complete now, not left open for a later log call.
        run.log({"infer/images": table, **({"infer/overlays": overlays} if overlays else {})},
                commit=True)
        values = {f"infer/{k}": v for k, v in (summary.get("means") or {}).items() if v is not None}
        # Each split's own means; the pooled ones above say which splits they pool.
        values.update({f"infer/{split}/{k}": v
                       for split, means in (summary.get("means_by_split") or {}).items()
                       for k, v in means.items() if v is not None})
        if summary.get("means_note"):
            values["infer/means_note"] = summary["means_note"]
        values.update({f"infer/{k}": summary.get(k) for k in (
            "images_found", "masks_written", "scored", "without_truth", "errors", "device",
            "precision", "warning") if summary.get(k) is not None})
        review = summary.get("review") or {}
        values.update({f"infer/review/{k}": v for k, v in
                       {**review, **(review.get("with_truth") or {})}.items()
                       if isinstance(v, int | float) and not isinstance(v, bool)})
        run.summary.update(values)
        log.info("W&B inference run %s (%s) under %s", run.id, mode, folder)
        return str(Path(run.dir).parent)
    finally:
        run.finish()


def cross_validation_group(root: Path, cfg: Config) -> str:
    """The W&B group of a cross-validation's folds and its summary: tracking.group, else the
    run folder's name."""
    return cfg.tracking.group or Path(root).resolve().name


def log_cross_validation(root: Path, summary: dict[str, Any], cfg: Config) -> str:
    """Log a cross-validation's out-of-fold summary (lesionseg.crossval) as a W&B run of job
    type "cross-validation" in the folds' group: pooled means as `cv/<score>`, the spread of
    the fold means as `cv/<score>_fold_mean` / `_fold_std`, each fold's as
    `cv/fold_<I>/<score>`, and a `cv/folds_table` Table. Returns the run's folder."""
    import wandb

    t = cfg.tracking
    mode = os.environ.get("WANDB_MODE") or t.mode
    folder = Path(t.dir or Path(root) / "cv")
    folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"-fold-[0-9]+$", "", t.run_name or "") or Path(root).resolve().name
    run = wandb.init(project=t.project, job_type="cross-validation",
                     group=cross_validation_group(root, cfg), name=f"{name}-cv", dir=str(folder),
                     mode=mode, config=to_dict(cfg))
    try:
        names = ("dice", "jaccard", "threshold_jaccard", "sensitivity", "specificity", "accuracy")
        values: dict[str, Any] = {f"cv/{k}": summary["means"][k] for k in names}
        for k in names:
            values[f"cv/{k}_fold_mean"] = summary["spread"][k]["mean"]
            values[f"cv/{k}_fold_std"] = summary["spread"][k]["std"]
        for f in summary["per_fold"]:
            values.update({f"cv/fold_{f['fold']}/{k}": f["means"][k] for k in names})
        values.update({"cv/cases": summary["cases"], "cv/folds": summary["folds"],
                       "cv/threshold": summary["threshold"], "cv/postprocess": summary["postprocess"]})
        table = wandb.Table(columns=["fold", "images", *names])
        for f in summary["per_fold"]:
            table.add_data(f["fold"], f["images"], *[f["means"][k] for k in names])
        run.log({"cv/folds_table": table}, commit=True)
        run.summary.update(values)
        log.info("W&B cross-validation run %s (%s) under %s", run.id, mode, folder)
        return str(Path(run.dir).parent)
    finally:
        run.finish()


def set_summary(accelerator: Any, cfg: Config, values: dict[str, Any]) -> None:
    """Put `values` into the training run's W&B summary (main process; a no-op without W&B),
    e.g. the degenerate-model warning, which must be seen without opening the logs."""
    if cfg.tracking.backend != "wandb" or not accelerator.is_main_process:
        return
    accelerator.get_tracker("wandb", unwrap=True).summary.update(values)


def finish(accelerator: Any, exit_code: int = 0) -> None:
    """Flush and close the trackers, whatever ended the run (done, a stop, an error): an
    offline run's last records and its exit record (`exit_code`) reach the .wandb file, so it
    syncs complete (wandb-core writes the file's last block when the run's stream closes, just
    after finish() returns; at the latest when the process exits). A tracker that cannot finish
    (its service killed) is one warning."""
    for tracker in accelerator.trackers:
        run = tracker.tracker if tracker.name == "wandb" else None
        try:
            if run is not None:
                run.finish(exit_code=exit_code)
            else:
                tracker.finish()
        except Exception as e:  # noqa: BLE001 - a tracker's failure must not hide the run's
            log.warning("%s could not finish its run: %s", tracker.name,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
    accelerator.trackers = []
