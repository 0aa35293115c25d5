"""Reading one file's bytes in place: a plain file, a zip member, or a tar member (plain or
compressed) by the offset of its data, with archive handles kept open once per process."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO


@dataclass(frozen=True)
class Blob:
    """Where one file's bytes live: a plain file, a zip member, or a tar member (by the
    offset of its data in the decompressed stream, so reading needs no header scan)."""

    kind: str  # "file", "zip" or "tar"
    path: str  # the file, or the archive holding the member
    member: str = ""  # member name inside the archive (for messages, and zip lookup)
    offset: int = 0  # tar: byte offset of the member's data in the (decompressed) tar stream
    size: int = 0  # tar: member size in bytes

    @property
    def origin(self) -> str:
        """How errors.csv and messages name this file: `path` or `archive:member`."""
        return f"{self.path}:{self.member}" if self.kind != "file" else self.path

    @property
    def name(self) -> str:
        """The base name of the file or member."""
        return base_name(self.member) if self.kind != "file" else Path(self.path).name

    def read(self) -> bytes:
        """The file's bytes. Raises OSError/zipfile errors; callers record them per item."""
        if self.kind == "file":
            return Path(self.path).read_bytes()
        if self.kind == "zip":
            with _LOCK:
                return _zip_handle(self.path).read(self.member)
        if self.kind == "tar":
            with _LOCK:
                stream = _tar_stream(self.path)
                stream.seek(self.offset)
                data = stream.read(self.size)
            if len(data) != self.size:
                raise OSError(f"archive ended early: got {len(data)} of {self.size} bytes")
            return data
        raise ValueError(f"unknown blob kind {self.kind!r}")


# Archive handles are per process (keyed by pid): a handle inherited across fork shares its
# file offset with the parent, and concurrent seeks from two processes would corrupt reads.
_HANDLES: dict[tuple[int, str, str], object] = {}
_LOCK = threading.Lock()


def _cached(kind: str, path: str, opener) -> object:
    key = (os.getpid(), kind, path)
    handle = _HANDLES.get(key)
    if handle is None:
        for stale in [k for k in _HANDLES if k[0] != key[0]]:
            del _HANDLES[stale]  # the parent's handles: drop (never close) them in a child
        handle = _HANDLES[key] = opener(path)
    return handle


def _zip_handle(path: str) -> zipfile.ZipFile:
    return _cached("zip", path, zipfile.ZipFile)  # type: ignore[return-value]


def open_decompressed(path: str) -> BinaryIO:
    """The tar stream of `path`, decompressed by its magic bytes (gzip, bzip2, xz or none)."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if magic.startswith(b"BZh"):
        return bz2.open(path, "rb")  # type: ignore[return-value]
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _tar_stream(path: str) -> BinaryIO:
    return _cached("tar", path, open_decompressed)  # type: ignore[return-value]


def is_compressed_tar(path: str) -> bool:
    """Whether reading a member of this tar means decompressing everything before it."""
    with open(path, "rb") as f:
        magic = f.read(6)
    return magic.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"))


def base_name(member: str) -> str:
    """Base name of an archive member, whatever its separators ('/' or '\\')."""
    return PurePosixPath(member.replace("\\", "/")).name
