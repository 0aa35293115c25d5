"""ISIC discovery on folders, zips and plain folders; every bad input named, or skipped."""

from __future__ import annotations

import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesionseg.data.images import ImageError, encode_png
from lesionseg.data.isic import DataError, Problem, find_cases, read_case
from lesionseg.data.synthetic import OFFICIAL_NAMES

TRAIN_IMG = OFFICIAL_NAMES[("train", "image")]
TRAIN_GT = OFFICIAL_NAMES[("train", "mask")]


def _ids(cases) -> list[str]:
    return [c.id for c in cases]


def test_official_folders(isic_root: Path) -> None:
    cases = find_cases([isic_root])
    assert _ids(cases) == [f"ISIC_{i:07d}" for i in range(20)]
    assert [c.split for c in cases] == ["train"] * 16 + ["test"] * 4
    image, mask, meta = read_case(cases[0])
    assert image.mode == "RGB" and mask.mode == "L" and image.size == mask.size
    assert set(np.unique(np.asarray(mask)).tolist()) == {0, 255}
    assert meta["id"] == "ISIC_0000000" and meta["orig_size"] == [image.height, image.width]
    assert meta["split"] == "train" and meta["source"].endswith("ISIC_0000000.jpg")


def test_official_zips_read_in_place(isic_zips: Path, isic_root: Path) -> None:
    before = sorted(p.name for p in isic_zips.iterdir())
    assert all(name.endswith(".zip") for name in before) and len(before) == 4
    from_root = find_cases([isic_zips])
    from_files = find_cases(sorted(isic_zips.glob("*.zip")))
    assert _ids(from_root) == _ids(from_files) == _ids(find_cases([isic_root]))
    case = from_root[-1]
    assert case.split == "test" and case.image.member.startswith("ISBI2016_ISIC_Part1_Test_Data/")
    image, mask, _ = read_case(case)
    folder_image, folder_mask, _ = read_case(find_cases([isic_root])[-1])
    assert np.array_equal(np.asarray(image), np.asarray(folder_image))
    assert np.array_equal(np.asarray(mask), np.asarray(folder_mask))
    assert sorted(p.name for p in isic_zips.iterdir()) == before  # nothing extracted


def test_plain_folders_and_name_variants(make_isic: Callable[..., Path], tmp_path: Path) -> None:
    root = make_isic(3)
    imgs, masks = tmp_path / "imgs", tmp_path / "masks"
    imgs.mkdir()
    masks.mkdir()
    src_i, src_m = root / TRAIN_IMG, root / TRAIN_GT
    shutil.copy(src_i / "ISIC_0000000.jpg", imgs / "ISIC_0000000.jpg")
    shutil.copy(src_i / "ISIC_0000001.jpg", imgs / "ISIC_0000001.jpeg")
    Image.open(src_i / "ISIC_0000002.jpg").save(imgs / "ISIC_0000002.png")
    shutil.copy(src_m / "ISIC_0000000_Segmentation.png", masks / "ISIC_0000000_Segmentation.png")
    shutil.copy(src_m / "ISIC_0000001_Segmentation.png", masks / "ISIC_0000001_segmentation.png")
    shutil.copy(src_m / "ISIC_0000002_Segmentation.png", masks / "ISIC_0000002_Segmentation.png")
    (imgs / "README.txt").write_text("ignored")
    (imgs / ".DS_Store").write_bytes(b"\0")
    cases = find_cases([imgs, masks])
    assert _ids(cases) == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
    assert all(c.split == "train" for c in cases)
    for case in cases:
        image, mask, _ = read_case(case)
        assert image.size == mask.size
    assert {c.split for c in find_cases([f"test={imgs}", f"test={masks}"])} == {"test"}


def _expect(sources: list, match: str, capsys: pytest.CaptureFixture, remaining: int) -> None:
    """The problem is an error naming it, and under skip a printed report + fewer cases."""
    with pytest.raises(DataError, match=match):
        find_cases(sources)
    problems: list[Problem] = []
    cases = find_cases(sources, on_error="skip", problems=problems)
    assert len(cases) == remaining
    assert any(re.search(match, str(p)) for p in problems)
    err = capsys.readouterr().err
    assert "skipped" in err and re.search(match, err)


def test_image_without_mask(make_isic, capsys) -> None:
    root = make_isic(3)
    (root / TRAIN_GT / "ISIC_0000001_Segmentation.png").unlink()
    _expect([root], r"ISIC_0000001\.jpg: image without mask", capsys, remaining=2)


def test_mask_without_image(make_isic, capsys) -> None:
    root = make_isic(3)
    (root / TRAIN_IMG / "ISIC_0000002.jpg").unlink()
    _expect([root], r"ISIC_0000002_Segmentation\.png: mask without image", capsys, remaining=2)


def test_duplicate_ids(make_isic, tmp_path, capsys) -> None:
    root = make_isic(3)
    extra = tmp_path / "extra"
    extra.mkdir()
    Image.open(root / TRAIN_IMG / "ISIC_0000000.jpg").save(extra / "ISIC_0000000.png")
    _expect([root, extra], r"ISIC_0000000\.jpg, .*ISIC_0000000\.png: duplicate id ISIC_0000000",
            capsys, remaining=2)


def test_unsafe_zip_member(make_isic, tmp_path, capsys) -> None:
    root = make_isic(2, zips=True)
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../evil/ISIC_0000009.jpg", b"x")
    _expect([root, bad], r"bad\.zip:\.\./evil/ISIC_0000009\.jpg: unsafe member name", capsys,
            remaining=2)


def test_corrupt_zip(make_isic, tmp_path, capsys) -> None:
    root = make_isic(2)
    broken = tmp_path / "ISBI2016_ISIC_Part1_Training_Data.zip"
    broken.write_bytes(b"PK\x03\x04 this is not really a zip")
    _expect([root, broken], r"ISBI2016_ISIC_Part1_Training_Data\.zip: not a readable zip", capsys,
            remaining=2)


def test_empty_input_and_missing_source(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("nothing here")
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError, match="no usable image/mask pairs"):
            find_cases([empty], on_error=on_error)
    with pytest.raises(DataError, match="does not exist"):
        find_cases([tmp_path / "nowhere"])
    with pytest.raises(DataError, match="no source"):
        find_cases([])


def test_id_with_dot_refused(make_isic, tmp_path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "lesion.v2.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match=r"lesion\.v2\.jpg: the id part of the name holds a '\.'"):
        find_cases([folder])


def _replace_mask(root: Path, cid: str, img: Image.Image) -> None:
    (root / TRAIN_GT / f"{cid}_Segmentation.png").write_bytes(encode_png(img))


def test_content_errors_at_read(make_isic) -> None:
    root = make_isic(3)
    cases = {c.id: c for c in find_cases([root])}
    image, _, _ = read_case(cases["ISIC_0000000"])
    _replace_mask(root, "ISIC_0000000", Image.new("L", (image.width + 1, image.height)))
    with pytest.raises(ImageError, match=r"ISIC_0000000_Segmentation\.png: mask is .* but its image"):
        read_case(cases["ISIC_0000000"])
    image, _, _ = read_case(cases["ISIC_0000001"])
    _replace_mask(root, "ISIC_0000001", Image.new("L", image.size, 100))
    with pytest.raises(ImageError, match=r"ISIC_0000001_Segmentation\.png: mask is not binary"):
        read_case(cases["ISIC_0000001"])
    path = root / TRAIN_IMG / "ISIC_0000002.jpg"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ImageError, match=r"ISIC_0000002\.jpg: corrupt or truncated"):
        read_case(cases["ISIC_0000002"])
