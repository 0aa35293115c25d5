"""The one image loader and mask reader: modes, EXIF, 16-bit, truncation, bombs, masks."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesionseg.data import images
from lesionseg.data.images import (
    ImageError,
    encode_grey_png,
    encode_jpeg,
    encode_mask_png,
    encode_png,
    load_image,
    load_mask,
    mask_from_array,
    write_mask,
)


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(w: int = 40, h: int = 30) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (200, 30, 30)  # left half red
    arr[:, w // 2:] = (30, 30, 200)  # right half blue
    return Image.fromarray(arr)


def test_jpeg_file_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(encode_jpeg(_rgb()))
    for src in (path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes())):
        img, size = load_image(src)
        assert img.mode == "RGB" and img.size == (40, 30) and size == (30, 40)


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = encode_jpeg(_rgb(200, 150))
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg: corrupt or truncated"):
        load_image(path)


def test_zero_byte_and_non_image(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg: empty file"):
        load_image(empty)
    with pytest.raises(ImageError, match="x.png: empty file"):
        load_image(b"", name="x.png")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all")
    with pytest.raises(ImageError, match=r"notes\.jpg: not an image"):
        load_image(text)
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "missing.jpg")


def test_rgba_composited_on_white() -> None:
    arr = np.zeros((10, 10, 4), np.uint8)
    arr[..., 0] = 255
    arr[:, :5, 3] = 255  # left opaque red, right fully transparent
    img, _ = load_image(_bytes(Image.fromarray(arr, "RGBA"), "PNG"))
    out = np.asarray(img)
    assert img.mode == "RGB"
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 9]) == (255, 255, 255)


def test_cmyk_jpeg_and_palette_and_grey() -> None:
    cmyk = _rgb().convert("CMYK")
    img, _ = load_image(_bytes(cmyk, "JPEG", quality=95))
    assert img.mode == "RGB"
    red = np.asarray(img)[15, 5]
    assert red[0] > 150 and red[2] < 90  # still red after the CMYK round trip
    pal = _rgb().convert("P", palette=Image.ADAPTIVE, colors=4)
    img, _ = load_image(_bytes(pal, "PNG"))
    assert img.mode == "RGB" and np.asarray(img)[15, 35][2] > 150
    grey = Image.new("L", (8, 6), 77)
    img, _ = load_image(_bytes(grey, "PNG"))
    assert img.mode == "RGB" and tuple(np.asarray(img)[0, 0]) == (77, 77, 77)


def test_16bit_png_scaled_not_clipped() -> None:
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    png = _bytes(Image.fromarray(arr), "PNG")  # numpy uint16 -> Pillow mode I;16
    img, _ = load_image(png)
    assert np.asarray(img)[0, :, 0].tolist() == [0, 128, 255]


def test_exif_rotated_jpeg() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    data = _bytes(_rgb(40, 20), "JPEG", quality=95, exif=exif.tobytes())
    img, size = load_image(data)
    assert size == (40, 20) and img.size == (20, 40)  # (h, w) display; PIL size is (w, h)
    out = np.asarray(img)
    assert out[2, 10, 0] > 150 and out[37, 10, 2] > 150  # red (stored left) is now on top


def test_bomb_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(encode_png(Image.new("RGB", (50, 50))), name="big.png")
    load_image(encode_png(Image.new("RGB", (20, 20))))  # 400 pixels: fine


def test_min_size_draft_decodes_less() -> None:
    data = encode_jpeg(_rgb(800, 600))
    img, size = load_image(data, min_size=100)
    assert size == (600, 800)  # full display size is reported
    assert 100 <= min(img.size) < 600 and img.size == (200, 150)


def test_mask_values_and_conversion(caplog: pytest.LogCaptureFixture) -> None:
    arr = np.zeros((6, 8), np.uint8)
    arr[2:4, 2:6] = 255
    mask = load_mask(encode_png(Image.fromarray(arr)), expected_size=(6, 8))
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), arr)
    with caplog.at_level(logging.WARNING):
        scaled = load_mask(encode_png(Image.fromarray(arr // 255)), name="m01.png")
    assert np.array_equal(np.asarray(scaled), arr) and "m01.png: mask has values 0/1" in caplog.text
    rgb = Image.fromarray(np.stack([arr] * 3, axis=-1))
    assert np.array_equal(np.asarray(load_mask(encode_png(rgb))), arr)  # RGB 0/255 mask is fine


def test_mask_errors() -> None:
    arr = np.zeros((6, 8), np.uint8)
    arr[0, :4] = 128
    with pytest.raises(ImageError, match=r"grey\.png: mask is not binary \(2 distinct values: 0, 128\)"):
        load_mask(encode_png(Image.fromarray(arr)), name="grey.png")
    with pytest.raises(ImageError, match=r"m\.png: mask is 8x6 but its image is 9x6"):
        load_mask(encode_png(Image.new("L", (8, 6))), name="m.png", expected_size=(6, 9))


def test_mask_from_array_and_write(tmp_path: Path) -> None:
    for arr in (np.eye(4, dtype=bool), np.eye(4, dtype=np.uint8), np.eye(4, dtype=np.uint8) * 255):
        assert np.array_equal(np.asarray(mask_from_array(arr)), np.eye(4, dtype=np.uint8) * 255)
    path = write_mask(tmp_path / "ISIC_0000000_Segmentation.png", np.eye(4, dtype=bool))
    back = Image.open(path)
    assert back.mode == "L" and np.array_equal(np.asarray(back), np.eye(4, dtype=np.uint8) * 255)
    with pytest.raises(ValueError, match="2-D"):
        mask_from_array(np.zeros((2, 2, 2)))


def _mask_cases() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    cases = []
    for h, w in ((1, 1), (1, 7), (9, 1), (31, 45), (300, 257)):
        yy, xx = np.mgrid[:h, :w]
        disk = (yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (max(h, w) / 3) ** 2
        for m in (np.zeros((h, w), bool), np.ones((h, w), bool), rng.random((h, w)) > 0.5, disk):
            cases.append(m.astype(np.uint8) * 255)
    return cases


def test_mask_png_round_trips_exactly_as_mode_l(tmp_path: Path) -> None:
    """The fast mask encoder (cv2: no row filter, zlib level 1) writes 8-bit greyscale PNGs that PIL
    reads back as mode L, pixel for pixel, and that pass PIL's CRC/structure check."""
    for arr in _mask_cases():
        data = encode_mask_png(arr)
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        assert data[24:26] == bytes([8, 0])  # bit depth 8, colour type 0 (greyscale)
        Image.open(io.BytesIO(data)).verify()
        back = Image.open(io.BytesIO(data))
        assert back.format == "PNG" and back.mode == "L" and back.size == arr.shape[::-1]
        assert np.array_equal(np.asarray(back), arr)
    # A 1000x1000 disk: no bigger than PIL's compress_level=1 PNG.
    yy, xx = np.mgrid[:1000, :1000]
    disk = ((yy - 500) ** 2 + (xx - 400) ** 2 < 300 ** 2).astype(np.uint8) * 255
    assert len(encode_mask_png(disk)) < len(encode_png(Image.fromarray(disk), compress_level=1))


