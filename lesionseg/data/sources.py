"""Inference inputs: enumerate images (and their ground truth, if any) from folders, archives
and packed shard folders, without extracting anything.

An input is an image folder (recursive; zips and tars inside it are read in place), a single
image, a `.zip`, a `.tar`/`.tar.gz`/`.tgz` archive, a packed shard folder (`manifest.json` +
`{split}-NNNNNN.tar`; its masks are the truth), an ISIC root or the official zips. Files named
`<id>_Segmentation.png` are ground truth, never inputs; `--masks` folders/zips add more truth,
matched by id, by the 7-digit ISIC number or by stem.

Every image becomes an `Item`: a sanitized id (a file stem with no path parts, so no archive
member name can make an output escape `--out`), a `Blob` that reads its bytes, the truth's
`Blob` or None, and the origin string errors.csv names. Items are plain frozen dataclasses,
picklable for DataLoader workers; archives are opened lazily once per process.
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
import os
import re
import tarfile
import threading
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from lesionseg.data.images import IMAGE_EXTENSIONS
from lesionseg.data.isic import IGNORED_NAMES, MASK_RE
from lesionseg.errors import UserError, first_line

log = logging.getLogger(__name__)

MAX_MEMBER_BYTES = 1 << 30  # an archive member (or file) larger than this is refused unread
# A compressed tar is listed only while its members' declared bytes stay under this many times
# its size on disk (and MAX_MEMBER_BYTES): images barely compress, a listing bomb does.
MAX_TAR_EXPANSION = 100
MANIFEST_NAME = "manifest.json"  # of a packed shard folder (lesionseg.data.shards.MANIFEST)
MAX_ID_CHARS = 150  # ids longer than this are cut (file names stay well under 255 bytes)
ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ISIC_NUMBER_RE = re.compile(r"ISIC_(\d{7})", re.IGNORECASE)
# Reasons a file is skipped (counted, not an error): it is not an image by name.
SKIP_NOT_IMAGE = "not an image (by extension)"
SKIP_HIDDEN = "hidden or resource-fork file"
SKIP_LINK = "not a regular file (link, device or folder)"


class SourceError(UserError, ValueError):
    """An input path that cannot be used at all (missing, unreadable archive, no images)."""


# --------------------------------------------------------------------------- reading bytes


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
        return _base_name(self.member) if self.kind != "file" else Path(self.path).name

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


def _open_decompressed(path: str) -> BinaryIO:
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
    return _cached("tar", path, _open_decompressed)  # type: ignore[return-value]


def is_compressed_tar(path: str) -> bool:
    """Whether reading a member of this tar means decompressing everything before it."""
    with open(path, "rb") as f:
        magic = f.read(6)
    return magic.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"))


# --------------------------------------------------------------------------- items


@dataclass(frozen=True)
class Item:
    """One image to segment: its id, bytes, optional truth and where it came from."""

    id: str
    image: Blob
    truth: Blob | None = None
    # Display (height, width) of the original when the stored image is a downscaled copy
    # (shards keep `orig_size`); None = the image's own display size.
    orig_size: tuple[int, int] | None = None
    # The truth was stored downscaled with the image (shards): resize it (nearest) to orig_size.
    truth_scaled: bool = False

    @property
    def origin(self) -> str:
        return self.image.origin


@dataclass
class Inventory:
    """What `collect` found: the items, the inputs that failed before decoding, skip counts."""

    items: list[Item]
    errors: list[dict[str, str]] = field(default_factory=list)  # {"input", "id", "reason"}
    skipped: Counter = field(default_factory=Counter)  # reason -> number of files
    masks_found: int = 0
    masks_unused: int = 0


def _base_name(member: str) -> str:
    """Base name of an archive member, whatever its separators ('/' or '\\')."""
    return PurePosixPath(member.replace("\\", "/")).name


def sanitize_id(stem: str) -> str:
    """A file stem as a safe id: letters, digits, '.', '_' and '-' only, no leading dots.

    Ids name output files (`masks/<id>_Segmentation.png`), so they can hold no path part."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).lstrip(".")
    text = text[:MAX_ID_CHARS].rstrip(".")
    return text or "unnamed"


def _stem(name: str) -> str:
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix else name


