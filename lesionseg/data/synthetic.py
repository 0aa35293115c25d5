"""Synthetic dermoscopy-like cases written in the exact ISIC 2016 Part 1 layout.

Tests, the training demo and the benchmarks use these instead of the real data set (which
cannot be downloaded here). A case is skin with shading, an irregular lesion with a fuzzy
border and internal texture, hairs and a vignette; its mask is the lesion (0/255).

Speed: colour fields are computed at a low working resolution with numpy, then upsampled by
Pillow; only the lesion boundary, fine grain and hairs are made at full size, so a full-size
4288x2848 case takes a fraction of a second. Every case is seeded by (seed, index), so a data
set is the same on every machine whatever the number of cases.
"""

from __future__ import annotations

import argparse
import io
import logging
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw
from tqdm import tqdm

from lesionseg.data.images import encode_png
from lesionseg.errors import UserError

log = logging.getLogger(__name__)

# Official folder (and zip) names of ISIC 2016 Part 1, by (split, kind).
OFFICIAL_NAMES = {
    ("train", "image"): "ISBI2016_ISIC_Part1_Training_Data",
    ("train", "mask"): "ISBI2016_ISIC_Part1_Training_GroundTruth",
    ("test", "image"): "ISBI2016_ISIC_Part1_Test_Data",
    ("test", "mask"): "ISBI2016_ISIC_Part1_Test_GroundTruth",
}
FULL_SIZE = (2848, 4288)  # (height, width) of the largest ISIC 2016 images
WORK_SIDE = 320  # longest side of the low-resolution working grid
# Aspect ratios (long/short) seen in ISIC 2016: 4:3, 3:2 (4288x2848), 1:1 and wider crops.
ASPECTS = (4 / 3, 4288 / 2848, 1.0, 1.25, 1.6, 16 / 9)
SKIN_TONES = np.array([
    (238, 205, 180), (228, 180, 150), (214, 160, 130), (196, 138, 108),
    (170, 115, 85), (140, 95, 70), (232, 190, 175), (220, 170, 160),
], dtype=np.float32)
BROWN = np.array((1.0, 0.82, 0.7), dtype=np.float32)  # lesion tint relative to the skin
BLUE_GREY = np.array((0.8, 0.88, 1.05), dtype=np.float32)  # veil tint, times skin brightness
JPEG_QUALITY = 92
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member dates: the same seed gives the same zip bytes


def case_id(index: int) -> str:
    """ISIC-style id of the index-th synthetic case."""
    return f"ISIC_{index:07d}"


