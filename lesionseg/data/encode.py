"""Encoding one ISIC case into its shard entries (`jpg`, `png`, `json`) for pack: its split
(val drawn from train by a hash of the id), the size it is stored at, the checks and the
re-encoding only when the original JPEG bytes cannot be kept, and the worker pool."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import signal
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from lesionseg.config import PackConfig
from lesionseg.data.cv import cv2
from lesionseg.data.images import (
    ImageError,
    display_size,
    encode_jpeg,
    encode_png,
    load_image,
)
from lesionseg.data.isic import Case, DataError, Problem, load_case_mask
from lesionseg.errors import UserError


def is_val(case_id: str, seed: int, fraction: float) -> bool:
    """Whether a training case goes to val: a hash of (seed, id), so the choice is the same
    on every machine, rerun and worker count, and adding cases never moves old ones."""
    digest = hashlib.sha256(f"{seed}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def assign_split(case: Case, cfg: PackConfig) -> str:
    """train/val/test of a case: the official test set stays test."""
    if case.split == "test":
        return "test"
    return "val" if is_val(case.id, cfg.split_seed, cfg.val_fraction) else "train"


def stored_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(height, width) an image is stored at: downscaled (never up) to max_side; 0 = as is."""
    longest = max(height, width)
    if max_side <= 0 or longest <= max_side:
        return height, width
    scale = max_side / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


def _probe(raw: bytes, max_side: int) -> tuple[tuple[int, int], tuple[int, int], bool] | None:
    """Header only: (display size, stored size, original bytes can be kept), or None when
    Pillow cannot open it (the image loader then names the problem). Original JPEG bytes are
    kept when they need no change: RGB, no EXIF rotation, no downscaling."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            orig = display_size(img)
            target = stored_size(*orig, max_side)
            orientation = img.getexif().get(0x0112, 1) if img.format == "JPEG" else None
            keep = (img.format == "JPEG" and img.mode == "RGB" and orientation in (1, None)
                    and target == orig)
            return orig, target, keep
    except Exception:  # any header failure is reported by load_image with the file's name
        return None


def encode_case(case: Case, split: str, cfg: PackConfig) -> tuple[dict[str, bytes], int]:
    """Read, check and encode one case into its shard entries; returns (entries, source bytes).

    Raises ImageError/DataError naming the files when the case is unusable."""
    if case.mask is None:
        raise DataError(f"{case.image}: image without mask")
    raw_image, raw_mask = case.image.read_bytes(), case.mask.read_bytes()
    name = str(case.image)
    probe = _probe(raw_image, cfg.max_side)
    if probe is None:
        load_image(raw_image, name)  # raises the precise error
        raise ImageError(f"{name}: cannot be read as an image")
    orig, target, keep = probe
    if keep:
        image, size = load_image(raw_image, name)  # full decode: truncation is caught here
        jpg = raw_image
    else:
        image, size = load_image(raw_image, name, min_size=min(target) if target != orig else None)
        if image.size != (target[1], target[0]):
            # Area averaging, the reduction training and inference apply too (transforms._sample):
            # a sharper filter (Lanczos) stored images with ~20% more fine detail than the
            # model ever sees at inference, where originals are area-reduced to its input.
            image = Image.fromarray(cv2.resize(np.asarray(image), (target[1], target[0]),
                                               interpolation=cv2.INTER_AREA))
        jpg = encode_jpeg(image, cfg.jpeg_quality)
    mask = load_case_mask(case, raw_mask, size)
    if mask.size != (target[1], target[0]):
        mask = mask.resize((target[1], target[0]), Image.NEAREST)
    meta = {"id": case.id, "orig_size": [size[0], size[1]], "split": split, "source": name}
    entries = {
        "jpg": jpg,
        "png": encode_png(mask),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    return entries, len(raw_image) + len(raw_mask)


def _encode_task(task: tuple[Case, str, PackConfig]) -> tuple[Case, str, Any]:
    """Worker entry: ('ok', (entries, source bytes)) or ('error', Problem) — never raises for
    bad input, so one bad case cannot take down the pool."""
    case, split, cfg = task
    try:
        return case, "ok", encode_case(case, split, cfg)
    except UserError as e:
        files = (str(case.image),) + ((str(case.mask),) if case.mask else ())
        return case, "error", Problem(case.id, files, str(e))


def encoded(tasks: list[tuple[Case, str, PackConfig]], workers: int) -> Iterator[tuple[Case, str, Any]]:
    """Encode tasks in order: in this process for one worker, else in a process pool.

    Fork where the platform has it and this process runs no other thread: unlike spawn it
    does not re-run the caller's main module, so scripts and notebooks without an `if
    __name__ == "__main__"` guard work too. A process that already runs threads (the train
    job building its demo data: tqdm's monitor, W&B) forks its workers from the fork server
    instead: a child forked from a threaded parent can inherit a lock no thread will release
    (CPython gh-112275, Python < 3.12). Workers take the default action of SIGTERM (the pool's
    terminate) and ignore SIGINT (the parent handles Ctrl-C): a Python-level stop handler
    inherited from the parent could miss the terminate while the worker waits for a task,
    and the pool would wait for it forever."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_encode_task, tasks)
        return
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        method = "fork"
    else:
        method = "forkserver" if "forkserver" in methods else "spawn"
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(min(workers, len(tasks)), initializer=_worker_signals) as pool:
        yield from pool.imap(_encode_task, tasks, chunksize=1)


def _worker_signals() -> None:
    """A pack worker: SIGTERM/SIGUSR1 end it at once, SIGINT is the parent's."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
