"""Packing and reading shards: every id once, masks binary and aligned, determinism across
worker counts, manifest written last, verify catching damage, bad cases named or skipped."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesionseg.config import PackConfig
from lesionseg.data.images import encode_png
from lesionseg.data.isic import DataError, find_cases, read_case
from lesionseg.data.shard_format import (
    MANIFEST,
    SPLITS,
    decode_sample,
    iter_raw,
    iter_samples,
    read_manifest,
    split_urls,
)
from lesionseg.data.shards import is_val, pack, stored_size, verify
from lesionseg.data.synthetic import OFFICIAL_NAMES
from lesionseg.errors import UserError
from lesionseg.files import sha256_file

TRAIN_IMG = OFFICIAL_NAMES[("train", "image")]
TRAIN_GT = OFFICIAL_NAMES[("train", "mask")]
QUIET = {"progress": False}


def _all_samples(folder: Path) -> dict[str, list]:
    return {s: list(iter_samples(folder, s)) for s in SPLITS}


def test_pack_then_read_every_id_once(packed_shards: Path, isic_root: Path) -> None:
    samples = _all_samples(packed_shards)
    ids = [x.id for s in SPLITS for x in samples[s]]
    assert sorted(ids) == [f"ISIC_{i:07d}" for i in range(20)]  # each exactly once
    assert [x.id for x in samples["test"]] == [f"ISIC_{i:07d}" for i in range(16, 20)]
    for split in ("train", "val"):
        assert all(is_val(x.id, 0, 0.25) == (split == "val") for x in samples[split])
    cases = {c.id: c for c in find_cases([isic_root])}
    for split in SPLITS:
        for x in samples[split]:
            assert x.meta["split"] == split and x.meta["id"] == x.id
            assert x.image.mode == "RGB" and x.mask.mode == "L" and x.image.size == x.mask.size
            assert max(x.image.size) <= 128
            mask = np.asarray(x.mask)
            assert set(np.unique(mask).tolist()) <= {0, 255}
            src = Image.open(cases[x.id].image.path)
            assert x.meta["orig_size"] == [src.height, src.width]
            assert (x.image.height, x.image.width) == stored_size(src.height, src.width, 128)
            # aligned: the stored mask is the source mask resized like the image, and the
            # stored image is the source image resized (not flipped or transposed)
            src_mask = Image.open(cases[x.id].mask.path).resize(x.mask.size, Image.NEAREST)
            assert np.array_equal(mask, np.asarray(src_mask))
            small = np.asarray(src.convert("RGB").resize(x.image.size, Image.BILINEAR), np.float32)
            assert np.abs(np.asarray(x.image, np.float32) - small).mean() < 8


def test_manifest(packed_shards: Path) -> None:
    m = read_manifest(packed_shards)
    assert m["total_samples"] == 20 and m["splits"]["test"]["count"] == 4
    assert m["options"]["max_side"] == 128 and "workers" not in m["options"]
    assert sum(m["splits"][s]["count"] for s in SPLITS) == 20
    for entry in m["shards"]:
        path = packed_shards / entry["name"]
        assert entry["samples"] <= 4 and entry["sha256"] == sha256_file(path)
        assert entry["bytes"] == path.stat().st_size
        with tarfile.open(path) as tar:
            assert all(t.mtime == 0 and t.uid == 0 and t.uname == "lesionseg" for t in tar)
    assert split_urls(packed_shards, "train") == [
        str(packed_shards.resolve() / n) for n in m["splits"]["train"]["shards"]]
    assert verify(packed_shards, decode=True) == []


def test_same_shards_whatever_the_worker_count(isic_root: Path, tmp_path: Path) -> None:
    hashes = []
    for workers in (1, 2):
        cfg = PackConfig(workers=workers, max_side=96, shard_max_samples=6)
        m = pack([isic_root], tmp_path / f"w{workers}", cfg, **QUIET)
        hashes.append([(s["name"], s["sha256"]) for s in m["shards"]])
    assert hashes[0] == hashes[1]


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def test_verify_catches_a_flipped_byte(packed_shards: Path, tmp_path: Path) -> None:
    folder = _copy(packed_shards, tmp_path)
    shard = folder / read_manifest(folder)["shards"][1]["name"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01  # inside the first member's data
    shard.write_bytes(bytes(data))
    problems = verify(folder)
    assert len(problems) == 1 and shard.name in problems[0] and "sha256" in problems[0]


def test_verify_missing_and_unlisted(packed_shards: Path, tmp_path: Path) -> None:
    folder = _copy(packed_shards, tmp_path)
    first = read_manifest(folder)["shards"][0]["name"]
    (folder / first).rename(folder / "train-000099.tar")
    problems = verify(folder)
    assert any(first in p and "missing" in p for p in problems)
    assert any("train-000099.tar" in p and "not listed" in p for p in problems)


def test_max_side_zero_keeps_original_jpeg(isic_root: Path, tmp_path: Path) -> None:
    pack([isic_root], tmp_path / "orig", PackConfig(max_side=0, workers=1), **QUIET)
    cases = {c.id: c for c in find_cases([isic_root])}
    raws = list(iter_raw(split_urls(tmp_path / "orig", "test")))
    assert raws and all(r["jpg"] == cases[r["__key__"]].image.read_bytes() for r in raws)


def test_exif_rotated_source_is_reencoded_upright(make_isic, tmp_path: Path) -> None:
    root = make_isic(1)
    path = root / TRAIN_IMG / "ISIC_0000000.jpg"
    upright = Image.open(path)
    w, h = upright.size
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = stored turned 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif.tobytes())
    pack([root], tmp_path / "s", PackConfig(max_side=0, val_fraction=0, workers=1), **QUIET)
    raw = next(iter_raw(split_urls(tmp_path / "s", "train")))
    assert raw["jpg"] != path.read_bytes()
    sample = decode_sample(raw)
    assert sample.image.size == (w, h) == sample.mask.size and sample.meta["orig_size"] == [h, w]
    assert Image.open(io.BytesIO(raw["jpg"])).getexif().get(0x0112, 1) == 1


def test_shards_bounded_by_bytes(isic_root: Path, tmp_path: Path) -> None:
    limit = 40_000
    m = pack([isic_root], tmp_path / "b", PackConfig(shard_max_bytes=limit, workers=1), **QUIET)
    assert len(m["shards"]) > 3
    for entry in m["shards"]:
        assert entry["bytes"] <= limit + 10240 or entry["samples"] == 1


def test_rerun_replaces_stale_shards(isic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    pack([isic_root], out, PackConfig(shard_max_samples=2, workers=1, max_side=64), **QUIET)
    many = sorted(p.name for p in out.glob("*.tar"))
    m = pack([isic_root], out, PackConfig(shard_max_samples=50, workers=1, max_side=64), **QUIET)
    assert len(many) > 3 and sorted(p.name for p in out.glob("*.tar")) == sorted(
        s["name"] for s in m["shards"])
    assert verify(out) == []


def _break(root: Path) -> None:
    """Case 1 gets a grey (non-binary) mask, case 2 a truncated image."""
    size = Image.open(root / TRAIN_IMG / "ISIC_0000001.jpg").size
    (root / TRAIN_GT / "ISIC_0000001_Segmentation.png").write_bytes(
        encode_png(Image.new("L", size, 100)))
    img = root / TRAIN_IMG / "ISIC_0000002.jpg"
    img.write_bytes(img.read_bytes()[:-400])


def test_bad_case_stops_and_leaves_no_manifest(make_isic, tmp_path: Path) -> None:
    root = make_isic(4)
    out = tmp_path / "s"
    pack([root], out, PackConfig(workers=1), **QUIET)
    assert (out / MANIFEST).is_file()
    _break(root)
    with pytest.raises(UserError, match=r"ISIC_0000001_Segmentation\.png: mask is not binary"):
        pack([root], out, PackConfig(workers=2), **QUIET)
    assert not (out / MANIFEST).exists() and not list(out.glob(".*partial"))
    with pytest.raises(UserError, match="no manifest.json"):
        read_manifest(out)


def test_bad_cases_skipped_with_report(make_isic, tmp_path: Path, capsys) -> None:
    root = make_isic(4)
    _break(root)
    (root / TRAIN_GT / "ISIC_0000003_Segmentation.png").unlink()
    m = pack([root], tmp_path / "s", PackConfig(on_error="skip", workers=2), **QUIET)
    assert m["total_samples"] == 1
    reasons = {s["id"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"ISIC_0000001", "ISIC_0000002", "ISIC_0000003"}
    assert "not binary" in reasons["ISIC_0000001"] and "truncated" in reasons["ISIC_0000002"]
    assert "image without mask" in reasons["ISIC_0000003"]
    err = capsys.readouterr().err
    assert err.count("bad case(s):") == 2 and "ISIC_0000002.jpg" in err  # discovery + content
    assert [x.id for x in iter_samples(tmp_path / "s", "train")] + [
        x.id for x in iter_samples(tmp_path / "s", "val")] == ["ISIC_0000000"]


def test_all_cases_bad_is_an_error(make_isic, tmp_path: Path) -> None:
    root = make_isic(3)
    _break(root)
    (root / TRAIN_GT / "ISIC_0000000_Segmentation.png").write_bytes(encode_png(Image.new("L", (5, 5))))
    with pytest.raises(DataError, match="every case was bad"):
        pack([root], tmp_path / "s", PackConfig(on_error="skip", workers=1), **QUIET)


def test_read_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"shards": []}))
    with pytest.raises(UserError, match="not a lesionseg shard manifest"):
        read_manifest(tmp_path)


def test_split_urls_unknown_split(packed_shards: Path) -> None:
    with pytest.raises(UserError, match="unknown split 'valid'"):
        split_urls(packed_shards, "valid")


def test_decode_sample_min_size_keeps_alignment(packed_shards: Path) -> None:
    raw = max(iter_raw(split_urls(packed_shards, "train")), key=lambda r: len(r["jpg"]))
    full = decode_sample(raw)
    small = decode_sample(raw, min_size=16)
    assert small.image.size == small.mask.size and small.image.size[0] < full.image.size[0]
    expect = np.asarray(full.mask.resize(small.image.size, Image.NEAREST))
    assert np.array_equal(np.asarray(small.mask), expect)
    with pytest.raises(DataError, match="sample has no .png entry"):
        decode_sample({k: v for k, v in raw.items() if k != "png"})


def test_val_split_is_stable() -> None:
    ids = [f"ISIC_{i:07d}" for i in range(5000)]
    chosen = [cid for cid in ids if is_val(cid, 0, 0.1)]
    assert 400 < len(chosen) < 600
    assert chosen == [cid for cid in ids if is_val(cid, 0, 0.1)]
    assert set(chosen) <= {cid for cid in ids if is_val(cid, 0, 0.2)}  # growing the fraction adds
    assert chosen != [cid for cid in ids if is_val(cid, 1, 0.1)]


def test_pack_from_zips_in_parallel(isic_zips: Path, tmp_path: Path) -> None:
    read_case(find_cases([isic_zips])[0])  # the parent now holds open zip handles
    m = pack([isic_zips], tmp_path / "z", PackConfig(workers=2, max_side=64), **QUIET)
    assert m["total_samples"] == 20 and verify(tmp_path / "z", decode=True) == []
    sources = [x.meta["source"] for x in iter_samples(tmp_path / "z", "test")]
    assert all(".zip:ISBI2016_ISIC_Part1_Test_Data/" in s for s in sources)


def _images_and_masks(root: Path, isic: Path, n: int, *, zips: bool = False) -> list[Path]:
    """The images/ + masks/ layout (smp, MONAI, Kaggle): the same file name in both folders,
    from the first n cases of an ISIC root; as two folders or two zips."""
    src = sorted((isic / OFFICIAL_NAMES["train", "image"]).glob("*.jpg"))[:n]
    out = []
    for kind in ("images", "masks"):
        folder = root / kind
        folder.mkdir(parents=True)
        for i, p in enumerate(src):
            if kind == "images":
                Image.open(p).save(folder / f"case{i:03d}.png")
            else:
                shutil.copy(isic / OFFICIAL_NAMES["train", "mask"] / f"{p.stem}_Segmentation.png",
                            folder / f"case{i:03d}.png")
        if zips:
            shutil.make_archive(str(folder), "zip", folder)
            shutil.rmtree(folder)
            folder = folder.with_suffix(".zip")
        out.append(folder)
    return out


@pytest.mark.parametrize("zips", [False, True])
def test_images_and_masks_folders_pair_by_stem(isic_root: Path, tmp_path: Path,
                                               zips: bool) -> None:
    """`--source own/images --source own/masks` with the same names in both was refused as
    "duplicate id case000: 2 images"; now the masks folder's files are the masks, paired by
    stem, with the usual checks (a mask without image names the file)."""
    sources = _images_and_masks(tmp_path / "own", isic_root, 8, zips=zips)
    cases = find_cases(sources)
    assert [c.id for c in cases] == [f"case{i:03d}" for i in range(8)]
    assert all(c.mask is not None and "masks" in str(c.mask) for c in cases)
    image, mask, _ = read_case(cases[0])
    assert mask.size == image.size
    manifest = pack(sources, tmp_path / "shards", PackConfig(val_fraction=0.5, workers=1),
                    progress=False)
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 8
    if not zips:
        (sources[0] / "case000.png").unlink()
        with pytest.raises(DataError, match="case000.*mask without image"):
            find_cases(sources)


def test_a_pack_whose_val_split_would_be_empty_says_what_to_change(
        isic_root: Path, tmp_path: Path) -> None:
    """A small pack drew 0 val cases without a word, and training stopped on "no val samples"."""
    sources = _images_and_masks(tmp_path / "own", isic_root, 3)
    ids = [f"case{i:03d}" for i in range(3)]
    seed = next(s for s in range(100) if not any(is_val(i, s, 0.1) for i in ids))
    with pytest.raises(UserError, match="0 of 3 training cases fell to val.*--val-fraction"):
        pack(sources, tmp_path / "shards", PackConfig(val_fraction=0.1, split_seed=seed,
                                                      workers=1), progress=False)
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_a_stuck_or_dead_pack_worker_is_an_error_naming_the_case(make_isic, how: str) -> None:
    """A pack worker that stops answering (SIGSTOP here; a lock inherited by a fork in real
    life) or dies (an out-of-memory kill) ends the pack with one error naming a case, and
    its workers are gone: the pool never waits in silence."""
    import os
    import signal

    from lesionseg.data.encode import encoded
    cfg = PackConfig(workers=2)
    tasks = [(c, "train", cfg) for c in find_cases([make_isic(8)])]
    results = encoded(tasks, workers=2, stall_s=3)
    assert next(results)[1] == "ok"
    frame = results.gi_frame.f_locals
    workers = list(frame["processes"].values())
    assert len(workers) == 2
    for w in workers:
        os.kill(w.pid, signal.SIGSTOP if how == "stopped" else signal.SIGKILL)
    message = "a pack worker gave no result in 3 s" if how == "stopped" else "a pack worker died"
    with pytest.raises(DataError, match=rf"ISIC_\d+\.jpg: {message}"):
        list(results)
    for w in workers:
        w.join(timeout=10)
        assert not w.is_alive()


@pytest.mark.parametrize("content", ["junk", "bomb"])
def test_a_huge_zip_member_is_refused_from_its_header_unread(make_isic, tmp_path: Path,
                                                             content: str) -> None:
    """A 200 MB zip member (zeros: the zip stays small) that is no image, or a PNG whose
    header claims too many pixels, is refused naming the member, before it is inflated
    (the 1 GiB case cost 2.8 GB of memory per process)."""
    import struct
    import tracemalloc
    import zipfile
    import zlib

    root = make_isic(3)
    zpath = tmp_path / "cases.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted((root / TRAIN_IMG).glob("*.jpg"))[1:]:
            zf.write(p, f"{TRAIN_IMG}/{p.name}")
        for p in sorted((root / TRAIN_GT).glob("*.png")):
            zf.write(p, f"{TRAIN_GT}/{p.name}")
        if content == "junk":
            head = b"not an image at all"
        else:  # a PNG signature and an IHDR of 30000 x 30000 pixels
            ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
            head = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
                    + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
                    + struct.pack(">I", 200 << 20) + b"IDAT")
        with zf.open(f"{TRAIN_IMG}/ISIC_0000000.jpg", "w", force_zip64=True) as f:
            f.write(head)
            for _ in range(200):
                f.write(bytes(1 << 20))
    assert zpath.stat().st_size < 2 << 20
    reason = "not an image file" if content == "junk" else "decompression bomb"
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match=rf"cases\.zip:.*ISIC_0000000\.jpg: .*{reason}"):
            pack([zpath], tmp_path / "s", PackConfig(workers=1), **QUIET)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak >> 20} MB allocated: the member was inflated"

    from lesionseg.data.sources import Item
    from lesionseg.infer.decode import ItemDataset
    blob = find_cases([zpath], on_error="skip")[0].image
    assert blob.member.endswith("ISIC_0000000.jpg")
    row = ItemDataset([Item(id="ISIC_0000000", image=blob)], 64, 0)[0]
    assert reason in row["error"] and "ISIC_0000000.jpg" in row["error"]
