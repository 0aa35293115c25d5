"""Training states on disk: save, verify, pick the newest intact one, load it without running
anything a state file could smuggle in.

A state is `<output_dir>/states/step-NNNNNNN`: what `accelerator.save_state` writes (model
weights as safetensors, optimizer, RNG states, grad scaler), plus our own progress and LR
scheduler as JSON, plus a completion marker written last that lists every file with its
size and sha256. It is written under a temporary name and renamed into place.

Safety: our own objects are never registered with Accelerate (its `load_custom_state`
unpickles with weights_only=False), and every pickle-based file of a state is first loaded
with weights_only=True; a state with one that cannot be is refused, so a folder someone else
wrote cannot run code on resume. A state whose files differ from its marker (truncated,
altered, half-deleted) is skipped with a warning naming the file, and moved aside.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from lesionseg.errors import UserError, first_line
from lesionseg.files import atomic_write_text, current_umask, sha256_file

log = logging.getLogger(__name__)

STATES = "states"
TMP_PREFIX = ".tmp-"  # folders being written or pruned; removed at the next save
DAMAGED_PREFIX = "damaged-"  # states that failed verification, kept for inspection
PROGRESS_FILE = "progress.json"
SCHEDULER_FILE = "scheduler.json"
MARKER_FILE = "complete.json"  # written last: {"step", "files": {name: {"bytes", "sha256"}}}
PICKLED_SUFFIXES = (".bin", ".pkl", ".pt")  # torch.save files Accelerate writes


class StateError(UserError):
    """A training state that cannot be used; the message names the folder and the file."""


def step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def state_dirs(run_dir: Path) -> list[Path]:
    """States under run_dir/states that claim to be complete (a marker, or the progress
    file of a state written before markers existed), oldest first."""
    root = run_dir / STATES
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()
             and ((p / MARKER_FILE).is_file() or (p / PROGRESS_FILE).is_file())]
    return sorted(found, key=step_of)


# --------------------------------------------------------------------------- save


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_marker(folder: Path, step: int) -> None:
    """List every file of the state with its size and sha256; written last."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER_FILE}
    atomic_write_text(folder / MARKER_FILE, json.dumps({"step": step, "files": files}, indent=1))


def _remove(path: Path, root: Path) -> None:
    """Rename out of sight first, then delete: a kill mid-delete leaves only a `.tmp-`
    folder (removed at the next save), never a half-deleted state."""
    doomed = root / f"{TMP_PREFIX}removed-{path.name}"
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _follow_umask(folder: Path) -> None:
    """safetensors writes model.safetensors 0600; give every file of the state the mode an
    ordinary write gives (0666 minus the umask), so colleagues can read a shared run."""
    mode = 0o666 & ~current_umask()
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, mode)


def save_state(accelerator: Any, run_dir: Path, progress: Any, scheduler: Any, keep: int) -> Path:
    """accelerator.save_state into a temporary folder, our progress and scheduler as JSON,
    the marker, then an atomic rename to step-N; prune to the newest `keep`. All ranks call
    this (each writes its RNG state)."""
    root = run_dir / STATES
    final = root / f"step-{progress.step:07d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _follow_umask(tmp)
        (tmp / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()) + "\n")
        (tmp / PROGRESS_FILE).write_text(json.dumps(progress.state_dict()) + "\n")
        write_marker(tmp, progress.step)
        if final.exists():  # the same step saved again (e.g. stopped right after a resume)
            _remove(final, root)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in state_dirs(run_dir)[:-keep]:
            _remove(old, root)
        for stale in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        log.info("state saved: %s", final)
    accelerator.wait_for_everyone()
    return final


# --------------------------------------------------------------------------- verify


def _safe_load(path: Path) -> Any:
    """torch.load with weights_only=True (numpy arrays allowed, as Accelerate does for RNG
    states): tensors, numbers, strings and containers only, never code."""
    from accelerate.utils import load

    return load(path, map_location="cpu", weights_only=True)