def _classify(rel_parts: tuple[str, ...]) -> tuple[str, str]:
    """('image'|'mask', id) or ('skip', reason) for a file at relative path `rel_parts`."""
    name = rel_parts[-1] if rel_parts else ""
    if any(p in IGNORED_NAMES or p.startswith(".") for p in rel_parts if p not in ("", ".", "..")):
        return "skip", SKIP_HIDDEN
    if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
        return "skip", SKIP_NOT_IMAGE
    m = MASK_RE.match(name)
    if m:
        return "mask", sanitize_id(m.group("id"))
    return "image", sanitize_id(_stem(name))


def _member_parts(member: str) -> tuple[str, ...]:
    return PurePosixPath(member.replace("\\", "/")).parts


def _unsafe(member: str) -> bool:
    """Absolute, drive-letter or '..' member names (harmless here: nothing is extracted)."""
    name = member.replace("\\", "/")
    return name.startswith("/") or re.match(r"^[A-Za-z]:", name) is not None or ".." in name.split("/")


class _Scanner:
    """Walks inputs, sorting every file into images, truth masks or skip counts."""

    def __init__(self, shard_splits: tuple[str, ...]) -> None:
        self.images: list[Item] = []
        self.masks: dict[str, list[Blob]] = defaultdict(list)
        self.errors: list[dict[str, str]] = []
        self.skipped: Counter = Counter()
        self.shard_splits = shard_splits

    def add(self, blob: Blob, rel_parts: tuple[str, ...], size: int, as_truth: bool = False) -> None:
        kind, value = _classify(rel_parts)
        if kind == "skip":
            self.skipped[value] += 1
            return
        if blob.kind != "file" and _unsafe(blob.member):
            log.warning("%s: unsafe member name (absolute or '..'); its id is %r", blob.origin, value)
        if size > MAX_MEMBER_BYTES:
            self.errors.append({"input": blob.origin, "id": value,
                                "reason": f"file of {size} bytes exceeds the {MAX_MEMBER_BYTES}-byte limit"})
            return
        if kind == "mask" or as_truth:
            self.masks[value if kind == "mask" else sanitize_id(_stem(blob.name))].append(blob)
        else:
            self.images.append(Item(value, blob))

    def add_path(self, path: Path, as_truth: bool = False) -> None:
        """Dispatch one input path (folder, shard folder, archive or single file)."""
        if path.is_dir():
            if (path / MANIFEST_NAME).is_file() and not as_truth:
                self.add_shards(path)
            else:
                self.add_dir(path, as_truth)
        elif path.is_file() and path.name.lower().endswith(ZIP_SUFFIXES):
            self.add_zip(path, as_truth)
        elif path.is_file() and path.name.lower().endswith(TAR_SUFFIXES):
            self.add_tar(path, as_truth)
        elif path.is_file():
            self.add(Blob("file", str(path)), (path.name,), path.stat().st_size, as_truth)
        elif path.exists():
            raise SourceError(f"{path}: not a regular file or folder")
        else:
            raise SourceError(f"{path}: input does not exist")

    def add_dir(self, folder: Path, as_truth: bool) -> None:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).parts
            if path.is_dir():
                continue
            if any(p in IGNORED_NAMES or p.startswith(".") for p in rel):
                self.skipped[SKIP_HIDDEN] += 1
            elif not path.is_file():
                self.skipped[SKIP_LINK] += 1
            elif path.name.lower().endswith(ZIP_SUFFIXES):
                self.add_zip(path, as_truth)
            elif path.name.lower().endswith(TAR_SUFFIXES):
                self.add_tar(path, as_truth)
            else:
                self.add(Blob("file", str(path)), rel, path.stat().st_size, as_truth)

    def add_zip(self, path: Path, as_truth: bool) -> None:
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
        except (OSError, zipfile.BadZipFile) as e:
            raise SourceError(f"{path}: not a readable zip file ({e})") from None
        for info in infos:
            if info.is_dir():
                continue
            parts = _member_parts(info.filename)
            self.add(Blob("zip", str(path), info.filename), parts, info.file_size, as_truth)

    def add_tar(self, path: Path, as_truth: bool) -> None:
        members, problem = list_tar(path)
        if problem:
            self.errors.append({"input": str(path), "id": "", "reason": problem})
        for info in members:
            if not info.isreg():
                self.skipped[SKIP_LINK] += 1
                continue
            blob = Blob("tar", str(path), info.name, info.offset_data, info.size)
            self.add(blob, _member_parts(info.name), info.size, as_truth)

    def add_shards(self, folder: Path) -> None:
        """A packed shard folder: one item per sample (`jpg`), truth = its `png`, with the
        original display size from its `json` (images may be stored downscaled)."""
        for tar_path, listed in _shard_files(folder, self.shard_splits):
            samples: dict[str, dict[str, tarfile.TarInfo]] = defaultdict(dict)
            members, problem = list_tar(tar_path)
            for info in members:
                if not info.isreg():
                    continue
                key, ext = _sample_key(info.name)
                samples[key][ext.lower()] = info
            if problem or (listed is not None and len(samples) != listed):
                self.errors.append({"input": str(tar_path), "id": "", "reason": (
                    f"shard holds {len(samples)} readable samples, {MANIFEST_NAME} lists "
                    f"{listed}{f'; {problem}' if problem else ''} (check it with lesionseg "
                    "verify; repack it)")})
            with _open_decompressed(str(tar_path)) as stream:
                metas = {key: _read_meta(stream, parts.get("json")) for key, parts in samples.items()}
            for key, parts in sorted(samples.items()):
                self._add_sample(tar_path, key, parts, metas[key])

    def _add_sample(self, tar_path: Path, key: str, parts: dict[str, tarfile.TarInfo],
                    meta: dict) -> None:
        image = parts.get("jpg")
        sid = sanitize_id(str(meta.get("id") or _base_name(key)))
        if image is None:
            self.errors.append({"input": f"{tar_path}:{key}", "id": sid,
                                "reason": "shard sample has no jpg image"})
            return
        blob = Blob("tar", str(tar_path), image.name, image.offset_data, image.size)
        truth = parts.get("png")
        truth_blob = Blob("tar", str(tar_path), truth.name, truth.offset_data, truth.size) if truth else None
        orig = meta.get("orig_size")
        orig_size = (int(orig[0]), int(orig[1])) if isinstance(orig, list) and len(orig) == 2 else None
        self.images.append(Item(sid, blob, truth_blob, orig_size, truth_scaled=truth is not None))


