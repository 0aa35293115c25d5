"""Synthetic ISIC data: exact layout, determinism, sizes, masks that match the lesion, speed."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from lesionseg.cli import main
from lesionseg.data.synthetic import (
    OFFICIAL_NAMES,
    render,
    render_case,
    render_hard_case,
    write_isic_dataset,
)
from lesionseg.errors import UserError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_folder_layout(isic_root: Path) -> None:
    names = sorted(p.name for p in isic_root.iterdir())
    assert names == sorted(OFFICIAL_NAMES.values())
    train = sorted(p.name for p in (isic_root / "ISBI2016_ISIC_Part1_Training_Data").iterdir())
    assert train == [f"ISIC_{i:07d}.jpg" for i in range(16)]
    test_gt = sorted(p.name for p in (isic_root / "ISBI2016_ISIC_Part1_Test_GroundTruth").iterdir())
    assert test_gt == [f"ISIC_{i:07d}_Segmentation.png" for i in range(16, 20)]


def test_zip_layout(isic_zips: Path) -> None:
    assert sorted(p.name for p in isic_zips.iterdir()) == sorted(f"{n}.zip" for n in OFFICIAL_NAMES.values())
    for folder in OFFICIAL_NAMES.values():
        with zipfile.ZipFile(isic_zips / f"{folder}.zip") as zf:
            names = zf.namelist()
            assert names and all(n.startswith(f"{folder}/") for n in names)


def test_deterministic(tmp_path: Path) -> None:
    a = write_isic_dataset(tmp_path / "a", 2, 1, seed=3, max_side=96)
    b = write_isic_dataset(tmp_path / "b", 2, 1, seed=3, max_side=96)
    c = write_isic_dataset(tmp_path / "c", 2, 1, seed=4, max_side=96)
    assert _files(a) == _files(b)
    assert _files(a) != _files(c)
    za = write_isic_dataset(tmp_path / "za", 2, 1, seed=3, max_side=96, zips=True)
    zb = write_isic_dataset(tmp_path / "zb", 2, 1, seed=3, max_side=96, zips=True)
    assert _files(za) == _files(zb)


def test_sizes_and_aspects() -> None:
    shapes = [render_case(0, i, 64, 400)[0].size for i in range(30)]
    longest = [max(s) for s in shapes]
    assert min(longest) >= 64 and max(longest) <= 400
    assert len({round(max(s) / min(s), 2) for s in shapes}) >= 3  # varied aspect ratios
    assert any(w < h for w, h in shapes) and any(w > h for w, h in shapes)


def test_mask_marks_the_lesion() -> None:
    for index in range(12):
        image, mask = render_case(1, index, 96, 160)
        assert image.size == mask.size and mask.mode == "L"
        m = np.asarray(mask) > 0
        assert set(np.unique(np.asarray(mask)).tolist()) == {0, 255}
        assert 0.02 < m.mean() < 0.9
        # the lesion is darker than the skin right around it (a ring outside the mask)
        ring = np.asarray(mask.filter(ImageFilter.MaxFilter(15))) > 0
        ring &= ~(np.asarray(mask.filter(ImageFilter.MaxFilter(5))) > 0)
        lum = np.asarray(image.convert("L"), dtype=np.float32)
        assert lum[m].mean() < lum[ring].mean() - 10


def test_hard_cases_are_binary_aligned_and_whole() -> None:
    """Hard masks: exactly 0/255, the lesion's size, one region without holes (hair and
    bubbles never cut the mask), darker than the skin just outside for nearly every case
    even when faint, and deterministic; the easy generator is untouched by the option."""
    from lesionseg.postprocess import fill_holes, largest_component

    darker = 0
    for index in range(16):
        image, mask = render_hard_case(2, index, 160, 320)
        assert image.size == mask.size and image.mode == "RGB" and mask.mode == "L"
        arr = np.asarray(mask)
        assert set(np.unique(arr).tolist()) <= {0, 255}
        m = arr > 0
        assert 0.01 < m.mean() < 0.95
        assert np.array_equal(fill_holes(arr), arr)
        assert (largest_component(arr) > 0).sum() >= 0.95 * m.sum()
        ring = np.asarray(mask.filter(ImageFilter.MaxFilter(21))) > 0
        ring &= ~(np.asarray(mask.filter(ImageFilter.MaxFilter(9))) > 0)
        lum = np.asarray(image.convert("L"), dtype=np.float32)
        if ring.any() and np.median(lum[m]) < np.median(lum[ring]) - 3:
            darker += 1
    assert darker >= 13, f"only {darker} of 16 hard lesions are darker than their surroundings"
    a, b = render_hard_case(2, 3, 160, 320), render("hard", 2, 3, 160, 320)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert np.array_equal(np.asarray(render("easy", 2, 3, 64, 96)[0]),
                          np.asarray(render_case(2, 3, 64, 96)[0]))


def test_hard_set_has_the_difficulties(tmp_path: Path) -> None:
    """Across a hard set: some full-size images, some lesions touching the border, dark
    skin, and images differing from their easy twin."""
    shapes, touching, dark = [], 0, 0
    for index in range(12):
        image, mask = render_hard_case(0, index, 64, 4288)
        shapes.append(image.size)
        m = np.asarray(mask) > 0
        touching += bool(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
        small = np.asarray(image.resize((64, 64)).convert("L"), dtype=np.float32)
        dark += bool(np.median(small[~np.asarray(mask.resize((64, 64))).astype(bool)]) < 90)
    assert (4288, 2848) in shapes
    assert touching >= 2 and dark >= 2
    with pytest.raises(UserError, match="choose one of easy, hard"):
        write_isic_dataset(tmp_path, 1, 0, difficulty="medium")


def test_full_size_case_is_fast() -> None:
    start = time.perf_counter()
    image, mask = render_case(0, 0, 4288, 4288)
    seconds = time.perf_counter() - start
    assert max(image.size) == 4288 and mask.size == image.size
    assert seconds < 3.0, f"a full-size case took {seconds:.2f} s"


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="at least one case"):
        write_isic_dataset(tmp_path, 0, 0)
    with pytest.raises(UserError, match="min_side <= max_side"):
        render_case(0, 0, 200, 100)


def test_synth_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "syn"
    rc = main(["synth", str(out), "--train", "2", "--test", "1", "--max-side", "80", "--zips"])
    assert rc == 0
    assert "wrote 2 training and 1 test cases" in capsys.readouterr().out
    assert len(list(out.glob("*.zip"))) == 4
    with zipfile.ZipFile(out / "ISBI2016_ISIC_Part1_Test_Data.zip") as zf:
        img = Image.open(zf.open("ISBI2016_ISIC_Part1_Test_Data/ISIC_0000002.jpg"))
        assert max(img.size) <= 80
    hard = tmp_path / "hard"
    assert main(["synth", str(hard), "--train", "2", "--max-side", "96", "--hard"]) == 0
    assert "(hard)" in capsys.readouterr().out
    image = hard / "ISBI2016_ISIC_Part1_Training_Data" / "ISIC_0000001.jpg"
    expected, _ = render_hard_case(0, 1, 64, 96)
    assert Image.open(image).size == expected.size
