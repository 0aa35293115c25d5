"""Archives and files read in place: listing a zip or a tar (plain or compressed) with its
limits and damage checks, and reading one file's bytes — a plain file, a zip member, or a tar
member by the offset of its data — with archive handles kept open once per process.

This is the one module that opens zips and tars; `walk` (the input walk) and the shard format's
raw reader build on it."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import tarfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from lesionseg.errors import DataError, UserError, first_line

MAX_MEMBER_BYTES = 1 << 30  # an archive member (or file) larger than this is refused unread
# A compressed tar is listed only while its members' declared bytes stay under this many times
# its size on disk (and MAX_MEMBER_BYTES): images barely compress, a listing bomb does.
MAX_TAR_EXPANSION = 100


class ArchiveError(UserError, ValueError):
    """An archive that cannot be listed at all (not a zip or tar, or unreadable)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


@dataclass(frozen=True)
class Blob:
    """Where one file's bytes live: a plain file, a zip member, or a tar member (by the
    offset of its data in the decompressed stream, so reading needs no header scan)."""

    kind: str  # "file", "zip" or "tar"
    path: str  # the file, or the archive holding the member
    member: str = ""  # member name inside the archive (for messages, and zip lookup)
    offset: int = 0  # tar: byte offset of the member's data in the (decompressed) tar stream
    size: int = 0  # tar: member size in bytes

    def __str__(self) -> str:
        return self.origin

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
            data = self._tar_bytes(self.size)
            if len(data) != self.size:
                raise OSError(f"archive ended early: got {len(data)} of {self.size} bytes")
            return data
        raise ValueError(f"unknown blob kind {self.kind!r}")

    def byte_size(self) -> int:
        """The file's size in bytes, as its folder or archive declares it (nothing read)."""
        if self.kind == "file":
            return os.path.getsize(self.path)
        if self.kind == "zip":
            with _LOCK:
                return _zip_handle(self.path).getinfo(self.member).file_size
        return self.size

    def head(self, n: int) -> bytes:
        """The file's first `n` bytes (a zip member is inflated only that far)."""
        if self.kind == "file":
            with open(self.path, "rb") as f:
                return f.read(n)
        if self.kind == "zip":
            with _LOCK, _zip_handle(self.path).open(self.member) as f:
                return f.read(n)
        if self.kind == "tar":
            return self._tar_bytes(min(n, self.size))
        raise ValueError(f"unknown blob kind {self.kind!r}")

    def _tar_bytes(self, n: int) -> bytes:
        """Up to `n` bytes of a tar member's data, from its offset in the tar stream."""
        with _LOCK:
            stream = _tar_stream(self.path)
            stream.seek(self.offset)
            return stream.read(n)

    def read_bytes(self) -> bytes:
        """`read`, with a failure raised as one DataError naming the file (for callers that
        stop at the first unreadable file: pack)."""
        try:
            return self.read()
        except (OSError, zipfile.BadZipFile, KeyError, EOFError, RuntimeError) as e:
            raise DataError(f"{self}: cannot be read ({e})") from None


# Archive handles are per process (keyed by pid): a handle inherited across fork shares its
# file offset with the parent, and concurrent seeks from two processes would corrupt reads.
# Each remembers the archive's modification time and size: a rewritten archive is reopened.
_HANDLES: dict[tuple[int, str, str], tuple[tuple[int, int], object]] = {}
_LOCK = threading.Lock()


def _cached(kind: str, path: str, opener) -> object:
    key = (os.getpid(), kind, path)
    st = os.stat(path)
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _HANDLES.get(key)
    if cached is None or cached[0] != stamp:
        for stale in [k for k in _HANDLES if k[0] != key[0]]:
            del _HANDLES[stale]  # the parent's handles: drop (never close) them in a child
        _HANDLES[key] = cached = (stamp, opener(path))
    return cached[1]


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


def oversize(size: int) -> str | None:
    """Why a file (or member) of `size` bytes is refused unread, or None."""
    if size > MAX_MEMBER_BYTES:
        return f"file of {size} bytes exceeds the {MAX_MEMBER_BYTES}-byte limit"
    return None


def list_zip(path: str | Path) -> list[zipfile.ZipInfo]:
    """The members of a zip (folders left out). ArchiveError if it is no readable zip."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [info for info in zf.infolist() if not info.is_dir()]
    except (OSError, zipfile.BadZipFile) as e:
        raise ArchiveError(path, f"not a readable zip file ({e})") from None


class _HeaderTap:
    """A read-only stream that keeps the last header-sized read, so that the block where a
    tar listing stopped can be classified (tarfile reports a clean end either way)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.block, self.block_at = raw, b"", -1

    def read(self, n: int = -1) -> bytes:
        at = self.raw.tell()
        data = self.raw.read(n)
        if n == tarfile.BLOCKSIZE:
            self.block, self.block_at = data, at
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()


def _end_problem(tf: tarfile.TarFile, tap: _HeaderTap, members: int) -> str | None:
    """Why a listing ended, when it ended early: tarfile stops silently at the first invalid
    header past offset 0 (and at a missing end-of-archive marker). None = a proper end."""
    block = tap.block
    where = f"at byte {tf.offset} after {members} member(s)"
    if not block and 0 <= tap.block_at <= tf.offset:  # (a gzip stream stops short of a seek)
        return f"archive ends {where} without tar's end-of-archive blocks (truncated?)"
    if tap.block_at != tf.offset:
        return None
    if not block:
        return f"archive ends {where} without tar's end-of-archive blocks (truncated?)"
    if len(block) < tarfile.BLOCKSIZE:
        return f"archive ends {where} inside a tar header (truncated)"
    if block.count(0) == tarfile.BLOCKSIZE:
        return None
    try:
        tarfile.TarInfo.frombuf(block, tf.encoding, tf.errors)
    except tarfile.HeaderError as e:
        return (f"invalid tar header {where} ({first_line(e)}): the members after it cannot "
                "be read (corrupt archive?)")
    return None


def list_tar(path: str | Path) -> tuple[list[tarfile.TarInfo], str | None]:
    """The members of a tar (plain or compressed) and why the listing stopped early, if it
    did: a damaged header (tarfile would report a clean end), or, for compressed tars, a
    member or a total that declares more bytes than the limits (decompressing past it to the
    next header could take minutes: a listing bomb). ArchiveError if it is no tar at all."""
    path = Path(path)
    compressed = is_compressed_tar(str(path))
    budget = max(MAX_MEMBER_BYTES, MAX_TAR_EXPANSION * path.stat().st_size)
    members: list[tarfile.TarInfo] = []
    try:
        with open_decompressed(str(path)) as raw:
            tap = _HeaderTap(raw)
            with tarfile.open(fileobj=tap, mode="r:") as tf:  # type: ignore[arg-type]
                while True:
                    info = tf.next()
                    if info is None:
                        return members, _end_problem(tf, tap, len(members))
                    members.append(info)
                    if compressed and info.size > MAX_MEMBER_BYTES:
                        return members, (f"member {info.name} declares {info.size} bytes (limit "
                                         f"{MAX_MEMBER_BYTES}): the archive is not listed past it")
                    if compressed and info.offset_data + info.size > budget:
                        return members, (f"members up to {info.name} declare "
                                         f"{info.offset_data + info.size} bytes, over {budget} "
                                         f"({MAX_TAR_EXPANSION}x the archive's size): the "
                                         "archive is not listed past it")
    except (OSError, tarfile.TarError, EOFError) as e:
        raise ArchiveError(path, f"not a readable tar archive ({e})") from None
