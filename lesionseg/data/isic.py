"""Find ISIC 2016 Part 1 image/mask pairs in folders or in the official zips, and read them.

Accepted sources: an ISIC root holding the official folders (or zips), the official zips
themselves (read in place, never extracted), or a plain image folder plus a mask folder.
Images pair with masks by id: `ISIC_0000000.jpg` <-> `ISIC_0000000_Segmentation.png`
(`_segmentation.png`, `.jpeg` and `.png` images too), or by stem when the masks lie in a
folder or zip named as MASK_FOLDERS says (`images/case1.png` <-> `masks/case1.png`). The split hint comes from the official
names (`…_Test_…` = test); anything else is training data unless the source is written
`test=PATH`.

Structural problems (image without mask, mask without image, duplicate ids, unsafe zip member
names, empty input) are found here; content problems (size mismatch, non-binary mask,
unreadable file) when a case is read. Each names the files involved.
"""

from __future__ import annotations

import logging
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from lesionseg.data.archive import MAX_MEMBER_BYTES, Blob
from lesionseg.data.images import IMAGE_EXTENSIONS, ImageError, load_image, load_mask
from lesionseg.data.walk import IGNORED_NAMES, Damaged, Entry, archive_stem, walk
from lesionseg.errors import DataError

__all__ = ["IGNORED_NAMES", "ISIC_SPLITS", "MASK_RE", "MAX_MEMBER_BYTES", "Case", "DataError",
           "Problem", "decode_case", "find_cases", "in_mask_folder", "official_split", "load_case_mask", "raise_problems", "read_case",
           "report_problems"]

log = logging.getLogger(__name__)

ISIC_SPLITS = ("train", "test")  # the official data's splits (pack draws val from train)
MASK_RE = re.compile(r"^(?P<id>.+)_segmentation\.png$", re.IGNORECASE)
TEST_RE = re.compile(r"ISBI2016_ISIC_Part1_Test_", re.IGNORECASE)
TRAIN_RE = re.compile(r"ISBI2016_ISIC_Part1_Training_", re.IGNORECASE)


# Folders whose images are masks (the images/ + masks/ layout of smp, MONAI and most Kaggle
# sets): a mask there pairs with the image of the same stem (`_mask` or `_segmentation` after
# the stem is allowed), as `--masks` of inference pairs them.
MASK_FOLDERS = frozenset({"masks", "mask", "labels", "label", "annotations", "gt",
                          "ground_truth", "groundtruth", "segmentations"})
MASK_STEM_RE = re.compile(r"^(?P<id>.+?)(_mask|_segmentation)?$", re.IGNORECASE)


def in_mask_folder(folders: tuple[str, ...]) -> bool:
    """Whether a file under these folders (the input's own name first) is a mask by layout."""
    return any(f.lower() in MASK_FOLDERS for f in folders)


def official_split(location: str) -> str:
    """The official split a path names (`…_Test_…` test, `…_Training_…` train), or "" when it
    names neither (inference then knows no split for the file)."""
    if TEST_RE.search(location):
        return "test"
    return "train" if TRAIN_RE.search(location) else ""


@dataclass(frozen=True)
class Case:
    """One ISIC case: its id, image, mask (None only when masks are optional) and split hint."""

    id: str
    image: Blob
    mask: Blob | None
    split: str  # "train" or "test"


@dataclass(frozen=True)
class Problem:
    """A case (or file) that cannot be used, and why."""

    id: str | None
    files: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        return f"{', '.join(self.files)}: {self.reason}"


def _classify(name: str, mask_folder: bool = False) -> tuple[str, str] | None:
    """('mask'|'image', id) for a file name, or None for files that are neither; any image
    in a mask folder is a mask, its id its stem (without `_mask`)."""
    m = MASK_RE.match(name)
    if m:
        return "mask", m.group("id")
    suffix = Path(name).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        stem = name[: -len(suffix)]
        if mask_folder:
            return "mask", MASK_STEM_RE.match(stem).group("id")
        return "image", stem
    return None


def _parse_source(source: str | Path) -> tuple[Path, str | None]:
    """`PATH` or `SPLIT=PATH` (train/test) -> (path, forced split or None)."""
    text = str(source)
    for split in ISIC_SPLITS:
        prefix = f"{split}="
        if text.startswith(prefix) and not Path(text).exists():
            return Path(text[len(prefix):]), split
    return Path(text), None


def _split_of(parts: str, forced: str | None) -> str:
    if forced:
        return forced
    return "test" if TEST_RE.search(parts) else "train"


class _Collector:
    """Collects image and mask blobs by id from what the input walk finds, and the problems
    met on the way."""

    def __init__(self) -> None:
        self.images: dict[str, list[tuple[Blob, str]]] = defaultdict(list)
        self.masks: dict[str, list[Blob]] = defaultdict(list)
        self.problems: list[Problem] = []
        self.files_seen = 0

    def add_path(self, path: Path, forced: str | None) -> None:
        """Every file in a folder, an official zip or a single file (tars are not read)."""
        own = archive_stem(path.resolve().name)
        for entry in walk(path, tars=False):
            if isinstance(entry, Damaged):
                self.problems.append(Problem(None, (entry.path,), entry.reason))
            elif not entry.skip:
                self.add(entry, forced, in_mask_folder((own, *entry.prefix, *entry.parts[:-1])))

    def add(self, entry: Entry, forced: str | None, mask_folder: bool = False) -> None:
        blob = entry.blob
        if entry.unsafe:
            self.problems.append(Problem(None, (blob.origin,),
                                         "unsafe member name in zip (absolute or '..' path)"))
            return
        if entry.oversize:
            self.problems.append(Problem(None, (blob.origin,), entry.oversize))
            return
        kind_id = _classify(blob.name, mask_folder)
        if kind_id is None:
            return
        self.files_seen += 1
        kind, cid = kind_id
        if "." in cid:
            self.problems.append(Problem(cid, (blob.origin,), "the id part of the name holds a '.'; "
                                        "shard keys cannot (rename the file)"))
            return
        if kind == "mask":
            self.masks[cid].append(blob)
        else:
            # The split hint is read from the file's path, or the zip's name and member's path.
            location = f"{Path(blob.path).name}/{blob.member}" if blob.kind == "zip" else blob.path
            self.images[cid].append((blob, _split_of(location, forced)))


