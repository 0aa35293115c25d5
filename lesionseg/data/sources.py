"""Inference inputs: enumerate images (and their ground truth, if any) from folders, archives
and packed shard folders, without extracting anything.

An input is an image folder (recursive; zips and tars inside it are read in place), a single
image, a `.zip`, a `.tar`/`.tar.gz`/`.tgz` archive, a packed shard folder (`manifest.json` +
`{split}-NNNNNN.tar`; its masks are the truth, `data.shard_inputs`), an ISIC root or the
official zips. Files named `<id>_Segmentation.png` are ground truth, never inputs; `--masks`
folders/zips add more truth, matched by id, by the 7-digit ISIC number or by stem.

Files are found by the one input walk (`data.walk`); every image becomes an `Item`, named as
`data.items` says. Archives are opened lazily once per process.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from pathlib import Path

from lesionseg.data.archive import (
    MAX_MEMBER_BYTES,
    MAX_TAR_EXPANSION,
    Blob,
    is_compressed_tar,
    list_tar,
)
from lesionseg.data.images import IMAGE_EXTENSIONS
from lesionseg.data.isic import MASK_RE, MASK_STEM_RE, in_mask_folder, official_split
from lesionseg.data.items import (
    FOLDER_SEP,
    ISIC_NUMBER_RE,
    MAX_ID_BYTES,
    Found,
    Inventory,
    Item,
    SourceError,
    file_id,
    resolve_ids,
    sanitize_id,
)
from lesionseg.data.shard_format import MANIFEST, SPLITS
from lesionseg.data.shard_inputs import shard_items
from lesionseg.data.walk import SKIP_HIDDEN, SKIP_LINK, Damaged, Entry, archive_stem, walk

__all__ = ["FOLDER_SEP", "MAX_ID_BYTES", "MAX_MEMBER_BYTES", "MAX_TAR_EXPANSION", "SKIP_HIDDEN",
           "SKIP_LINK", "SKIP_NOT_IMAGE", "Blob", "Inventory", "Item", "SourceError", "assign",
           "collect", "file_id", "list_tar", "read_order", "sanitize_id"]

log = logging.getLogger(__name__)

SKIP_NOT_IMAGE = "not an image (by extension)"  # a file skipped (counted, not an error)
SKIP_EXAMPLES = 20  # skipped files named per reason (summary.json), so they can be found


def _stem(name: str) -> str:
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix else name


def _classify(name: str) -> tuple[str, str]:
    """('image'|'mask', stem) or ('skip', reason) for a file's name (a mask's stem is its
    image's: `x_Segmentation.png` → x)."""
    if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
        return "skip", SKIP_NOT_IMAGE
    m = MASK_RE.match(name)
    if m:
        return "mask", m.group("id")
    return "image", _stem(name)


class _Scanner:
    """Sorts every file the input walk finds into images, truth masks or skip counts."""

    def __init__(self, splits: tuple[str, ...]) -> None:
        self.images: list[Found] = []
        self.masks: dict[str, list[Blob]] = defaultdict(list)  # by id
        self.mask_stems: dict[str, list[Blob]] = defaultdict(list)  # by bare stem
        self.errors: list[dict[str, str]] = []
        self.skipped: Counter = Counter()
        self.skipped_examples: dict[str, list[str]] = defaultdict(list)  # reason -> files
        self.splits = splits
        self.splits_read: dict[str, list[str]] = {}  # input with splits -> splits read
        self.left_out: Counter = Counter()  # split -> images of an input not read

    def add_path(self, path: Path, as_truth: bool = False) -> None:
        """One input path: a shard folder (or its manifest), or whatever the walk finds in it;
        of an input with splits, only the splits chosen (`choose_splits`)."""
        if path.name == MANIFEST and path.is_file() and not as_truth:
            path = path.parent  # a pack's manifest stands for its shard folder
        label = sanitize_id(archive_stem(path.resolve().name))
        if path.is_dir() and (path / MANIFEST).is_file() and not as_truth:
            splits, found, errors, left_out = shard_items(path, self.splits, label)
            self.splits_read[str(path)] = splits
            self.left_out.update(left_out)
            self.images.extend(found)
            self.errors.extend(errors)
        elif path.is_dir() or path.is_file():
            for entry in walk(path):
                if isinstance(entry, Damaged):
                    if not entry.listed:
                        raise SourceError(str(entry))
                    self.errors.append({"input": entry.path, "id": "", "reason": entry.reason})
                else:
                    self.add(entry, label, as_truth, str(path))
        elif path.exists():
            raise SourceError(f"{path}: not a regular file or folder")
        else:
            raise SourceError(f"{path}: input does not exist")

    def keep_splits(self) -> None:
        """Of the images found by walking the inputs, keep those of the splits chosen
        (`choose_splits`); note the splits read, per input, and those left out."""
        walked = [f for f in self.images if f.walked]
        kept, read, left_out = choose_splits(walked, self.splits)
        for f in kept:
            if f.item.split:
                self.splits_read.setdefault(f.walked, [])
                if f.item.split not in self.splits_read[f.walked]:
                    self.splits_read[f.walked].append(f.item.split)
        self.left_out.update(left_out)
        self.images = [f for f in self.images if not f.walked] + kept

    def add(self, entry: Entry, label: str, as_truth: bool, given: str = "") -> None:
        """One file the walk found in the input named `label` (`given`: the input as given; an
        official ISIC name in its name, or in the file's path, gives the file's split)."""
        blob = entry.blob
        kind, stem = ("skip", entry.skip) if entry.skip else _classify(entry.parts[-1])
        if kind == "skip":
            self.skipped[stem] += 1
            if len(self.skipped_examples[stem]) < SKIP_EXAMPLES:
                self.skipped_examples[stem].append(blob.origin)
            return
        if kind == "image" and given and in_mask_folder(
                (archive_stem(Path(given).resolve().name), *entry.prefix, *entry.parts[:-1])):
            kind, stem = "mask", MASK_STEM_RE.match(stem).group("id")  # images/ + masks/
        if as_truth and kind == "image":
            stem = _stem(blob.name)
        value = file_id((*entry.prefix, *entry.parts[:-1]), stem)
        if entry.unsafe:
            log.warning("%s: unsafe member name (absolute or '..'); its id is %r", blob.origin, value)
        if entry.oversize:
            self.errors.append({"input": blob.origin, "id": value, "reason": entry.oversize})
            return
        if kind == "mask" or as_truth:
            self.masks[value].append(blob)
            self.mask_stems[sanitize_id(stem)].append(blob)
        else:
            key = os.path.abspath(blob.path) + (f":{blob.member}" if blob.kind != "file" else "")
            where = "/".join((Path(given).resolve().name, *entry.prefix, *entry.parts))
            self.images.append(Found(Item(value, blob, split=official_split(where)), label,
                                     sanitize_id(stem), key, walked=given))


