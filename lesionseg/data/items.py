"""Inference inputs as items: one `Item` per image (its id, the `Blob` of its bytes, its
truth's, where it came from), and the ids that name its outputs.

Ids: a name holding an ISIC number keeps its stem (the ISIC scorer pairs masks by it); any other
keeps its folders inside the input and its letters in any script, joined by '__' and made safe
(`photos/patient1/IMG_0001.JPG` → `patient1__IMG_0001`); names that still clash get the input's
name, then a short hash, so every image has its own mask (`resolve_ids`). No id holds a path
part, so no archive member name can make an output escape `--out`. Items are plain frozen
dataclasses, picklable for DataLoader workers.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lesionseg.data.archive import Blob
from lesionseg.errors import UserError

log = logging.getLogger(__name__)

MAX_ID_BYTES = 150  # ids are cut to this many UTF-8 bytes (file names stay under 255 bytes)
FOLDER_SEP = "__"  # joins an id's folders and stem: patient1__IMG_0001
ISIC_NUMBER_RE = re.compile(r"ISIC_(\d{7})", re.IGNORECASE)


class SourceError(UserError, ValueError):
    """An input path that cannot be used at all (missing, unreadable archive, no images)."""


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
    split: str = ""  # train, val or test: a shard sample's, or an official ISIC file's; "" unknown

    @property
    def origin(self) -> str:
        return self.image.origin


@dataclass
class Inventory:
    """What `collect` found: the items, the inputs that failed before decoding, skip counts."""

    items: list[Item]
    errors: list[dict[str, str]] = field(default_factory=list)  # {"input", "id", "reason"}
    skipped: Counter = field(default_factory=Counter)  # reason -> number of files
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first SKIP_EXAMPLES files
    masks_found: int = 0
    masks_unused: int = 0
    splits_read: dict[str, list[str]] = field(default_factory=dict)  # input with splits -> splits read
    left_out: dict[str, int] = field(default_factory=dict)  # split -> images not read


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


@dataclass
class Found:
    """An image as found, before its final id: the id from its path, the input it came from
    and its bare stem (for matching truth by stem, and for resolving clashes)."""

    item: Item
    label: str  # the input's name (folder or archive without suffix)
    stem: str  # the file's own stem, sanitized
    key: str  # a stable text naming this file (absolute path [+ member]): hashed on clashes
    walked: str = ""  # the input it was found in by walking it ("" for a shard sample)


def _with_id(item: Item, new_id: str) -> Item:
    return Item(new_id, item.image, item.truth, item.orig_size, item.truth_scaled, item.split)


def resolve_ids(found: list[tuple[Found, Item]]) -> tuple[list[Item], list[dict[str, str]]]:
    """Final ids, one per image. The same file listed twice, or two images with one ISIC id
    (the ISIC scorer pairs masks by it), keep the first by origin and report the others. Other
    clashing ids (compared case-insensitively, as macOS and Windows file systems do) get the
    input's name in front (`patient2__IMG_0001`), or else a hash of the file's path behind."""
    errors: list[dict[str, str]] = []
    groups: dict[str, list[tuple[Found, Item]]] = defaultdict(list)
    for f, item in sorted(found, key=lambda fi: fi[1].origin):
        groups[item.id.casefold()].append((f, item))
    final: dict[str, Item] = {}  # casefolded id -> item
    clashing: list[list[tuple[Found, Item]]] = []
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


def _distinct_ids(group: list[tuple[Found, Item]],
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