def _pair(col: _Collector, require_masks: bool) -> tuple[list[Case], list[Problem]]:
    """Match images with masks by id; every unmatched or duplicated file becomes a Problem."""
    cases, problems = [], list(col.problems)
    for cid in sorted(set(col.images) | set(col.masks)):
        images, masks = col.images.get(cid, []), col.masks.get(cid, [])
        if len(images) > 1:
            problems.append(Problem(cid, tuple(str(r) for r, _ in images),
                                    f"duplicate id {cid}: {len(images)} images"))
        elif len(masks) > 1:
            problems.append(Problem(cid, tuple(str(r) for r in masks),
                                    f"duplicate id {cid}: {len(masks)} masks"))
        elif not images:
            problems.append(Problem(cid, (str(masks[0]),), "mask without image"))
        elif not masks and require_masks:
            problems.append(Problem(cid, (str(images[0][0]),),
                                    f"image without mask (expected {cid}_Segmentation.png, or "
                                    f"a mask named {cid} in a masks/ folder)"))
        else:
            ref, split = images[0]
            cases.append(Case(cid, ref, masks[0] if masks else None, split))
    return cases, problems


def report_problems(problems: list[Problem], what: str = "skipped") -> None:
    """Print every skipped case with its reason to stderr: skipping is never silent."""
    if not problems:
        return
    print(f"{what} {len(problems)} bad case(s):", file=sys.stderr)
    for p in problems:
        print(f"  {p}", file=sys.stderr)


def raise_problems(problems: list[Problem]) -> None:
    """Raise one DataError naming the first problem and how many more there are."""
    if not problems:
        return
    more = f" (+{len(problems) - 1} more problems)" if len(problems) > 1 else ""
    raise DataError(f"{problems[0]}{more}; fix the input or use --on-error skip to skip bad cases")


def find_cases(sources: list[str | Path], on_error: str = "raise", *, require_masks: bool = True,
               problems: list[Problem] | None = None) -> list[Case]:
    """All cases in `sources` (folders, official zips, files; `test=PATH` forces the split),
    sorted by id.

    on_error="raise": the first problem stops with a DataError naming the files.
    on_error="skip": bad cases are left out and printed as a report (and appended to
    `problems` when given). An input with no case at all is always an error."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if not sources:
        raise DataError("no source given: pass an ISIC root, the official zips or image/mask folders")
    col = _Collector()
    for source in sources:
        path, forced = _parse_source(source)
        if path.is_dir() or path.is_file():
            col.add_path(path, forced)
        else:
            raise DataError(f"{path}: source does not exist")
    cases, found = _pair(col, require_masks)
    if on_error == "raise":
        raise_problems(found)
    else:
        report_problems(found)
    if problems is not None:
        problems.extend(found)
    if not cases:
        names = ", ".join(str(s) for s in sources)
        raise DataError(f"{names}: no usable image/mask pairs found ({col.files_seen} image files "
                        "seen; expected ISIC_0000000.jpg with ISIC_0000000_Segmentation.png)")
    return cases


def load_case_mask(case: Case, mask_bytes: bytes, size: tuple[int, int]) -> Image.Image:
    """The case's mask (L 0/255), checked to be binary and of the image's display `size`
    (height, width); errors name the mask, the case and its image."""
    try:
        return load_mask(mask_bytes, str(case.mask), expected_size=size)
    except ImageError as e:
        raise ImageError(f"{e} (case {case.id}, image {case.image})") from None


def decode_case(case: Case, image_bytes: bytes, mask_bytes: bytes | None,
                min_size: int | None = None) -> tuple[Image.Image, Image.Image | None, dict[str, Any]]:
    """Decode a case's bytes through the one image loader: (RGB image, L 0/255 mask, meta).

    The mask must have the image's display size and be binary; errors name the files.
    With `min_size` the image may come back reduced (JPEG draft); the mask never does."""
    image, size = load_image(image_bytes, str(case.image), min_size=min_size)
    mask = None
    if mask_bytes is not None and case.mask is not None:
        mask = load_case_mask(case, mask_bytes, size)
    meta = {"id": case.id, "orig_size": [size[0], size[1]], "split": case.split,
            "source": str(case.image)}
    return image, mask, meta


def read_case(case: Case, min_size: int | None = None
              ) -> tuple[Image.Image, Image.Image | None, dict[str, Any]]:
    """Read and decode one case: (RGB PIL image, L 0/255 mask or None, meta dict)."""
    mask_bytes = case.mask.read_bytes() if case.mask is not None else None
    return decode_case(case, case.image.read_bytes(), mask_bytes, min_size=min_size)