def _sample_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first '.' of the base name."""
    folder, _, base = name.replace("\\", "/").rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


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
    next header could take minutes: a listing bomb). SourceError if it is no tar at all."""
    path = Path(path)
    compressed = is_compressed_tar(str(path))
    budget = max(MAX_MEMBER_BYTES, MAX_TAR_EXPANSION * path.stat().st_size)
    members: list[tarfile.TarInfo] = []
    try:
        with _open_decompressed(str(path)) as raw:
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
        raise SourceError(f"{path}: not a readable tar archive ({e})") from None


def _read_meta(stream: BinaryIO, info: tarfile.TarInfo | None) -> dict:
    """A shard sample's json (empty dict if missing or unreadable: orig_size is optional)."""
    if info is None:
        return {}
    try:
        stream.seek(info.offset_data)
        meta = json.loads(stream.read(info.size))
    except (OSError, ValueError, EOFError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _shard_files(folder: Path, splits: tuple[str, ...]) -> list[tuple[Path, int | None]]:
    """The shard tars of a packed folder listed by its manifest (all splits unless `splits`),
    each with the number of samples the manifest says it holds."""
    from lesionseg.data.shards import SPLITS, read_manifest, split_urls

    manifest = read_manifest(folder)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise SourceError(f"infer.shard_splits: unknown split(s) {', '.join(unknown)}; "
                          f"choose from {', '.join(SPLITS)}")
    available = [s for s in SPLITS if manifest["splits"][s].get("shards")]
    wanted = [s for s in available if not splits or s in splits]
    if splits and not wanted:
        raise SourceError(f"{folder}: no shards of split(s) {', '.join(splits)} "
                          f"(the manifest has {', '.join(available) or 'none'})")
    counts = {e.get("name"): e.get("samples") for e in manifest["shards"] if isinstance(e, dict)}
    return [(Path(u), counts.get(Path(u).name)) for split in wanted for u in split_urls(folder, split)]


# --------------------------------------------------------------------------- matching


def _mask_index(masks: dict[str, list[Blob]]) -> tuple[dict[str, Blob], dict[str, Blob]]:
    """Truth by id and by 7-digit ISIC number; duplicates keep the first by origin (warned)."""
    by_id: dict[str, Blob] = {}
    by_number: dict[str, Blob] = {}
    for key in sorted(masks):
        blobs = sorted(masks[key], key=lambda b: b.origin)
        if len(blobs) > 1:
            log.warning("truth %s: %d masks (%s); using %s", key, len(blobs),
                        ", ".join(b.origin for b in blobs), blobs[0].origin)
        by_id[key] = blobs[0]
        m = ISIC_NUMBER_RE.search(key)
        if m:
            by_number.setdefault(m.group(1), blobs[0])
    return by_id, by_number


def _match_truth(item: Item, *indexes: tuple[dict[str, Blob], dict[str, Blob]]) -> Item:
    """Attach the first truth found by id, then by ISIC number, in order of `indexes`."""
    m = ISIC_NUMBER_RE.search(item.id)
    for by_id, by_number in indexes:
        blob = by_id.get(item.id) or (by_number.get(m.group(1)) if m else None)
        if blob is not None:
            return Item(item.id, item.image, blob, item.orig_size, truth_scaled=False)
    return item


def collect(inputs: list[str | Path], masks: list[str | Path] = (),
            shard_splits: tuple[str, ...] = ()) -> Inventory:
    """Enumerate every image in `inputs`, attach truth, and resolve duplicate ids.

    Truth precedence: `masks` (by id, by ISIC number, by stem), then `<id>_Segmentation.png`
    files found among the inputs, then a shard sample's own mask. Two images with one id: the
    first by origin is kept, the others become errors. Raises SourceError for a missing or
    unreadable input path, or when no image is found at all."""
    if not inputs:
        raise SourceError("no input given: pass --input PATH (folder, archive or shard folder)")
    scanner = _Scanner(tuple(shard_splits))
    for path in inputs:
        scanner.add_path(Path(path))
    truth_scanner = _Scanner(())
    for path in masks:
        truth_scanner.add_path(Path(path), as_truth=True)
    explicit, found = _mask_index(truth_scanner.masks), _mask_index(scanner.masks)

    errors = scanner.errors + truth_scanner.errors
    items: list[Item] = []
    by_id: dict[str, list[Item]] = defaultdict(list)
    for item in scanner.images:
        by_id[item.id].append(item)
    for key in sorted(by_id):
        group = sorted(by_id[key], key=lambda it: it.origin)
        items.append(_match_truth(group[0], explicit, found))
        for dup in group[1:]:
            errors.append({"input": dup.origin, "id": key,
                           "reason": f"duplicate id {key}: {group[0].origin} is processed instead"})
    used = {it.truth.origin for it in items if it.truth is not None}
    all_masks = {b.origin for blobs in (*scanner.masks.values(), *truth_scanner.masks.values())
                 for b in blobs}
    inventory = Inventory(items, errors, scanner.skipped + truth_scanner.skipped,
                          masks_found=len(all_masks), masks_unused=len(all_masks - used))
    if not items and not errors:
        names = ", ".join(str(p) for p in inputs)
        raise SourceError(f"{names}: no images found ({sum(inventory.skipped.values())} other "
                          f"files skipped; images are {', '.join(IMAGE_EXTENSIONS)})")
    return inventory


# --------------------------------------------------------------------------- work split


def assign(items: list[Item], num_shards: int, shard_index: int,
           world_size: int = 1, rank: int = 0) -> list[Item]:
    """This job part's and process's items: sorted by id, part = index % num_shards, then
    rank = index within the part % world_size. Every item lands in exactly one (part, rank)."""
    if not 0 <= shard_index < num_shards:
        raise SourceError(f"shard index {shard_index} is outside 0..{num_shards - 1}")
    ordered = sorted(items, key=lambda it: it.id)
    return ordered[shard_index::num_shards][rank::world_size]


def read_order(items: list[Item]) -> list[Item]:
    """The order to read items in: by id, except members of compressed tars, which go last
    in archive order so that each reader decompresses an archive once, seeking forward only."""
    compressed = {p: is_compressed_tar(p) for p in {it.image.path for it in items
                                                     if it.image.kind == "tar"}}

    def key(it: Item) -> tuple:
        if it.image.kind == "tar" and compressed[it.image.path]:
            return (1, it.image.path, it.image.offset, "")
        return (0, "", 0, it.id)

    return sorted(items, key=key)
