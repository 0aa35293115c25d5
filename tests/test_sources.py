"""lesionseg.data.sources: enumerating inference inputs, matching truth, splitting the work."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesionseg.data import archive, sources
from lesionseg.data.sources import (
    SKIP_HIDDEN,
    SKIP_NOT_IMAGE,
    Item,
    SourceError,
    assign,
    collect,
    read_order,
    sanitize_id,
)


def _jpeg(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png_mask(size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 255).save(buf, "PNG")
    return buf.getvalue()


def _add_tar(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    """A folder with images, a mask, a non-image, hidden files and a nested zip and tar."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(_jpeg(0))
    (root / "sub" / "b.png").write_bytes(_png_mask())  # an image that happens to be a PNG
    (root / "a_Segmentation.png").write_bytes(_png_mask())
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(_jpeg(1))
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._a.jpg").write_bytes(b"resource fork")
    with zipfile.ZipFile(root / "pack.zip", "w") as zf:
        zf.writestr("z/c.jpg", _jpeg(2))
        zf.writestr("../escape.jpg", _jpeg(3))
        zf.writestr("readme.md", "x")
    with tarfile.open(root / "pack.tar.gz", "w:gz") as tf:
        _add_tar(tf, "/abs/d.jpg", _jpeg(4))
        _add_tar(tf, "t/e f.jpg", _jpeg(5))
    return root


def test_collect_folder_archives_and_skips(mixed: Path) -> None:
    inv = collect([mixed])
    ids = [it.id for it in inv.items]  # folders kept (an archive counts as one, by its stem)
    assert ids == ["a", "pack__abs__d", "pack__escape", "pack__t__e_f", "pack__z__c", "sub__b"]
    assert inv.skipped[SKIP_NOT_IMAGE] == 2  # notes.txt, readme.md
    assert sorted(Path(f).name.split(":")[-1] for f in inv.skipped_examples[SKIP_NOT_IMAGE]) == \
        ["notes.txt", "readme.md"]
    assert inv.skipped[SKIP_HIDDEN] == 2  # .hidden.jpg, __MACOSX/._a.jpg
    by_id = {it.id: it for it in inv.items}
    assert by_id["a"].truth is not None and by_id["a"].truth.name == "a_Segmentation.png"
    assert by_id["pack__z__c"].truth is None
    assert by_id["pack__escape"].origin.endswith("pack.zip:../escape.jpg")
    # Every item reads back its own bytes, also after a pickle round trip (DataLoader workers).
    for item in inv.items:
        again = pickle.loads(pickle.dumps(item))
        Image.open(io.BytesIO(again.image.read())).verify()
    assert by_id["pack__abs__d"].image.read() == _jpeg(4)


def test_masks_matched_by_isic_number_and_stem(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    (images / "ISIC_0000001.jpg").write_bytes(_jpeg(0))
    (images / "lesion7.jpg").write_bytes(_jpeg(1))
    (images / "ISIC_0000002_downsampled.jpg").write_bytes(_jpeg(2))
    (images / "orphan.jpg").write_bytes(_jpeg(3))
    (masks / "ISIC_0000001_Segmentation.png").write_bytes(_png_mask())
    (masks / "lesion7.png").write_bytes(_png_mask())  # by stem
    (masks / "ISIC_0000002_segmentation.png").write_bytes(_png_mask())  # by ISIC number
    (masks / "unused_Segmentation.png").write_bytes(_png_mask())
    mzip = tmp_path / "masks.zip"
    with zipfile.ZipFile(mzip, "w") as zf:
        zf.writestr("GT/orphan_Segmentation.png", _png_mask())
    inv = collect([images], masks=[masks, mzip])
    truth = {it.id: (it.truth.name if it.truth else None) for it in inv.items}
    assert truth == {"ISIC_0000001": "ISIC_0000001_Segmentation.png",
                     "ISIC_0000002_downsampled": "ISIC_0000002_segmentation.png",
                     "lesion7": "lesion7.png", "orphan": "orphan_Segmentation.png"}
    assert inv.masks_found == 5 and inv.masks_unused == 1


def test_clashing_names_each_get_their_own_traceable_id(tmp_path: Path) -> None:
    """Camera names repeat across folders and inputs: every image keeps its own id, named
    after its folder, then its input, then its extension; nothing goes to errors."""
    photos = tmp_path / "photos"
    for sub in ("patient1", "patient2"):
        (photos / sub).mkdir(parents=True)
        (photos / sub / "IMG_0001.JPG").write_bytes(_jpeg(0))
    (photos / "patient1" / "IMG_0001_Segmentation.png").write_bytes(_png_mask())
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "same.jpg").write_bytes(_jpeg(1))
    (tmp_path / "x" / "same.png").write_bytes(_png_mask())
    (tmp_path / "x" / "SAME.jpeg").write_bytes(_jpeg(2))  # one name on macOS/Windows disks
    inv = collect([photos, tmp_path / "x", tmp_path / "y"])
    assert inv.errors == []
    origins = {it.id: it.origin[len(str(tmp_path)) + 1:] for it in inv.items}
    assert origins == {"patient1__IMG_0001": "photos/patient1/IMG_0001.JPG",
                       "patient2__IMG_0001": "photos/patient2/IMG_0001.JPG",
                       "x__same.jpg": "x/same.jpg", "x__same.png": "x/same.png",
                       "x__SAME.jpeg": "x/SAME.jpeg", "y__same": "y/same.jpg"}
    truth = {it.id: it.truth for it in inv.items}
    assert truth["patient1__IMG_0001"].name == "IMG_0001_Segmentation.png"
    assert truth["patient2__IMG_0001"] is None  # the mask beside patient1's image only
    assert collect([photos, tmp_path / "x", tmp_path / "y"]).items == inv.items  # stable


