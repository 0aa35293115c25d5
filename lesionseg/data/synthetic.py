"""Synthetic data sets in the exact ISIC 2016 Part 1 layout: the four official folders, or
the four official zips, of cases rendered by `data.synth_render` (easy or hard; see there).

Tests, the training demo and the benchmarks use these instead of the real data set (which
cannot be downloaded here). Every case is seeded by (seed, index) and zip members carry fixed
dates, so the same arguments give the same bytes on every machine.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from lesionseg.data.images import encode_png
from lesionseg.data.synth_render import (
    DIFFICULTIES,
    FULL_SIZE,
    check_difficulty,
    render,
    render_case,
    render_hard_case,
)
from lesionseg.errors import UserError

__all__ = ["DIFFICULTIES", "FULL_SIZE", "OFFICIAL_NAMES", "case_id", "render", "render_case",
           "render_hard_case", "write_isic_dataset"]

# Official folder (and zip) names of ISIC 2016 Part 1, by (split, kind).
OFFICIAL_NAMES = {
    ("train", "image"): "ISBI2016_ISIC_Part1_Training_Data",
    ("train", "mask"): "ISBI2016_ISIC_Part1_Training_GroundTruth",
    ("test", "image"): "ISBI2016_ISIC_Part1_Test_Data",
    ("test", "mask"): "ISBI2016_ISIC_Part1_Test_GroundTruth",
}
JPEG_QUALITY = 92
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member dates: the same seed gives the same zip bytes


def case_id(index: int) -> str:
    """ISIC-style id of the index-th synthetic case."""
    return f"ISIC_{index:07d}"


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


class _Writer:
    """Writes case files either into the official folders or into the four official zips."""

    def __init__(self, root: Path, zips: bool):
        self.root, self.zips = root, zips
        self._open: dict[str, zipfile.ZipFile] = {}

    def write(self, split: str, kind: str, filename: str, data: bytes) -> None:
        folder = OFFICIAL_NAMES[(split, kind)]
        if not self.zips:
            path = self.root / folder / filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            return
        if folder not in self._open:
            self._open[folder] = zipfile.ZipFile(self.root / f"{folder}.zip", "w")
        info = zipfile.ZipInfo(f"{folder}/{filename}", date_time=ZIP_DATE)
        # JPEGs are stored (deflate gains nothing); PNG masks are deflated like the real zips.
        info.compress_type = zipfile.ZIP_STORED if filename.endswith(".jpg") else zipfile.ZIP_DEFLATED
        self._open[folder].writestr(info, data)

    def close(self) -> None:
        for zf in self._open.values():
            zf.close()


def write_isic_dataset(root: str | Path, n_train: int, n_test: int = 0, *, seed: int = 0,
                       min_side: int = 64, max_side: int = FULL_SIZE[1], zips: bool = False,
                       progress: bool = False, difficulty: str = "easy") -> Path:
    """Write n_train training and n_test test cases under `root` in the ISIC 2016 Part 1 layout
    (the four official folders, or with zips=True the four official zip files). Returns root.

    Ids are ISIC_0000000 … for training, then the test cases; images are JPEG, masks PNG named
    `<id>_Segmentation.png`. The same arguments always give the same bytes. `difficulty` is
    easy (the demo's clear lesions) or hard (see the module docstring)."""
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise UserError(f"synthetic data set: need at least one case (train={n_train}, test={n_test})")
    check_difficulty(difficulty)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    writer = _Writer(root, zips)
    plan = [("train", i) for i in range(n_train)] + [("test", n_train + i) for i in range(n_test)]
    try:
        for split, index in tqdm(plan, desc="synth", unit="case", disable=not progress):
            image, mask = render(difficulty, seed, index, min_side, max_side)
            cid = case_id(index)
            writer.write(split, "image", f"{cid}.jpg", _jpeg(image))
            writer.write(split, "mask", f"{cid}_Segmentation.png", encode_png(mask))
    finally:
        writer.close()
    return root
