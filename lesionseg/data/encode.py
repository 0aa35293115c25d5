"""Encoding one ISIC case into its shard entries (`jpg`, `png`, `json`) for pack: its split
(val drawn from train by a hash of the id), the size it is stored at, the checks and the
re-encoding only when the original JPEG bytes cannot be kept, and the worker pool."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import hashlib
import io
import itertools
import json
import signal
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
from PIL import Image

from lesionseg.config import PackConfig
from lesionseg.data.cv import cv2
from lesionseg.data.images import (
    ImageError,
    check_before_reading,
    display_size,
    encode_jpeg,
    encode_png,
    load_image,
)
from lesionseg.data.isic import Case, DataError, Problem, load_case_mask
from lesionseg.errors import UserError
from lesionseg.workers import default_worker_context, unblock_stop_signals

# Seconds a pack worker may take over one case before the pack is stopped as stuck (the
# largest image Pillow opens takes seconds).
STALL_S = 600.0


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
    check_before_reading(case.image)
    check_before_reading(case.mask)
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


def encoded(tasks: list[tuple[Case, str, PackConfig]], workers: int,
            stall_s: float = STALL_S) -> Iterator[tuple[Case, str, Any]]:
    """Encode tasks in order: in this process for one worker, else in a process pool.

    The pool's workers come from the fork server (`workers.default_worker_context`), never from a
    fork of this process: a process that ran torch, OpenCV or W&B holds native and Python
    threads, and a child forked from it can inherit a lock no thread will release (CPython
    gh-112275; a bench's second pack hung for good on CI). The server imports its own
    modules, never the caller's `__main__`, so scripts without an `if __name__ ==
    "__main__"` guard work too. The pool is concurrent.futures': a worker that dies (an
    out-of-memory kill) breaks it with an error instead of a silent wait, and a case that
    gives no result in `stall_s` seconds is an error naming it. Workers take the default
    action of SIGTERM and ignore SIGINT (the parent handles Ctrl-C). Closing the generator
    (done, an error, Ctrl-C) kills the workers at once."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_encode_task, tasks)
        return
    n = min(workers, len(tasks))
    pool = cf.ProcessPoolExecutor(n, mp_context=default_worker_context(),
                                  initializer=_worker_signals)
    processes: dict[int, Any] = {}
    finished = False
    try:
        pending: collections.deque[tuple[Case, cf.Future]] = collections.deque()
        queue = iter(tasks)
        for task in itertools.islice(queue, 2 * n):
            pending.append((task[0], pool.submit(_encode_task, task)))
        processes.update(pool._processes or {})
        while pending:
            case, future = pending.popleft()
            try:
                result = future.result(timeout=stall_s)
            except cf.TimeoutError:
                raise DataError(f"{case.image}: a pack worker gave no result in {stall_s:g} s "
                                "(stuck or stopped); the pack was stopped") from None
            except BrokenProcessPool:
                raise DataError(f"{case.image}: a pack worker died while encoding (killed, or "
                                "out of memory: try pack.workers=1)") from None
            for task in itertools.islice(queue, 1):
                pending.append((task[0], pool.submit(_encode_task, task)))
            processes.update(pool._processes or {})
            yield result
        finished = True
    finally:
        if not finished:
            for proc in processes.values():
                with contextlib.suppress(OSError, ValueError):
                    proc.kill()
        pool.shutdown(wait=finished, cancel_futures=True)
        for proc in processes.values():
            with contextlib.suppress(ValueError, AssertionError):
                proc.join(timeout=5)


def _worker_signals() -> None:
    """A pack worker: SIGTERM/SIGUSR1 end it at once, SIGINT is the parent's."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    unblock_stop_signals()  # the fork server starts its children with them blocked