def state_problem(folder: Path) -> str | None:
    """What is wrong with a state (None = usable): files missing or differing from the
    marker, unreadable JSON, or a pickle that weights_only=True refuses."""
    marker = folder / MARKER_FILE
    if marker.is_file():
        try:
            listed = json.loads(marker.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{marker}: unreadable completion marker ({first_line(e)})"
        for name, want in listed.items():
            path = folder / name
            if not path.is_file():
                return f"{path}: missing (listed in {MARKER_FILE})"
            size = path.stat().st_size
            if size != want["bytes"]:
                return f"{path}: {size} bytes, {MARKER_FILE} says {want['bytes']} (truncated?)"
            if sha256_file(path) != want["sha256"]:
                return f"{path}: sha256 differs from {MARKER_FILE} (altered or corrupt)"
    else:
        return (f"{folder}: no {MARKER_FILE} (an incomplete state, or one written by an older "
                "lesionseg)")
    for name in (PROGRESS_FILE, SCHEDULER_FILE):
        path = folder / name
        if not path.is_file():
            return f"{path}: missing (not a lesionseg training state)"
        try:
            if not isinstance(json.loads(path.read_text()), dict):
                return f"{path}: not a JSON object"
        except (OSError, ValueError) as e:
            return f"{path}: not valid JSON ({first_line(e)})"
    custom = sorted(p.name for p in folder.glob("custom_checkpoint_*.pkl"))
    if custom:  # Accelerate would unpickle these with weights_only=False
        return (f"{folder / custom[0]}: refused, a custom pickle that Accelerate loads with "
                "weights_only=False (foreign, or written by an older lesionseg; set "
                "train.resume=none to start over)")
    for path in sorted(folder.iterdir()):
        if path.suffix in PICKLED_SUFFIXES and path.is_file():
            try:
                _safe_load(path)
            except Exception as e:  # noqa: BLE001 (any failure means: do not load this state)
                return (f"{path}: refused, not loadable with weights_only=True "
                        f"({type(e).__name__}: {first_line(e)[:200]})")
    return None


def choose_state(accelerator: Any, resume: str, run_dir: Path) -> Path | None:
    """The state to resume from: train.resume=none, a path (must be intact), or auto: the
    newest intact state, skipping (with a warning, and moved aside to `damaged-step-N`)
    damaged newer ones. The main process decides; every rank gets its answer."""
    choice: list[str | None] = [None]
    error: list[str | None] = [None]
    if accelerator.is_main_process:
        try:
            found = _choose(resume, run_dir)
            choice[0] = None if found is None else str(found)
        except StateError as e:
            error[0] = str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        pair = broadcast_object_list([choice[0], error[0]], from_process=0)
        choice[0], error[0] = pair[0], pair[1]
    if error[0]:
        raise StateError(error[0])
    return None if choice[0] is None else Path(choice[0])


def _choose(resume: str, run_dir: Path) -> Path | None:
    root = run_dir / STATES
    for stale in root.glob(f"{TMP_PREFIX}*") if root.is_dir() else ():
        shutil.rmtree(stale, ignore_errors=True)  # a save or prune that was killed midway
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise StateError(f"train.resume={resume}: not a folder (expected "
                             f"{run_dir / STATES}/step-NNNNNNN)")
        problem = state_problem(path)
        if problem:
            raise StateError(f"train.resume={resume}: {problem}")
        return path
    damaged: list[tuple[Path, str]] = []
    chosen = None
    for path in reversed(state_dirs(run_dir)):
        problem = state_problem(path)
        if problem is None:
            chosen = path
            break
        damaged.append((path, problem))
    if damaged and chosen is None:
        raise StateError(f"{run_dir / STATES}: no intact training state; newest: "
                         f"{damaged[0][1]} (delete the states to start over, or set "
                         "train.resume=none)")
    for path, problem in damaged:
        aside = path.with_name(f"{DAMAGED_PREFIX}{path.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
        log.warning("skipping damaged training state %s: %s; moved to %s, resuming from %s",
                    path.name, problem, aside, chosen)
    return chosen


# --------------------------------------------------------------------------- load


def load_state(accelerator: Any, folder: Path, progress: Any, scheduler: Any) -> None:
    """Load a state chosen by `choose_state`: Accelerate restores model, optimizer, scaler and
    RNG (all with weights_only=True: nothing of ours is registered with it); progress and
    scheduler come from our JSON."""
    try:
        accelerator.load_state(str(folder))
        progress.load_state_dict(json.loads((folder / PROGRESS_FILE).read_text()))
        scheduler.load_state_dict(json.loads((folder / SCHEDULER_FILE).read_text()))
    except (OSError, RuntimeError, ValueError, KeyError) as e:  # safetensors, shapes, JSON
        raise StateError(f"{folder}: cannot be loaded ({type(e).__name__}: "
                         f"{first_line(e)[:300]}); set train.resume=none to start over") from None
