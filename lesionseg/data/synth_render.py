"""Rendering one synthetic dermoscopy-like case: (RGB image, L 0/255 mask), seeded by (seed,
index); `data.synthetic` writes them in the ISIC 2016 Part 1 layout.

A case is skin with shading, an irregular lesion with a fuzzy
border and internal texture, hairs and a vignette; its mask is the lesion (0/255).

Two difficulties. `easy` (the demo's) has clear, dark lesions that every model segments.
`hard` renders what makes real dermoscopy hard (`render_hard_case`): faint low-contrast lesions
with soft borders, light to very dark skin, dense hair across the lesion, freckles and
satellite spots beside it, rulers and ink marks, air bubbles, colour-calibration stickers,
dark vignette corners and the round field of a contact dermoscope, lesions running off the image edge, and a share of
full-size 4288x2848 images. Its mask is the lesion as a dermatologist outlines it: the faint
border included, the satellites, freckles, ink and vignette excluded, and hairs and bubbles
over the lesion not cutting holes in it.

Speed: colour fields are computed at a low working resolution with numpy, then upsampled by
Pillow; only the lesion boundary, fine grain and hairs are made at full size, so a full-size
4288x2848 case takes a fraction of a second. Every case is seeded by (seed, index), so a data
set is the same on every machine whatever the number of cases.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from lesionseg.data.stickers import draw_sticker
from lesionseg.errors import UserError
from lesionseg.postprocess import fill_holes, largest_component

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
DIFFICULTIES = ("easy", "hard")
# Hard cases: skin from very light to very dark (Fitzpatrick I-VI), where a lesion's contrast
# against dark skin is small.
HARD_SKIN_TONES = np.array([
    (246, 218, 198), (238, 205, 180), (226, 178, 148), (204, 148, 114),
    (176, 120, 88), (146, 98, 70), (116, 76, 54), (88, 58, 42),
], dtype=np.float32)
HARD_FULL_SIZE_SHARE = 0.08  # hard cases rendered at the full ISIC size (4288x2848)
HARD_STICKER_SHARE = 0.2  # hard cases with a round colour-calibration sticker at an edge
INK_COLOURS = ((86, 44, 140), (40, 62, 150), (30, 30, 40))  # surgical-pen purple, blue, black


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


def _lesion_field(rng: np.random.Generator, h: int, w: int, offset: float = 0.12,
                  radius: tuple[float, float] = (0.2, 0.42)) -> np.ndarray:
    """Normalised distance d(x, y) of an irregular lesion: d < 1 inside, 1 on the border.

    Polar radius with random harmonics (irregular outline) plus smooth noise (lobes); the
    centre lies within `offset` of the image centre (fractions of the sides) and the mean
    radius in `radius` (fractions of the shorter side)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    s = min(h, w)
    cy = h / 2 + rng.uniform(-offset, offset) * h
    cx = w / 2 + rng.uniform(-offset, offset) * w
    r0 = rng.uniform(*radius) * s
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
    _check_sides(min_side, max_side)
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


def _blobs(rng: np.random.Generator, h: int, w: int, d: np.ndarray, count: int,
           radius: tuple[float, float], ring: tuple[float, float]) -> np.ndarray:
    """Darkness in [0, 1] of `count` small soft blobs (freckles, satellite spots) centred where
    the lesion distance d lies in `ring`: beside the lesion, never in it."""
    field = np.zeros((h, w), np.float32)
    ys, xs = np.nonzero((d > ring[0]) & (d < ring[1]))
    if not len(ys):
        return field
    y, x = np.ogrid[0:h, 0:w]
    for _ in range(count):
        k = int(rng.integers(len(ys)))
        r = rng.uniform(*radius) * max(h, w)
        blob = np.exp(-(((y - ys[k]) ** 2 + (x - xs[k]) ** 2) / (2 * r * r))).astype(np.float32)
        field = np.maximum(field, blob * rng.uniform(0.5, 1.0))
    return field