def case_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    """(height, width): longest side log-uniform in [min_side, max_side], an ISIC-like aspect,
    landscape mostly, portrait sometimes."""
    long_side = int(round(np.exp(rng.uniform(np.log(min_side), np.log(max_side + 1)))))
    long_side = min(max(long_side, min_side), max_side)
    short = max(8, int(round(long_side / ASPECTS[rng.integers(len(ASPECTS))])))
    if rng.random() < 0.15:
        return long_side, short
    return short, long_side


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a small random grid upsampled bicubically."""
    gh = max(2, int(round(cells * h / max(h, w))) + 1)
    gw = max(2, int(round(cells * w / max(h, w))) + 1)
    grid = Image.fromarray(rng.standard_normal((gh, gw)).astype(np.float32), mode="F")
    return np.asarray(grid.resize((w, h), Image.BICUBIC), dtype=np.float32)


def _lesion_field(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Normalised distance d(x, y) of an irregular lesion: d < 1 inside, 1 on the border.

    Polar radius with random harmonics (irregular outline) plus smooth noise (lobes)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    s = min(h, w)
    cy = h / 2 + rng.uniform(-0.12, 0.12) * h
    cx = w / 2 + rng.uniform(-0.12, 0.12) * w
    r0 = rng.uniform(0.2, 0.42) * s
    stretch = rng.uniform(0.75, 1.3)
    angle = float(rng.uniform(0, np.pi))
    cos_a, sin_a = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    dy, dx = y - cy, x - cx
    u = dx * cos_a + dy * sin_a
    v = (-dx * sin_a + dy * cos_a) * np.float32(stretch)
    theta = np.arctan2(v, u)
    radius = np.ones_like(theta)
    for k in range(2, 8):
        radius += rng.uniform(0, 0.22 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    d = np.hypot(u, v) / (r0 * radius)
    return (d + 0.12 * _smooth_noise(rng, h, w, cells=9)).astype(np.float32)


def _render_colour(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    """RGB float image at the working resolution: shaded skin, textured lesion, vignette."""
    h, w = d.shape
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.92, 1.05)
    shading = 1 + 0.08 * _smooth_noise(rng, h, w, cells=4) + 0.03 * _smooth_noise(rng, h, w, 16)
    img = skin[None, None, :] * shading[..., None]
    # Lesion: light/dark brown mottling, dark globules, sometimes a blue-grey veil.
    mix = np.clip(0.5 + 0.45 * _smooth_noise(rng, h, w, 12) + 0.35 * (1 - d), 0, 1)
    # Lesion colours relative to the skin, so a lesion is darker on every skin tone.
    light = skin * BROWN * rng.uniform(0.5, 0.72)
    dark = skin * BROWN * rng.uniform(0.2, 0.35)
    lesion = light[None, None, :] * (1 - mix[..., None]) + dark[None, None, :] * mix[..., None]
    dots = np.clip(_smooth_noise(rng, h, w, 48) - 1.2, 0, None)
    lesion *= (1 - 0.5 * np.clip(dots, 0, 1))[..., None]
    if rng.random() < 0.35:
        veil = np.clip(_smooth_noise(rng, h, w, 6) - 0.4, 0, 1)[..., None] * 0.6
        lesion = lesion * (1 - veil) + (BLUE_GREY * skin.mean() * 0.55)[None, None, :] * veil
    softness = rng.uniform(0.03, 0.12)  # fuzzy border width, in units of the lesion radius
    alpha = 1 / (1 + np.exp(np.clip((d - 1) / softness, -50, 50)))
    img = img * (1 - alpha[..., None]) + lesion * alpha[..., None]
    # Vignette; in some cases the round dark field of a contact dermoscope.
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot((y - h / 2) / (h / 2), (x - w / 2) / (w / 2)) / np.sqrt(2)
    img *= (1 - rng.uniform(0.1, 0.35) * r**2)[..., None]
    if rng.random() < 0.3:
        rim = rng.uniform(0.8, 1.0)
        img *= (1 / (1 + np.exp(np.clip((r - rim) / 0.02, -50, 50))))[..., None]
    return img


def _grain(rng: np.random.Generator, h: int, w: int, sigma: float) -> Image.Image:
    """Full-size RGB sensor grain centred on 128, tiled from a seeded 256x256 block."""
    tile = np.clip(128 + sigma * rng.standard_normal((256, 256, 3)), 0, 255).astype(np.uint8)
    block = Image.fromarray(tile, mode="RGB")
    grain = Image.new("RGB", (w, h))
    for top in range(0, h, 256):
        for left in range(0, w, 256):
            grain.paste(block, (left, top))
    return grain


def _draw_hairs(rng: np.random.Generator, img: Image.Image) -> None:
    """Dark, slightly curved hairs drawn at full size (they occlude skin and lesion alike;
    like ISIC ground truth, the mask ignores them)."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    count = int(rng.choice([0, 0, 2, 5, 10, 20]))
    width = max(1, int(round(max(w, h) / 1000)))
    for _ in range(count):
        p0 = rng.uniform(0, 1, 2) * (w, h)
        p2 = p0 + rng.uniform(-0.6, 0.6, 2) * (w, h)
        p1 = (p0 + p2) / 2 + rng.uniform(-0.15, 0.15, 2) * (w, h)
        t = np.linspace(0, 1, 24)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        tone = int(rng.integers(15, 60))
        draw.line([tuple(p) for p in pts.tolist()], fill=(tone, tone * 4 // 5, tone * 3 // 5),
                  width=width + int(rng.integers(0, 2)))


def render_case(seed: int, index: int, min_side: int = 64,
                max_side: int = FULL_SIZE[1]) -> tuple[Image.Image, Image.Image]:
    """The index-th case of a seed: (RGB image, L 0/255 mask), same size, deterministic."""
    if not 8 <= min_side <= max_side:
        raise UserError(f"synthetic sizes: need 8 <= min_side <= max_side, got {min_side}, {max_side}")
    rng = np.random.default_rng([seed, index])
    h, w = case_size(rng, min_side, max_side)
    scale = min(1.0, WORK_SIDE / max(h, w))
    wh, ww = max(8, round(h * scale)), max(8, round(w * scale))
    d = _lesion_field(rng, wh, ww)
    colour = np.clip(_render_colour(rng, d), 0, 255).astype(np.uint8)
    image = Image.fromarray(colour, mode="RGB").resize((w, h), Image.BILINEAR)
    image = ImageChops.add(image, _grain(rng, h, w, sigma=rng.uniform(2, 6)), scale=1.0, offset=-128)
    _draw_hairs(rng, image)
    # The mask is the d < 1 region of the same field, upsampled smoothly: a full-resolution
    # boundary exactly where the image's border fades (alpha = 0.5).
    d_full = Image.fromarray(d, mode="F").resize((w, h), Image.BILINEAR)
    inside = np.asarray(d_full) < 1.0
    mask = Image.fromarray(inside.astype(np.uint8) * 255, mode="L")
    return image, mask


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
                       progress: bool = False) -> Path:
    """Write n_train training and n_test test cases under `root` in the ISIC 2016 Part 1 layout
    (the four official folders, or with zips=True the four official zip files). Returns root.

    Ids are ISIC_0000000 … for training, then the test cases; images are JPEG, masks PNG named
    `<id>_Segmentation.png`. The same arguments always give the same bytes."""
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise UserError(f"synthetic data set: need at least one case (train={n_train}, test={n_test})")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    writer = _Writer(root, zips)
    plan = [("train", i) for i in range(n_train)] + [("test", n_train + i) for i in range(n_test)]
    try:
        for split, index in tqdm(plan, desc="synth", unit="case", disable=not progress):
            image, mask = render_case(seed, index, min_side, max_side)
            cid = case_id(index)
            writer.write(split, "image", f"{cid}.jpg", _jpeg(image))
            writer.write(split, "mask", f"{cid}_Segmentation.png", encode_png(mask))
    finally:
        writer.close()
    return root


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lesionseg synth`."""
    parser.description = (
        "Write synthetic dermoscopy-like cases (skin, irregular lesion, hairs, vignette) with "
        "their lesion masks, in the exact ISIC 2016 Part 1 layout, so every job can be tried "
        "without the real data. The same seed always gives the same files.")
    parser.add_argument("out", metavar="OUT", help="folder to write (created if missing)")
    parser.add_argument("--train", "--count", dest="train", type=int, default=20,
                        help="number of training cases (default: %(default)s)")
    parser.add_argument("--test", type=int, default=0,
                        help="number of official-test cases (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every case (default: %(default)s)")
    parser.add_argument("--min-side", type=int, default=64,
                        help="smallest longest side in pixels (default: %(default)s)")
    parser.add_argument("--max-side", type=int, default=FULL_SIZE[1],
                        help="largest longest side in pixels; ISIC full size is 4288 (default: %(default)s)")
    parser.add_argument("--zips", action="store_true",
                        help="write the four official zip files instead of the four folders")


def command(args: argparse.Namespace) -> int:
    """Run `lesionseg synth`: write the data set and print where it is."""
    start = time.perf_counter()
    root = write_isic_dataset(args.out, args.train, args.test, seed=args.seed,
                              min_side=args.min_side, max_side=args.max_side, zips=args.zips,
                              progress=True)
    seconds = time.perf_counter() - start
    layout = "official zips" if args.zips else "official folders"
    print(f"wrote {args.train} training and {args.test} test cases to {root} ({layout}) "
          f"in {seconds:.1f} s")
    return 0
