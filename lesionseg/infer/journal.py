"""The part files of a run under `<out>/parts/`: one fsynced row per image (`RowLog`), the
ids already done, the run signature every part must share, and the done markers. The layout
of --out (folder names) is named here too."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lesionseg.errors import environment_message
from lesionseg.infer import InferenceError

log = logging.getLogger(__name__)

PARTS = "parts"  # under --out: per (part, rank) row files, done markers, run.json
MASKS, PROBS, OVERLAYS, THUMBS = "masks", "probs", "overlays", "thumbs"  # --out folders
DONE_FILE_RE = re.compile(r"^done-p(\d+)-r(\d+)-of-(\d+)\.json$")
# Run settings that must match when a part resumes or joins an existing --out.
SIGNATURE_KEYS = ("num_shards", "inputs", "masks", "checkpoint_sha256", "image_size",
                  "threshold", "postprocess", "tta", "splits", "empty_fallback", "refine")
# What a signature written before a key existed meant by its absence.
SIGNATURE_BEFORE = {"empty_fallback": 0.0, "refine": 0}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The complete rows of a part file (a torn last line, from a kill, is ignored)."""
    rows = []
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                rows.append(json.loads(line))
            except ValueError:
                log.warning("%s: skipping a malformed row", path)
    return rows


class RowLog:
    """One process's append-only row file: whole lines only, each flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_torn_tail()
        self.file = open(path, "ab")  # noqa: SIM115 (held open across appends; see close)

    def _drop_torn_tail(self) -> None:
        """Truncate a last line without its newline (the process died mid-write)."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning("%s: dropping a torn last row (%d bytes)", self.path, len(data) - keep)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def append(self, row: dict[str, Any]) -> None:
        try:
            self.file.write(json.dumps(row, sort_keys=True).encode("utf-8") + b"\n")
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as e:  # a torn line is dropped when the file is opened again
            raise InferenceError(environment_message(e, f"{self.path}: appending a row")) from None

    def close(self) -> None:
        self.file.close()


@contextlib.contextmanager
def part_lock(parts_dir: Path, part: int, rank: int) -> Iterator[None]:
    """Hold the work of one (part, rank) in this --out: a second identical run waits here
    for the first (an flock, released when its holder ends, however it ends), then does
    only what the first left undone instead of all of it again."""
    path = parts_dir / f"lock-p{part:04d}-r{rank:03d}"
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another run is working on part %d (process %d) of %s; waiting for "
                        "it, then doing only what it leaves undone", part, rank,
                        parts_dir.parent)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


RETRIED_STATUSES = ("error", "failed")  # rows that --retry-failed does again


def done_ids(parts_dir: Path, retry_failed: bool = False) -> set[str]:
    """Ids with a row in any part file: finished (or recorded as failed) by an earlier run;
    with `retry_failed`, only those with a row that is not an error or a failed score."""
    ids: set[str] = set()
    for path in sorted(parts_dir.glob("rows-*.jsonl")):
        ids.update(r["id"] for r in read_rows(path)
                   if "id" in r and not (retry_failed and r.get("status") in RETRIED_STATUSES))
    return ids


SIGNATURE_FILE = "signature.json"  # under parts/: created exclusively by the first run


def check_signature(parts_dir: Path, signature: dict[str, Any]) -> None:
    """Claim the output folder for this run's settings, or refuse to mix with a different run.

    The first run creates parts/signature.json exclusively (O_EXCL: of two runs racing into
    one --out exactly one creates it); every other run, part or rank compares its settings
    with it. Reading run.json instead left a window in which two runs with different
    checkpoints both passed and mixed their rows."""
    path = parts_dir / SIGNATURE_FILE
    data = json.dumps({k: signature[k] for k in SIGNATURE_KEYS}, sort_keys=True).encode()
    legacy = parts_dir / "run.json"  # an --out written before signature.json existed
    if not path.exists() and legacy.exists():
        _compare_signature(path, json.loads(legacy.read_text()).get("signature", {}), signature)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        _compare_signature(path, _read_signature(path), signature)
        return
    with os.fdopen(fd, "wb") as f:
        f.write(data + b"\n")
        f.flush()
        os.fsync(f.fileno())


def _read_signature(path: Path, wait_s: float = 10.0) -> dict[str, Any]:
    """The claimed signature; its creator may still be writing it (a few bytes): wait."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            raw = path.read_bytes()
            if raw.endswith(b"\n"):
                return json.loads(raw)
        except ValueError:
            pass
        if time.monotonic() > deadline:
            raise InferenceError(f"{path}: unreadable; delete it (or use a new --out) if no "
                                 "other run is starting there")
        time.sleep(0.05)


def _compare_signature(path: Path, previous: dict[str, Any], signature: dict[str, Any]) -> None:
    differ = [k for k in SIGNATURE_KEYS
              if previous.get(k, SIGNATURE_BEFORE.get(k)) != signature[k]]
    if differ:
        raise InferenceError(
            f"{path.parent.parent}: holds a run with different {', '.join(differ)}; "
            "use a new --out (or the same settings to resume)")


def parts_done(parts_dir: Path, num_shards: int) -> tuple[bool, list[int]]:
    """(all parts done, missing parts): a part is done when every rank of some world size
    left its marker."""
    markers: dict[tuple[int, int], set[int]] = {}
    for path in parts_dir.glob("done-*.json"):
        m = DONE_FILE_RE.match(path.name)
        if m:
            part, rank, world = (int(g) for g in m.groups())
            markers.setdefault((part, world), set()).add(rank)
    missing = [p for p in range(num_shards)
               if not any(part == p and len(ranks) == world for (part, world), ranks in markers.items())]
    return not missing, missing
