"""Atomic file writes and hashes: every output is written to a temporary name, then renamed,
so a process killed at any moment leaves either the old file or the complete new one; and the
work folder of the benchmark and GPU-check commands."""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from lesionseg.errors import UserError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (/proc); elsewhere by
    setting and restoring it under a lock."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _final_mode(path: Path) -> int:
    """The mode `open(path, "w")` would leave: an existing file keeps its mode, a new one gets
    0666 minus the umask (mkstemp alone would leave 0600, unreadable to colleagues)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def check_output_dir(path: str | Path, name: str) -> Path:
    """`path` as an output folder: refused with a UserError naming `name` (the flag or config
    key) when it, or a folder above it, is an existing file. The folder itself is not made."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                what = "is" if p == path else f"is inside {p}, which is"
                raise UserError(f"{name}={path}: {what} an existing file, not a folder; "
                                "choose a folder path")
            break
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename; the
    file ends with the mode an ordinary write would have given it (umask respected)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _final_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, hashed memory-mapped in one call: hashlib lets go of the GIL for
    the whole file (a thread hashing runs beside Python work; chunked reads each wait for
    the GIL). Files that cannot be mapped (empty, some file systems) are read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        try:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                h.update(mapped)
                return h.hexdigest()
        except (OSError, ValueError):
            pass
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def work_folder(path: str | None, prefix: str) -> Iterator[Path]:
    """The given folder (created, kept), or a temporary one (`prefix`…) removed afterwards."""
    if path:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder.resolve()
        return
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
