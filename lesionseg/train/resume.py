"""Where a run stands (`Progress`) and resuming it (`train.resume=auto|none|PATH`).

States are written by lesionseg.states (`accelerator.save_state` into a temporary folder,
renamed when complete, verified by a marker of sizes and sha256s). A state's progress also
holds the settings an exact resume needs (`resume_settings`): a resume with others is refused
unless train.resume_with_changes; raising optim.max_steps/epochs extends a finished run. With
the same world size, batch size, data.num_workers, grad accumulation and train.num_threads
(set it > 0 for exactness on CPU), a CPU run killed at any moment and resumed ends with
bit-identical weights (tested); on GPU train.deterministic=true is needed too (not verified).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lesionseg import states
from lesionseg.config import Config, ConfigError, to_dict
from lesionseg.train import LOGGER
from lesionseg.train.schedule import Schedule

log = logging.getLogger(LOGGER)

METRICS_FILE = "metrics.jsonl"  # one line per validation, in train.output_dir


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
# for more steps goes on), nor model.encoder_weights / model.init_from (the state holds the weights).
RESUME_FREE_KEYS = {"optim.epochs", "optim.max_steps", "model.encoder_weights", "model.init_from",
                    "data.pin_memory",
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


# What a run folder holds that comes from its weights, besides them: model cards, a fold's
# out-of-fold predictions, and exports beside best.pt (`lesionseg export`: .onnx, .ts, …).
DERIVED_NAMES = ("MODEL_CARD.md", "oof.npz")
DERIVED_SUFFIXES = (".onnx", ".ts", ".torchscript", ".pt", ".pth")


def set_aside_previous_run(run_dir: Path) -> Path | None:
    """train.resume=none in a folder holding a run: move its states, weights, config, metrics,
    W&B id and everything derived from the weights (exports, model cards) into
    `replaced-<time>/`, so that nothing of it is resumed or mistaken for the new run's (an
    old best.onnx beside a new best.pt would run the old model). Main process only."""
    names = (states.STATES, "best.pt", "last.pt", "config.yaml", METRICS_FILE, "wandb_run_id",
             "wandb_segments", *DERIVED_NAMES)
    present = [run_dir / n for n in names if (run_dir / n).exists()]
    present += [p for p in sorted(run_dir.iterdir()) if p.is_file() and p not in present
                and p.name.lower().endswith(DERIVED_SUFFIXES)]
    if not any(p.name in (states.STATES, "best.pt", "last.pt") for p in present):
        return None
    aside = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for p in present:
        os.replace(p, aside / p.name)
    log.warning("train.resume=none: the run that was in %s is moved to %s", run_dir, aside)
    return aside


def resume_run(accelerator: Any, cfg: Config, given: Config, run_dir: Path, progress: Progress,
               scheduler: Any, schedule: Schedule
               ) -> tuple[Path | None, list[tuple[str, Any, Any]]]:
    """Set an old run aside (train.resume=none), or load the state to resume into `progress`,
    the prepared model and optimizer, and the scheduler. `given` is the config as the user
    gave it (recipe keys unresolved): what the state's settings must match. Returns the state
    resumed from (None: a fresh start) and the settings that differ from the state's."""
    world = accelerator.num_processes
    if cfg.train.resume == "none" and accelerator.is_main_process and run_dir.is_dir():
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
    return resume_from, changed


def _log_extension(progress: Progress, schedule: Schedule) -> None:
    """Say what a resume does to the end of the run: nothing left, or going on past it."""
    if progress.step >= schedule.total_steps:
        log.info("this run finished at step %d; nothing to train (raise optim.max_steps or "
                 "optim.epochs to extend it)", progress.step)
    elif progress.step and progress.micro == 0 and progress.extra.get("finished_at") == progress.step:
        log.info("extending the finished run from step %d to %d (the learning-rate schedule "
                 "is recomputed for %d steps)", progress.step, schedule.total_steps,
                 schedule.total_steps)
