"""Inference inputs: enumerate images (and their ground truth, if any) from folders, archives
and packed shard folders, without extracting anything.

An input is an image folder (recursive; zips and tars inside it are read in place), a single
image, a `.zip`, a `.tar`/`.tar.gz`/`.tgz` archive, a packed shard folder (`manifest.json` +
`{split}-NNNNNN.tar`; its masks are the truth), an ISIC root or the official zips. Files named
`<id>_Segmentation.png` are ground truth, never inputs; `--masks` folders/zips add more truth,
matched by id, by the 7-digit ISIC number or by stem.

Every image becomes an `Item`: an id that names its outputs (`masks/<id>_Segmentation.png`), a
`Blob` that reads its bytes, the truth's `Blob` or None, and the origin string metrics.csv and
errors.csv name. Ids: a name holding an ISIC number keeps its stem (the ISIC scorer pairs
masks by it); any other keeps its folders inside the input and its letters in any script,
joined by '__' and made safe (`photos/patient1/IMG_0001.JPG` → `patient1__IMG_0001`); names
that still clash get the input's name, then a short hash, so every image has its own mask.
No id holds a path part, so no archive member name can make an output escape `--out`. Items are plain frozen dataclasses,
picklable for DataLoader workers; archives are opened lazily once per process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
import unicodedata
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from lesionseg.data.archive import Blob, base_name, is_compressed_tar, open_decompressed
from lesionseg.data.images import IMAGE_EXTENSIONS
from lesionseg.data.isic import IGNORED_NAMES, MASK_RE, MAX_MEMBER_BYTES
from lesionseg.data.shard_format import MANIFEST, SPLITS, read_manifest, sample_key, split_urls
from lesionseg.errors import UserError, first_line

log = logging.getLogger(__name__)

# A compressed tar is listed only while its members' declared bytes stay under this many times
# its size on disk (and MAX_MEMBER_BYTES): images barely compress, a listing bomb does.
MAX_TAR_EXPANSION = 100
MAX_ID_BYTES = 150  # ids are cut to this many UTF-8 bytes (file names stay under 255 bytes)
FOLDER_SEP = "__"  # joins an id's folders and stem: patient1__IMG_0001
ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ISIC_NUMBER_RE = re.compile(r"ISIC_(\d{7})", re.IGNORECASE)
# Reasons a file is skipped (counted, not an error): it is not an image by name.
SKIP_NOT_IMAGE = "not an image (by extension)"
SKIP_HIDDEN = "hidden or resource-fork file"
SKIP_LINK = "not a regular file (link, device or folder)"


class SourceError(UserError, ValueError):
    """An input path that cannot be used at all (missing, unreadable archive, no images)."""


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
    split: str = ""  # a shard sample's split (train, val or test); "" for other inputs

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
    shard_splits: dict[str, list[str]] = field(default_factory=dict)  # shard folder -> splits read


def _cut(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` UTF-8 bytes, never inside a character."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def sanitize_id(stem: str, max_bytes: int = MAX_ID_BYTES) -> str:
    """A name as a safe id: letters and digits of any script (NFC), '.', '_' and '-' only,
    other runs as one '_', no leading dots, at most `max_bytes` UTF-8 bytes.

    Ids name output files (`masks/<id>_Segmentation.png`), so they can hold no path part."""
    text = re.sub(r"[^\w.-]+", "_", unicodedata.normalize("NFC", stem)).lstrip(".")
    text = _cut(text, max_bytes).rstrip(".")
    return text or "unnamed"


def file_id(folders: tuple[str, ...], stem: str) -> str:
    """The id of an image or mask at `folders/stem.ext` inside an input: the stem alone when it
    holds an ISIC number, else the folders and stem joined by FOLDER_SEP (leading folders are
    dropped when it would be too long); '..', '/' and drive letters are not folders."""
    if ISIC_NUMBER_RE.search(stem):
        return sanitize_id(stem)
    kept = [sanitize_id(f) for f in folders
            if f not in ("", ".", "..", "/") and not re.fullmatch(r"[A-Za-z]:", f)]
    pieces = [*kept, sanitize_id(stem)]
    while len(pieces) > 1 and len(FOLDER_SEP.join(pieces).encode("utf-8")) > MAX_ID_BYTES:
        pieces.pop(0)
    return FOLDER_SEP.join(pieces)


def _stem(name: str) -> str:
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix else name


def _classify(rel_parts: tuple[str, ...]) -> tuple[str, str]:
    """('image'|'mask', stem) or ('skip', reason) for a file at relative path `rel_parts`
    (a mask's stem is its image's: `x_Segmentation.png` → x)."""
    name = rel_parts[-1] if rel_parts else ""
    if any(p in IGNORED_NAMES or p.startswith(".") for p in rel_parts if p not in ("", ".", "..")):
        return "skip", SKIP_HIDDEN
    if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
        return "skip", SKIP_NOT_IMAGE
    m = MASK_RE.match(name)
    if m:
        return "mask", m.group("id")
    return "image", _stem(name)


def _archive_stem(name: str) -> str:
    """An archive's name without its archive suffix (`batch1.tar.gz` → batch1)."""
    for suffix in sorted((*ZIP_SUFFIXES, *TAR_SUFFIXES), key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class _Found:
    """An image as found, before its final id: the id from its path, the input it came from
    and its bare stem (for matching truth by stem, and for resolving clashes)."""

    item: Item
    label: str  # the input's name (folder or archive without suffix)
    stem: str  # the file's own stem, sanitized
    key: str  # a stable text naming this file (absolute path [+ member]): hashed on clashes


def _member_parts(member: str) -> tuple[str, ...]:
    return PurePosixPath(member.replace("\\", "/")).parts


def _unsafe(member: str) -> bool:
    """Absolute, drive-letter or '..' member names (harmless here: nothing is extracted)."""
    name = member.replace("\\", "/")
    return name.startswith("/") or re.match(r"^[A-Za-z]:", name) is not None or ".." in name.split("/")


class _Scanner:
    """Walks inputs, sorting every file into images, truth masks or skip counts."""

    def __init__(self, shard_splits: tuple[str, ...]) -> None:
        self.images: list[_Found] = []
        self.masks: dict[str, list[Blob]] = defaultdict(list)  # by id
        self.mask_stems: dict[str, list[Blob]] = defaultdict(list)  # by bare stem
        self.errors: list[dict[str, str]] = []
        self.skipped: Counter = Counter()
        self.shard_splits = shard_splits
        self.splits_read: dict[str, list[str]] = {}  # shard folder -> splits read
        self.label = ""  # the name of the input being scanned

    def add(self, blob: Blob, rel_parts: tuple[str, ...], size: int, as_truth: bool = False,
            prefix: tuple[str, ...] = ()) -> None:
        """One file at `rel_parts` inside the input (inside an archive at `prefix`)."""
        kind, stem = _classify(rel_parts)
        if kind == "skip":
            self.skipped[stem] += 1
            return
        if as_truth and kind == "image":
            stem = _stem(blob.name)
        value = file_id((*prefix, *rel_parts[:-1]), stem)
        if blob.kind != "file" and _unsafe(blob.member):
            log.warning("%s: unsafe member name (absolute or '..'); its id is %r", blob.origin, value)
        if size > MAX_MEMBER_BYTES:
            self.errors.append({"input": blob.origin, "id": value,
                                "reason": f"file of {size} bytes exceeds the {MAX_MEMBER_BYTES}-byte limit"})
            return
        if kind == "mask" or as_truth:
            self.masks[value].append(blob)
            self.mask_stems[sanitize_id(stem)].append(blob)
        else:
            key = os.path.abspath(blob.path) + (f":{blob.member}" if blob.kind != "file" else "")
            self.images.append(_Found(Item(value, blob), self.label, sanitize_id(stem), key))

    def add_path(self, path: Path, as_truth: bool = False) -> None:
        """Dispatch one input path (folder, shard folder, archive or single file)."""
        self.label = sanitize_id(_archive_stem(path.resolve().name))
        if path.is_dir():
            if (path / MANIFEST).is_file() and not as_truth:
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
                self.add_zip(path, as_truth, (*rel[:-1], _archive_stem(path.name)))
            elif path.name.lower().endswith(TAR_SUFFIXES):
                self.add_tar(path, as_truth, (*rel[:-1], _archive_stem(path.name)))
            else:
                self.add(Blob("file", str(path)), rel, path.stat().st_size, as_truth)

    def add_zip(self, path: Path, as_truth: bool, prefix: tuple[str, ...] = ()) -> None:
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
        except (OSError, zipfile.BadZipFile) as e:
            raise SourceError(f"{path}: not a readable zip file ({e})") from None
        for info in infos:
            if info.is_dir():
                continue
            parts = _member_parts(info.filename)
            self.add(Blob("zip", str(path), info.filename), parts, info.file_size, as_truth,
                     prefix)

    def add_tar(self, path: Path, as_truth: bool, prefix: tuple[str, ...] = ()) -> None:
        members, problem = list_tar(path)
        if problem:
            self.errors.append({"input": str(path), "id": "", "reason": problem})
        for info in members:
            if not info.isreg():
                self.skipped[SKIP_LINK] += 1
                continue
            blob = Blob("tar", str(path), info.name, info.offset_data, info.size)
            self.add(blob, _member_parts(info.name), info.size, as_truth, prefix)

    def add_shards(self, folder: Path) -> None:
        """A packed shard folder: one item per sample (`jpg`), truth = its `png`, with the
        original display size from its `json` (images may be stored downscaled). Only the
        splits `shard_splits` names; by default the test split, or val when there is none:
        scores over train (or train and val mixed) would be optimistic."""
        splits, tars = _shard_files(folder, self.shard_splits)
        self.splits_read[str(folder)] = splits
        log.info("%s: reading the %s split%s (infer.shard_splits chooses)", folder,
                 " and ".join(splits), "s" if len(splits) > 1 else "")
        for split, tar_path, listed in tars:
            samples: dict[str, dict[str, tarfile.TarInfo]] = defaultdict(dict)
            members, problem = list_tar(tar_path)
            for info in members:
                if not info.isreg():
                    continue
                key, ext = sample_key(info.name)
                samples[key][ext.lower()] = info
            if problem or (listed is not None and len(samples) != listed):
                self.errors.append({"input": str(tar_path), "id": "", "reason": (
                    f"shard holds {len(samples)} readable samples, {MANIFEST} lists "
                    f"{listed}{f'; {problem}' if problem else ''} (check it with lesionseg "
                    "verify; repack it)")})
            with open_decompressed(str(tar_path)) as stream:
                metas = {key: _read_meta(stream, parts.get("json")) for key, parts in samples.items()}
            for key, parts in sorted(samples.items()):
                self._add_sample(tar_path, key, parts, metas[key], split)

    def _add_sample(self, tar_path: Path, key: str, parts: dict[str, tarfile.TarInfo],
                    meta: dict, split: str) -> None:
        image = parts.get("jpg")
        sid = sanitize_id(str(meta.get("id") or base_name(key)))
        if image is None:
            self.errors.append({"input": f"{tar_path}:{key}", "id": sid,
                                "reason": "shard sample has no jpg image"})
            return
        blob = Blob("tar", str(tar_path), image.name, image.offset_data, image.size)
        truth = parts.get("png")
        truth_blob = Blob("tar", str(tar_path), truth.name, truth.offset_data, truth.size) if truth else None
        orig = meta.get("orig_size")
        orig_size = (int(orig[0]), int(orig[1])) if isinstance(orig, list) and len(orig) == 2 else None
        item = Item(sid, blob, truth_blob, orig_size, truth_scaled=truth is not None, split=split)
        self.images.append(_Found(item, self.label, sid, f"{os.path.abspath(tar_path)}:{key}"))


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


def _shard_files(folder: Path, splits: tuple[str, ...]
                 ) -> tuple[list[str], list[tuple[str, Path, int | None]]]:
    """The splits read and their (split, shard tar, samples the manifest lists) triples:
    `splits`, or by default test, else val (train alone is refused: it would score the
    training data)."""
    manifest = read_manifest(folder)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise SourceError(f"infer.shard_splits: unknown split(s) {', '.join(unknown)}; "
                          f"choose from {', '.join(SPLITS)}")
    available = [s for s in SPLITS if manifest["splits"][s].get("shards")]
    if splits:
        wanted = [s for s in available if s in splits]
        if not wanted:
            raise SourceError(f"{folder}: no shards of split(s) {', '.join(splits)} "
                              f"(the manifest has {', '.join(available) or 'none'})")
    else:
        wanted = [s for s in ("test", "val") if s in available][:1]
        if not wanted:
            raise SourceError(f"{folder}: no test or val shards to score (the manifest has "
                              f"{', '.join(available) or 'none'}); set infer.shard_splits=[train] "
                              "to segment the training split")
    counts = {e.get("name"): e.get("samples") for e in manifest["shards"] if isinstance(e, dict)}
    return wanted, [(split, Path(u), counts.get(Path(u).name))
                    for split in wanted for u in split_urls(folder, split)]


# --------------------------------------------------------------------------- matching


_Index = tuple[dict[str, Blob], dict[str, Blob], dict[str, list[Blob]]]


def _mask_index(scanner: _Scanner) -> _Index:
    """Truth by id, by 7-digit ISIC number and by bare stem; duplicates keep the first by
    origin (warned)."""
    by_id: dict[str, Blob] = {}
    by_number: dict[str, Blob] = {}
    for key in sorted(scanner.masks):
        blobs = sorted(scanner.masks[key], key=lambda b: b.origin)
        if len(blobs) > 1:
            log.warning("truth %s: %d masks (%s); using %s", key, len(blobs),
                        ", ".join(b.origin for b in blobs), blobs[0].origin)
        by_id[key] = blobs[0]
        m = ISIC_NUMBER_RE.search(key)
        if m:
            by_number.setdefault(m.group(1), blobs[0])
    return by_id, by_number, scanner.mask_stems


def _match_truth(found: _Found, stem_count: Counter, *indexes: _Index) -> Item:
    """Attach the first truth found by id, then by ISIC number, then by bare stem (when one
    image and one mask have that stem), in order of `indexes`."""
    item = found.item
    m = ISIC_NUMBER_RE.search(item.id)
    for by_id, by_number, by_stem in indexes:
        blob = by_id.get(item.id) or (by_number.get(m.group(1)) if m else None)
        if blob is None and stem_count[found.stem] == 1 and len(by_stem.get(found.stem, ())) == 1:
            blob = by_stem[found.stem][0]
        if blob is not None:
            return Item(item.id, item.image, blob, item.orig_size, truth_scaled=False,
                        split=item.split)
    return item


def _with_id(item: Item, new_id: str) -> Item:
    return Item(new_id, item.image, item.truth, item.orig_size, item.truth_scaled, item.split)


def _resolve_ids(found: list[tuple[_Found, Item]]) -> tuple[list[Item], list[dict[str, str]]]:
    """Final ids, one per image. The same file listed twice, or two images with one ISIC id
    (the ISIC scorer pairs masks by it), keep the first by origin and report the others. Other
    clashing ids (compared case-insensitively, as macOS and Windows file systems do) get the
    input's name in front (`patient2__IMG_0001`), or else a hash of the file's path behind."""
    errors: list[dict[str, str]] = []
    groups: dict[str, list[tuple[_Found, Item]]] = defaultdict(list)
    for f, item in sorted(found, key=lambda fi: fi[1].origin):
        groups[item.id.casefold()].append((f, item))
    final: dict[str, Item] = {}  # casefolded id -> item
    clashing: list[list[tuple[_Found, Item]]] = []
    for key in sorted(groups):
        group, seen = [], set()
        for f, item in groups[key]:
            if f.key in seen:
                errors.append({"input": item.origin, "id": item.id,
                               "reason": "the same file is given twice; processed once"})
                continue
            seen.add(f.key)
            group.append((f, item))
        if len(group) > 1 and ISIC_NUMBER_RE.search(group[0][1].id):
            first = group[0][1]
            for _, dup in group[1:]:
                errors.append({"input": dup.origin, "id": dup.id, "reason": (
                    f"duplicate ISIC id {dup.id}: {first.origin} is processed instead (the ISIC "
                    "scorer pairs masks by id, so one mask per id)")})
            group = group[:1]
        if len(group) == 1:
            final[key] = group[0][1]
        else:
            clashing.append(group)
    for group in clashing:
        for new_id, item in _distinct_ids(group, final):
            log.info("%s: id %s is taken by another image; its outputs are named %s",
                     item.origin, item.id, new_id)
            final[new_id.casefold()] = _with_id(item, new_id)
    return sorted(final.values(), key=lambda it: it.id), errors


def _distinct_ids(group: list[tuple[_Found, Item]],
                  taken: dict[str, Item]) -> list[tuple[str, Item]]:
    """New ids for images that share one: the input's name in front; where that still clashes,
    the file's extension behind too; where even that clashes, a hash of the file's path."""
    levels = (
        lambda f, it: sanitize_id(f"{f.label}{FOLDER_SEP}{it.id}"),
        lambda f, it: sanitize_id(f"{f.label}{FOLDER_SEP}{it.id}.{Path(it.image.name).suffix[1:]}"),
        lambda f, it: f"{_cut(it.id, MAX_ID_BYTES - 9)}-{hashlib.sha1(f.key.encode()).hexdigest()[:8]}",
    )
    out: list[tuple[str, Item]] = []
    pending = group
    for level, name in enumerate(levels):
        named = [(name(f, it), f, it) for f, it in pending]
        count = Counter(n.casefold() for n, _, _ in named)
        last = level == len(levels) - 1
        pending = []
        for n, f, it in named:
            if last or (count[n.casefold()] == 1 and n.casefold() not in taken):
                out.append((n, it))
            else:
                pending.append((f, it))
    return out


def collect(inputs: list[str | Path], masks: list[str | Path] = (),
            shard_splits: tuple[str, ...] = ()) -> Inventory:
    """Enumerate every image in `inputs`, attach truth, and give each its own id.

    Truth precedence: `masks` (by id, by ISIC number, by stem), then `<id>_Segmentation.png`
    files found among the inputs, then a shard sample's own mask. Ids: see the module
    docstring and `_resolve_ids`. Raises SourceError for a missing or unreadable input path,
    or when no image is found at all."""
    if not inputs:
        raise SourceError("no input given: pass --input PATH (folder, archive or shard folder)")
    scanner = _Scanner(tuple(shard_splits))
    for path in inputs:
        scanner.add_path(Path(path))
    truth_scanner = _Scanner(())
    for path in masks:
        truth_scanner.add_path(Path(path), as_truth=True)
    explicit, found = _mask_index(truth_scanner), _mask_index(scanner)
    stem_count = Counter(f.stem for f in scanner.images)
    matched = [(f, _match_truth(f, stem_count, explicit, found)) for f in scanner.images]
    items, clashes = _resolve_ids(matched)
    errors = scanner.errors + truth_scanner.errors + clashes
    used = {it.truth.origin for it in items if it.truth is not None}
    all_masks = {b.origin for blobs in (*scanner.masks.values(), *truth_scanner.masks.values())
                 for b in blobs}
    inventory = Inventory(items, errors, scanner.skipped + truth_scanner.skipped,
                          masks_found=len(all_masks), masks_unused=len(all_masks - used),
                          shard_splits=scanner.splits_read)
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