def test_write_mask_takes_every_mask_form_and_refuses_grey(tmp_path: Path) -> None:
    arr = _mask_cases()[-1]  # the 300x257 disk
    forms = {"bool": arr > 0, "01": (arr > 0).astype(np.uint8), "0255": arr,
             "pil": Image.fromarray(arr, mode="L"), "noncontiguous": np.asfortranarray(arr)}
    for name, form in forms.items():
        path = write_mask(tmp_path / f"{name}_Segmentation.png", form)
        back = Image.open(path)
        assert back.mode == "L" and np.array_equal(np.asarray(back), arr), name
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temporary left behind
    grey = arr // 2
    with pytest.raises(ValueError, match="0 and 255"):
        encode_mask_png(grey)
    with pytest.raises(ValueError, match="0 and 255"):
        encode_mask_png((arr > 0).astype(np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        encode_mask_png(arr > 0)
    with pytest.raises(ValueError, match="0 and 255"):
        write_mask(tmp_path / "grey.png", Image.fromarray(grey, mode="L"))
    with pytest.raises(ValueError, match="mode L"):
        write_mask(tmp_path / "one.png", Image.fromarray(arr).convert("1"))
    # A grey uint8 array is binarized as mask_from_array does (> 128), as before.
    path = write_mask(tmp_path / "g.png", np.array([[0, 128, 129, 255]], np.uint8))
    assert np.asarray(Image.open(path)).tolist() == [[0, 0, 255, 255]]


def test_grey_png_round_trips_exactly() -> None:
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:200, :300]
    smooth = (127.5 + 127.5 * np.sin(yy / 17.0) * np.cos(xx / 23.0)).round().astype(np.uint8)
    for arr in (smooth, rng.integers(0, 256, (37, 1), dtype=np.uint8), np.zeros((1, 1), np.uint8)):
        back = Image.open(io.BytesIO(encode_grey_png(arr)))
        assert back.mode == "L" and np.array_equal(np.asarray(back), arr)
    with pytest.raises(ValueError, match="uint8"):
        encode_grey_png(smooth.astype(np.float32))


def test_the_largest_accepted_image_gives_a_mask_a_default_pillow_opens():
    """The official ISIC scorer opens masks with Pillow's default bomb limit: an input of the
    largest size accepted here must give a mask it opens, one pixel more is refused here."""
    check = ("import sys; from PIL import Image; w, h = int(sys.argv[1]), int(sys.argv[2]); "
             "Image._decompression_bomb_check((w, h))")
    limit = images.MAX_IMAGE_PIXELS
    ok = subprocess.run([sys.executable, "-c", check, str(limit), "1"], capture_output=True)
    assert ok.returncode == 0, ok.stderr
    over = subprocess.run([sys.executable, "-c", check, str(limit + 1), "1"], capture_output=True,
                          text=True)
    assert "DecompressionBombError" in over.stderr