def test_same_isic_id_twice_keeps_one_for_the_scorer(tmp_path: Path) -> None:
    """ISIC ids stay as they are (the scorer pairs masks by them): one image per id is kept,
    the others are reported; the same file given twice is processed once."""
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "ISIC_0000001.jpg").write_bytes(_jpeg(0))
    inv = collect([tmp_path / "x", tmp_path / "y"])
    assert [it.id for it in inv.items] == ["ISIC_0000001"]
    assert inv.items[0].origin.endswith("x/ISIC_0000001.jpg")
    assert len(inv.errors) == 1 and "duplicate ISIC id ISIC_0000001" in inv.errors[0]["reason"]
    inv = collect([tmp_path / "x", tmp_path / "x"])
    assert len(inv.items) == 1 and "given twice" in inv.errors[0]["reason"]


def test_non_ascii_names_keep_their_letters(tmp_path: Path) -> None:
    (tmp_path / "in" / "Größe").mkdir(parents=True)
    (tmp_path / "in" / "病变 ü.png").write_bytes(_jpeg(0))
    nfd = "Lésion".replace("é", "e\u0301")  # as macOS writes it
    (tmp_path / "in" / "Größe" / f"{nfd}.jpg").write_bytes(_jpeg(1))
    long_name = "ж" * 120  # 240 UTF-8 bytes
    (tmp_path / "in" / f"{long_name}.jpg").write_bytes(_jpeg(2))
    ids = sorted(it.id for it in collect([tmp_path / "in"]).items)
    assert ids == sorted(["病变_ü", "Größe__Lésion", "ж" * 75])
    assert all(len(i.encode()) <= sources.MAX_ID_BYTES for i in ids)


def test_sanitize_id_never_keeps_path_parts() -> None:
    assert sanitize_id("ISIC_0000000") == "ISIC_0000000"
    assert sanitize_id("..") == "unnamed"
    assert sanitize_id("a/../../b c") == "a_.._.._b_c"
    assert "/" not in sanitize_id("/etc/passwd") and "\\" not in sanitize_id("C:\\x\\y")
    assert not sanitize_id(".hidden").startswith(".")
    assert sanitize_id("病变 ü") == "病变_ü" and sanitize_id("\x00a\tb") == "_a_b"