def _render_hard_colour(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    """RGB float image at the working resolution for a hard case: shaded skin of any tone,
    a lesion that is often faint with a soft border (the mask's edge, d = 1, lies inside the
    fading rim), freckles and satellite spots beside it, a strong vignette or the dark round
    field of a contact dermoscope."""
    h, w = d.shape
    skin = HARD_SKIN_TONES[rng.integers(len(HARD_SKIN_TONES))] * rng.uniform(0.94, 1.04)
    shading = 1 + 0.1 * _smooth_noise(rng, h, w, cells=4) + 0.04 * _smooth_noise(rng, h, w, 16)
    img = skin[None, None, :] * shading[..., None]
    faint = rng.random() < 0.5
    tone = rng.uniform(0.7, 0.86) if faint else rng.uniform(0.42, 0.7)
    light = skin * BROWN ** 0.5 * tone
    dark = light * rng.uniform(0.55, 0.85)
    mix = np.clip(0.5 + 0.5 * _smooth_noise(rng, h, w, 12) + 0.3 * (1 - d), 0, 1)
    lesion = light[None, None, :] * (1 - mix[..., None]) + dark[None, None, :] * mix[..., None]
    if rng.random() < 0.3:  # regression: lighter, skin-coloured patches inside the lesion
        patch = np.clip(_smooth_noise(rng, h, w, 8) - 0.5, 0, 1)[..., None]
        lesion = lesion * (1 - 0.6 * patch) + skin[None, None, :] * 0.6 * patch
    if rng.random() < 0.3:
        veil = np.clip(_smooth_noise(rng, h, w, 6) - 0.4, 0, 1)[..., None] * 0.5
        lesion = lesion * (1 - veil) + (BLUE_GREY * skin.mean() * 0.6)[None, None, :] * veil
    softness = rng.uniform(0.08, 0.25) if faint else rng.uniform(0.03, 0.12)
    # The border fades over about 2 × softness; the outline (d = 1) sits at alpha ≈ 0.38, so
    # the faint outer part of the rim is inside the mask, as a dermatologist would draw it.
    alpha = 1 / (1 + np.exp(np.clip((d - 1 + 0.5 * softness) / softness, -50, 50)))
    img = img * (1 - alpha[..., None]) + lesion * alpha[..., None]
    # Freckles anywhere on the skin, satellite spots close to the lesion: lesion-coloured.
    spots = np.maximum(
        _blobs(rng, h, w, d, int(rng.choice([0, 0, 5, 15, 30])), (0.003, 0.008), (1.25, 9.0)),
        _blobs(rng, h, w, d, int(rng.choice([0, 0, 1, 3, 5])), (0.008, 0.02), (1.35, 1.9)))
    spot_colour = light * rng.uniform(0.7, 1.0)
    img = img * (1 - spots[..., None]) + spot_colour[None, None, :] * spots[..., None]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot((y - h / 2) / (h / 2), (x - w / 2) / (w / 2)) / np.sqrt(2)
    img *= (1 - rng.uniform(0.3, 0.75) * r ** rng.uniform(2, 4))[..., None]
    if rng.random() < 0.35:  # the dark round field of a contact dermoscope
        rim = rng.uniform(0.72, 0.95)
        img *= (0.04 + 0.96 / (1 + np.exp(np.clip((r - rim) / 0.015, -50, 50))))[..., None]
    return img


def _draw_hard_hairs(rng: np.random.Generator, img: Image.Image, centre: tuple[float, float],
                     ) -> None:
    """Dense hair: up to ~80 dark (sometimes light) curved hairs, half of them crossing the
    lesion; drawn at full size, never part of the mask."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    count = int(rng.choice([0, 4, 12, 30, 60, 90]))
    base = max(1.0, max(w, h) / 700)
    light_hair = rng.random() < 0.15
    for i in range(count):
        if i % 2 == 0:
            p0 = np.array(centre) + rng.uniform(-0.25, 0.25, 2) * (w, h)
        else:
            p0 = rng.uniform(0, 1, 2) * (w, h)
        direction = rng.uniform(-1, 1, 2)
        p2 = p0 + direction / (np.linalg.norm(direction) + 1e-6) * rng.uniform(0.2, 0.7) * max(w, h)
        p0 = p0 - (p2 - p0) * rng.uniform(0, 0.5)
        p1 = (p0 + p2) / 2 + rng.uniform(-0.1, 0.1, 2) * (w, h)
        t = np.linspace(0, 1, 32)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
        if light_hair:
            v = int(rng.integers(150, 210))
            colour = (v, v * 9 // 10, v * 3 // 4)
        else:
            v = int(rng.integers(10, 55))
            colour = (v, v * 4 // 5, v * 3 // 5)
        draw.line([tuple(p) for p in pts.tolist()], fill=colour,
                  width=max(1, int(round(base * rng.uniform(0.6, 2.2)))))


def _draw_artefacts(rng: np.random.Generator, img: Image.Image, centre: tuple[float, float],
                    ) -> Image.Image:
    """Ruler along an edge, surgical-ink marks near the lesion and air bubbles (on lesion and
    skin alike), composited at full size; none of them is part of the mask."""
    w, h = img.size
    short = min(w, h)
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    if rng.random() < 0.3:  # a ruler strip with tick marks along one edge
        band = int(short * rng.uniform(0.04, 0.08))
        edge = int(rng.integers(4))
        paper = tuple(int(v) for v in rng.uniform([215, 205, 170], [250, 245, 235])) + (235,)
        step = max(3, int(max(w, h) * rng.uniform(0.012, 0.02)))
        tick = max(1, short // 400)
        if edge < 2:  # top or bottom
            y0 = 0 if edge == 0 else h - band
            draw.rectangle([0, y0, w, y0 + band], fill=paper)
            for k, x in enumerate(range(0, w, step)):
                length = band * (0.7 if k % 10 == 0 else 0.45 if k % 5 == 0 else 0.3)
                ya, yb = (y0, y0 + length) if edge == 0 else (y0 + band - length, y0 + band)
                draw.line([(x, ya), (x, yb)], fill=(25, 25, 30, 255), width=tick)
        else:  # left or right
            x0 = 0 if edge == 2 else w - band
            draw.rectangle([x0, 0, x0 + band, h], fill=paper)
            for k, y in enumerate(range(0, h, step)):
                length = band * (0.7 if k % 10 == 0 else 0.45 if k % 5 == 0 else 0.3)
                xa, xb = (x0, x0 + length) if edge == 2 else (x0 + band - length, x0 + band)
                draw.line([(xa, y), (xb, y)], fill=(25, 25, 30, 255), width=tick)
    if rng.random() < 0.25:  # surgical-pen marks: dots and arcs beside the lesion
        colour = INK_COLOURS[int(rng.integers(len(INK_COLOURS)))] + (int(rng.integers(150, 230)),)
        width = max(2, int(short * rng.uniform(0.006, 0.012)))
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = np.array(centre) + rng.uniform(-0.45, 0.45, 2) * (w, h)
            r = short * rng.uniform(0.04, 0.35)
            if rng.random() < 0.5:
                draw.ellipse([cx - width, cy - width, cx + width, cy + width], fill=colour)
            else:
                start = float(rng.uniform(0, 360))
                draw.arc([cx - r, cy - r, cx + r, cy + r], start, start + float(rng.uniform(40, 160)),
                         fill=colour, width=width)
    if rng.random() < 0.35:  # air bubbles in the immersion fluid: bright rim, lighter inside
        for _ in range(int(rng.integers(1, 9))):
            if rng.random() < 0.5:
                cx, cy = np.array(centre) + rng.uniform(-0.2, 0.2, 2) * (w, h)
            else:
                cx, cy = rng.uniform(0, 1, 2) * (w, h)
            r = short * rng.uniform(0.015, 0.08)
            rim = max(1, int(r * rng.uniform(0.06, 0.15)))
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 255, 255, 40),
                         outline=(250, 250, 250, 210), width=rim)
            glint = r * 0.25
            draw.ellipse([cx - r * 0.5 - glint, cy - r * 0.5 - glint, cx - r * 0.5 + glint,
                          cy - r * 0.5 + glint], fill=(255, 255, 255, 200))
    if layer.getbbox() is None:
        return img
    return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")


def render_hard_case(seed: int, index: int, min_side: int = 64,
                     max_side: int = FULL_SIZE[1]) -> tuple[Image.Image, Image.Image]:
    """The index-th hard case of a seed: (RGB image, L 0/255 mask), same size, deterministic.

    About one case in twelve is full size (4288x2848, when max_side allows); lesions are
    larger and off-centre often enough that a third of them run off an edge."""
    _check_sides(min_side, max_side)
    rng = np.random.default_rng([seed, index, 1])
    if max_side >= FULL_SIZE[1] and rng.random() < HARD_FULL_SIZE_SHARE:
        h, w = FULL_SIZE
    else:
        h, w = case_size(rng, min_side, max_side)
    scale = min(1.0, WORK_SIDE / max(h, w))
    wh, ww = max(8, round(h * scale)), max(8, round(w * scale))
    at_edge = rng.random() < 0.3
    d = _lesion_field(rng, wh, ww, offset=0.3 if at_edge else 0.15,
                      radius=(0.35, 0.6) if at_edge else (0.15, 0.42))
    colour = np.clip(_render_hard_colour(rng, d), 0, 255).astype(np.uint8)
    image = Image.fromarray(colour, mode="RGB").resize((w, h), Image.BILINEAR)
    image = ImageChops.add(image, _grain(rng, h, w, sigma=rng.uniform(2, 8)), scale=1.0, offset=-128)
    inside_small = d < 1.0
    if inside_small.any():
        ys, xs = np.nonzero(inside_small)
        centre = (float(xs.mean() + 0.5) / ww * w, float(ys.mean() + 0.5) / wh * h)
    else:
        centre = (w / 2, h / 2)
    _draw_hard_hairs(rng, image, centre)
    image = _draw_artefacts(rng, image, centre)
    d_full = Image.fromarray(d, mode="F").resize((w, h), Image.BILINEAR)
    # One closed outline, as a dermatologist draws it: the lesion's main region with its holes
    # (lighter regression patches) filled; small islands of the field are left as spots.
    inside = np.asarray(d_full) < 1.0
    mask = fill_holes(largest_component(inside.astype(np.uint8) * 255))
    # Calibration stickers from their own stream, so every other pixel of a case is what it
    # was before stickers were added.
    sticker_rng = np.random.default_rng([seed, index, 2])
    if sticker_rng.random() < HARD_STICKER_SHARE:
        pixels = np.array(image)
        if draw_sticker(pixels, mask, sticker_rng):
            image = Image.fromarray(pixels, mode="RGB")
    return image, Image.fromarray(mask, mode="L")


def render(difficulty: str, seed: int, index: int, min_side: int = 64,
           max_side: int = FULL_SIZE[1]) -> tuple[Image.Image, Image.Image]:
    """`render_case` (easy) or `render_hard_case` (hard)."""
    check_difficulty(difficulty)
    fn = render_hard_case if difficulty == "hard" else render_case
    return fn(seed, index, min_side, max_side)


def check_difficulty(difficulty: str) -> None:
    """UserError unless `difficulty` is one of DIFFICULTIES."""
    if difficulty not in DIFFICULTIES:
        raise UserError(f"synthetic difficulty {difficulty!r}: choose one of {', '.join(DIFFICULTIES)}")


def _check_sides(min_side: int, max_side: int) -> None:
    if not 8 <= min_side <= max_side:
        raise UserError(f"synthetic sizes: need 8 <= min_side <= max_side, got {min_side}, {max_side}")