def choose_splits(found: list[Found], splits: tuple[str, ...]
                  ) -> tuple[list[Found], list[str], Counter]:
    """Of the images found, those to score: (kept, splits read, images left out by split).

    Images whose split is known (the official ISIC names) are kept when their split is in
    `splits`; by default (empty) the test split only: a mean over training images would be
    reported as a test score. Images without a split are always kept. Inputs whose images
    all fall outside the splits are an error that says which splits they hold."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise SourceError(f"infer.splits: unknown split(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(SPLITS)}")
    held = Counter(f.item.split for f in found if f.item.split)
    if not held:
        return found, [], Counter()
    wanted = [s for s in SPLITS if s in (splits or ("test",)) and s in held]
    if not wanted:
        have = ", ".join(f"{held[s]} {s}" for s in SPLITS if s in held)
        where = ", ".join(sorted({f.walked for f in found if f.item.split}))
        raise SourceError(f"{where}: no {' or '.join(splits or ('test',))} images (the input "
                          f"holds {have}); --splits {','.join(s for s in SPLITS if s in held)} "
                          "scores them (scores on training images are optimistic)")
    kept = [f for f in found if not f.item.split or f.item.split in wanted]
    left_out = Counter({s: n for s, n in held.items() if s not in wanted})
    others = "; ".join(f"{n} {s} images left out" for s, n in sorted(left_out.items()))
    log.info("%s: scoring the %s split%s%s (%d images%s)",
             ", ".join(sorted({f.walked for f in found if f.item.split})), ", ".join(wanted),
             "s" if len(wanted) > 1 else "", " only" if others else "",
             sum(held[s] for s in wanted), f"; {others}: --splits "
             f"{','.join(s for s in SPLITS if s in held)} scores every split" if others else "")
    return kept, wanted, left_out


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


def _match_truth(found: Found, stem_count: Counter, *indexes: _Index) -> Item:
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


def collect(inputs: list[str | Path], masks: list[str | Path] = (),
            splits: tuple[str, ...] = ()) -> Inventory:
    """Enumerate every image in `inputs`, attach truth, and give each its own id.

    Of an input with splits (an ISIC root or its official zips, a shard folder) only the
    splits `splits` names are read (by default test; a shard folder without one, val).
    Truth precedence: `masks` (by id, by ISIC number, by stem), then `<id>_Segmentation.png`
    files found among the inputs, then a shard sample's own mask. Ids: see the module
    docstring and `resolve_ids`. Raises SourceError for a missing or unreadable input path,
    or when no image is found at all."""
    if not inputs:
        raise SourceError("no input given: pass --input PATH (folder, archive or shard folder)")
    scanner = _Scanner(tuple(splits))
    for path in inputs:
        scanner.add_path(Path(path))
    scanner.keep_splits()
    truth_scanner = _Scanner(())
    for path in masks:
        truth_scanner.add_path(Path(path), as_truth=True)
    explicit, found = _mask_index(truth_scanner), _mask_index(scanner)
    stem_count = Counter(f.stem for f in scanner.images)
    matched = [(f, _match_truth(f, stem_count, explicit, found)) for f in scanner.images]
    items, clashes = resolve_ids(matched)
    errors = scanner.errors + truth_scanner.errors + clashes
    used = {it.truth.origin for it in items if it.truth is not None}
    all_masks = {b.origin for blobs in (*scanner.masks.values(), *truth_scanner.masks.values())
                 for b in blobs}
    examples = {reason: [*scanner.skipped_examples.get(reason, []),
                         *truth_scanner.skipped_examples.get(reason, [])][:SKIP_EXAMPLES]
                for reason in (*scanner.skipped_examples, *truth_scanner.skipped_examples)}
    inventory = Inventory(items, errors, scanner.skipped + truth_scanner.skipped, examples,
                          masks_found=len(all_masks), masks_unused=len(all_masks - used),
                          splits_read=scanner.splits_read, left_out=dict(scanner.left_out))
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