def test_missing_input_and_empty_input_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        collect([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="no images found"):
        collect([tmp_path / "empty"])
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(SourceError, match="not a readable zip"):
        collect([tmp_path / "bad.zip"])


def test_assign_covers_every_item_exactly_once() -> None:
    items = [Item(f"id{i:03d}", sources.Blob("file", f"/x/{i}.jpg")) for i in range(23)]
    seen = []
    for shards, world in ((1, 1), (3, 2), (4, 3)):
        seen = [it.id for part in range(shards) for rank in range(world)
                for it in assign(items, shards, part, world, rank)]
        assert sorted(seen) == sorted(it.id for it in items)
    with pytest.raises(SourceError):
        assign(items, 2, 2)


def test_read_order_puts_compressed_tars_in_archive_order(mixed: Path) -> None:
    inv = collect([mixed])
    order = read_order(inv.items)
    gz = [it for it in order if it.image.path.endswith(".tar.gz")]
    assert order[-len(gz):] == gz
    assert [it.image.offset for it in gz] == sorted(it.image.offset for it in gz)


def _ten_image_tar(path: Path, compression: str = "") -> list[int]:
    """A tar of ten small JPEGs; returns the byte offset of each member's header."""
    with tarfile.open(path, f"w:{compression}" if compression else "w") as tf:
        for i in range(10):
            _add_tar(tf, f"img{i}.jpg", _jpeg(i, (8, 8)))
    with tarfile.open(path) as tf:
        return [m.offset for m in tf.getmembers()]


def _damage_header(data: bytearray, offset: int) -> None:
    data[offset:offset + 16] = b"\x8f" * 16  # the name field: the checksum no longer matches


def test_a_damaged_tar_header_is_an_input_error_not_a_silent_end(tmp_path: Path) -> None:
    """tarfile ends a listing at an invalid header past offset 0 as if the tar had ended:
    the images before it are listed and the archive gets an error naming the early end."""
    path = tmp_path / "ten.tar"
    offsets = _ten_image_tar(path)
    data = bytearray(path.read_bytes())
    _damage_header(data, offsets[4])
    path.write_bytes(bytes(data))
    with tarfile.open(path) as tf:
        assert len(tf.getmembers()) == 4  # what tarfile says, with no error
    inv = collect([path])
    assert sorted(it.id for it in inv.items) == [f"img{i}" for i in range(4)]
    assert len(inv.errors) == 1 and inv.errors[0]["input"] == str(path)
    assert "invalid tar header" in inv.errors[0]["reason"] and "after 4 member" in inv.errors[0]["reason"]
    # A tar cut off at a member boundary (no end-of-archive blocks) is reported too.
    cut = tmp_path / "cut.tar"
    cut.write_bytes(bytes(path.read_bytes()[: offsets[4]]))
    assert "end-of-archive" in collect([cut]).errors[0]["reason"]
    # An intact tar, plain or compressed, has no error.
    for name, comp in (("ok.tar", ""), ("ok.tar.gz", "gz"), ("ok.tar.bz2", "bz2")):
        _ten_image_tar(tmp_path / name, comp)
        inv = collect([tmp_path / name])
        assert len(inv.items) == 10 and not inv.errors, name


def test_a_shard_with_a_damaged_header_is_reported_against_its_manifest(
        packed_shards: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    import shutil

    shutil.copytree(packed_shards, shards)
    bad = shards / "train-000001.tar"
    with tarfile.open(bad) as tf:
        members = tf.getmembers()
    data = bytearray(bad.read_bytes())
    _damage_header(data, members[3].offset)  # the second sample's .jpg
    bad.write_bytes(bytes(data))
    inv = collect([shards], [], ("train", "val", "test"))  # every split (default: test only)
    errors = [e for e in inv.errors if e["input"] == str(bad)]
    assert len(errors) == 1 and "1 readable samples, manifest.json lists 4" in errors[0]["reason"]
    assert "invalid tar header" in errors[0]["reason"]
    manifest_total = 20  # isic_root: 16 training + 4 test cases, all in the shards
    assert len(inv.items) == manifest_total - 3


def test_compressed_tar_listing_stops_at_declared_size_limits(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing a compressed tar decompresses every member's data to reach the next header: a
    few KB declaring GBs took a minute. Declared sizes are checked while listing (limits made
    small here): the listing stops there, and the archive is reported once."""
    monkeypatch.setattr(archive, "MAX_MEMBER_BYTES", 1 << 20)
    one_big = tmp_path / "big.tar.gz"
    with tarfile.open(one_big, "w:gz") as tf:
        _add_tar(tf, "a.jpg", _jpeg(0))
        _add_tar(tf, "zeros.bin", bytes(8 << 20))  # declares 8 MiB, > the 1 MiB member limit
        _add_tar(tf, "after.jpg", _jpeg(1))
    many = tmp_path / "many.tar.bz2"
    with tarfile.open(many, "w:bz2") as tf:
        for i in range(16):  # 16 x 512 KiB of zeros: each under the member limit
            _add_tar(tf, f"z{i:02d}.bin", bytes(512 << 10))
        _add_tar(tf, "after.jpg", _jpeg(1))
    assert many.stat().st_size * 100 < 8 << 20  # sources.MAX_TAR_EXPANSION
    for path, expect in ((one_big, "zeros.bin declares 8388608 bytes"),
                         (many, "100x the archive's size")):
        inv = collect([path])
        assert [it.id for it in inv.items] == (["a"] if path == one_big else [])
        assert len(inv.errors) == 1 and expect in inv.errors[0]["reason"], inv.errors
        members, problem = sources.list_tar(path)
        assert problem and len(members) < 17


def test_an_images_and_masks_folder_is_images_with_their_truth(tmp_path: Path) -> None:
    """An input holding images/ and masks/ with the same names: the masks are truth paired by
    stem, never inputs of their own (they were segmented and scored as images)."""
    for kind in ("images", "masks"):
        (tmp_path / "own" / kind).mkdir(parents=True)
        for i in range(3):
            data = _jpeg(i) if kind == "images" else _png_mask()
            (tmp_path / "own" / kind / f"case{i}.{'jpg' if kind == 'images' else 'png'}"
             ).write_bytes(data)
    inv = sources.collect([tmp_path / "own"])
    assert sorted(it.id for it in inv.items) == ["images__case0", "images__case1", "images__case2"]
    assert all(it.truth is not None and "masks" in it.truth.origin for it in inv.items)
    assert inv.masks_found == 3 and inv.masks_unused == 0
