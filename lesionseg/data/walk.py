"""The one walk over an input path: a folder (recursive; zips, and tars where asked, inside it
read in place), a zip or tar archive, or a single file. Every file met becomes an `Entry` (its
`Blob`, its path inside the folder or archive, its size, and why it is skipped, if it is), and
an archive that cannot be listed, or whose listing stops early, a `Damaged`.

What counts as junk (`__MACOSX/`, `._x` resource forks, `.DS_Store`, dot-folders), which
member names are unsafe, the size limit and how members are named are decided here once, for
ISIC discovery (`data.isic`) and inference inputs (`data.sources`) alike; each phrases its own
errors. Nothing is extracted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lesionseg.data.archive import ArchiveError, Blob, list_tar, list_zip, oversize

IGNORED_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db"}
ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# Reasons a file is skipped (counted, never read).
SKIP_HIDDEN = "hidden or resource-fork file"
SKIP_LINK = "not a regular file (link, device or folder)"


def member_parts(member: str) -> tuple[str, ...]:
    """An archive member's path parts, whatever its separators ('/' or '\\')."""
    return PurePosixPath(member.replace("\\", "/")).parts


def is_junk(parts: tuple[str, ...]) -> bool:
    """Whether a path holds a hidden part or an OS's litter (`__MACOSX`, `._x`, `.DS_Store`)."""
    return any(p in IGNORED_NAMES or p.startswith(".") for p in parts if p not in ("", ".", ".."))


def unsafe_member(name: str) -> bool:
    """Absolute paths, drive letters, backslashes or '..' parts: never trust such a name."""
    return (name.startswith(("/", "\\")) or "\\" in name or re.match(r"^[A-Za-z]:", name) is not None
            or ".." in PurePosixPath(name).parts)


def archive_stem(name: str) -> str:
    """An archive's name without its archive suffix (`batch1.tar.gz` → batch1)."""
    for suffix in sorted((*ZIP_SUFFIXES, *TAR_SUFFIXES), key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class Entry:
    """One file found: where its bytes are, its path inside the folder or archive it was found
    in, and for a member of an archive inside a folder the archive's folders and stem."""

    blob: Blob
    parts: tuple[str, ...]
    prefix: tuple[str, ...] = ()
    size: int = 0
    skip: str = ""  # SKIP_HIDDEN or SKIP_LINK: not a candidate; "" = a candidate

    @property
    def unsafe(self) -> bool:
        """An archive member whose name is absolute or climbs out ('..')."""
        return self.blob.kind != "file" and unsafe_member(self.blob.member)

    @property
    def oversize(self) -> str | None:
        """Why the file is refused unread for its size, or None."""
        return oversize(self.size)


@dataclass(frozen=True)
class Damaged:
    """An archive that cannot be listed (`listed` False), or whose listing stopped early after
    its first members were yielded (`listed` True), and why."""

    path: str
    reason: str
    listed: bool

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def walk(path: Path, *, tars: bool = True) -> Iterator[Entry | Damaged]:
    """Every file in `path` (an existing folder or file), folders in sorted order, archives in
    member order. With `tars` False, tar archives are files like any other."""
    if path.is_dir():
        yield from _walk_folder(path, tars)
    else:
        yield from _walk_file(path, (path.name,), (), tars)


def _walk_folder(folder: Path, tars: bool) -> Iterator[Entry | Damaged]:
    for path in sorted(folder.rglob("*")):
        if not path.is_dir():
            rel = path.relative_to(folder).parts
            yield from _walk_file(path, rel, (*rel[:-1], archive_stem(path.name)), tars)


def _walk_file(path: Path, rel: tuple[str, ...], prefix: tuple[str, ...],
               tars: bool) -> Iterator[Entry | Damaged]:
    """One file at `rel` inside its input; an archive's members get `prefix` (its folders and
    stem when found in a folder, nothing when it is the input itself)."""
    name = path.name.lower()
    if is_junk(rel):
        yield Entry(Blob("file", str(path)), rel, skip=SKIP_HIDDEN)
    elif not path.is_file():
        yield Entry(Blob("file", str(path)), rel, skip=SKIP_LINK)
    elif name.endswith(ZIP_SUFFIXES):
        yield from _walk_zip(path, prefix)
    elif tars and name.endswith(TAR_SUFFIXES):
        yield from _walk_tar(path, prefix)
    else:
        yield _entry(Blob("file", str(path)), rel, (), path.stat().st_size)


def _entry(blob: Blob, parts: tuple[str, ...], prefix: tuple[str, ...], size: int) -> Entry:
    return Entry(blob, parts, prefix, size, SKIP_HIDDEN if is_junk(parts) else "")


def _walk_zip(path: Path, prefix: tuple[str, ...]) -> Iterator[Entry | Damaged]:
    try:
        infos = list_zip(path)
    except ArchiveError as e:
        yield Damaged(e.path, e.reason, listed=False)
        return
    for info in infos:
        yield _entry(Blob("zip", str(path), info.filename), member_parts(info.filename), prefix,
                     info.file_size)


def _walk_tar(path: Path, prefix: tuple[str, ...]) -> Iterator[Entry | Damaged]:
    try:
        members, problem = list_tar(path)
    except ArchiveError as e:
        yield Damaged(e.path, e.reason, listed=False)
        return
    if problem:
        yield Damaged(str(path), problem, listed=True)
    for info in members:
        blob = Blob("tar", str(path), info.name, info.offset_data, info.size)
        entry = _entry(blob, member_parts(info.name), prefix, info.size)
        yield entry if info.isreg() else Entry(blob, entry.parts, prefix, skip=SKIP_LINK)
