"""Colour-calibration stickers: the round discs many ISIC photographs carry at their edge.

Dermatologists stick small round calibration or marker stickers (orange, yellow, grey, white,
green, blue, red) on the skin beside a lesion; the photograph shows them as flat, saturated,
sharp-edged discs, often cut by the image border, sometimes with a darker rim or a printed
inner ring. A model that has never seen one segments it as a lesion (the worst real test
images of every trainer were small lesions beside such a sticker). `draw_sticker` paints one
onto an RGB array away from the lesion and clears the mask under it: a sticker hides skin, and
a lesion never shows through it. The training augmentation draws one into a share of the
crops (`data.sticker_prob`), and the hard synthetic set renders them, so tests and the
synthetic benchmark see them too.
"""

from __future__ import annotations

import numpy as np

from lesionseg.data.cv import cv2

# Sticker colours seen on ISIC photographs (RGB): orange, yellow, grey, white, lavender-white,
# light blue, green, red, pink.
COLOURS = np.array([
    (236, 120, 40), (238, 210, 50), (150, 150, 146), (236, 236, 230), (222, 222, 240),
    (150, 200, 214), (60, 160, 90), (214, 50, 60), (230, 130, 170),
], dtype=np.float32)
# Sticker radius as a fraction of the image's shorter side: on ISIC photographs they are large
# discs, mostly cut by the image edge.
RADIUS = (0.18, 0.5)
ASPECT = (0.8, 1.25)  # the disc's axis ratio (photographs squashed to a square make ellipses)
TRIES = 8  # positions tried for the one that covers the least lesion
MAX_LESION_COVER = 0.1  # a sticker over more than this share of its area in lesion is not drawn


def draw_sticker(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator) -> bool:
    """Paint one sticker into `image` (H×W×3 uint8, in place) near an edge or corner, where it
    covers the least lesion of `mask` (H×W, nonzero = lesion; cleared under the sticker, in
    place). Returns False, drawing nothing, when every tried place covers too much lesion."""
    h, w = image.shape[:2]
    short = min(h, w)
    r = short * rng.uniform(*RADIUS)
    best: tuple[float, float, float] | None = None
    for _ in range(TRIES):
        cx, cy = _edge_centre(rng, h, w, r)
        cover = _lesion_cover(mask, h, w, cx, cy, r)
        if cover is not None and (best is None or cover < best[0]):
            best = (cover, cx, cy)
    if best is None or best[0] > MAX_LESION_COVER:
        return False
    _, cx, cy = best
    reach = r * ASPECT[1] + 2  # the ellipse's farthest point from its centre, and a margin
    y0, x0 = max(0, int(cy - reach)), max(0, int(cx - reach))
    y1, x1 = min(h, int(cy + reach) + 1), min(w, int(cx + reach) + 1)
    covered = _paint(image[y0:y1, x0:x1], rng, cx - x0, cy - y0, r)
    if mask is not None:
        mask[y0:y1, x0:x1][covered] = 0
    return True


def _lesion_cover(mask: np.ndarray | None, h: int, w: int, cx: float, cy: float,
                  r: float) -> float | None:
    """Share of the disc's pixels inside the h×w image that are lesion (None: no pixel in the
    image); only the disc's bounding box is read."""
    y0, x0 = max(0, int(cy - r)), max(0, int(cx - r))
    y1, x1 = min(h, int(cy + r) + 1), min(w, int(cx + r) + 1)
    if y1 <= y0 or x1 <= x0:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1]
    disc = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
    if not disc.any():
        return None
    return 0.0 if mask is None else float((mask[y0:y1, x0:x1][disc] > 0).mean())


def _edge_centre(rng: np.random.Generator, h: int, w: int, r: float) -> tuple[float, float]:
    """A centre near a random edge: from half outside the image to one radius inside, so
    most stickers are cut by the border, as on the photographs."""
    inset = rng.uniform(-0.5, 1.0) * r  # distance of the centre from the edge
    along = rng.uniform(0.0, 1.0)
    side = int(rng.integers(4))
    if side == 0:
        return along * w, inset
    if side == 1:
        return along * w, h - inset
    if side == 2:
        return inset, along * h
    return w - inset, along * h


def _paint(image: np.ndarray, rng: np.random.Generator, cx: float, cy: float,
           r: float) -> np.ndarray:
    """An elliptic disc of one colour, often with a disc of another colour inside it (the
    concentric calibration stickers), a rim, a speckled print texture and a sheen, painted
    into `image` (a view around the disc, in place); returns the map of the pixels covered."""
    aspect = rng.uniform(*ASPECT)
    axes = (r * aspect, r / aspect)
    angle = float(rng.uniform(0, 180))
    h, w = image.shape[:2]
    layer = np.zeros((h, w, 3), np.float32)
    cover = np.zeros((h, w), np.uint8)
    outer = COLOURS[int(rng.integers(len(COLOURS)))] * rng.uniform(0.85, 1.08)
    _ellipse(layer, cx, cy, axes, angle, outer)
    _ellipse(cover, cx, cy, axes, angle, 255)
    if rng.random() < 0.5:  # a disc of another colour inside (orange ring, yellow centre)
        inner = COLOURS[int(rng.integers(len(COLOURS)))] * rng.uniform(0.85, 1.08)
        k = rng.uniform(0.35, 0.7)
        _ellipse(layer, cx, cy, (axes[0] * k, axes[1] * k), angle, inner)
    if rng.random() < 0.4:  # a darker rim
        rim = outer * rng.uniform(0.6, 0.8)
        _ellipse(layer, cx, cy, axes, angle, rim, max(1, round(r * rng.uniform(0.03, 0.08))))
    inside = cover > 0
    if rng.random() < 0.6:  # the printed speckle of many stickers
        grain = rng.normal(1.0, rng.uniform(0.05, 0.18), (h, w, 1)).astype(np.float32)
        layer[inside] *= grain[inside]
    if rng.random() < 0.4:  # a sheen across the disc
        yy, xx = np.mgrid[0:h, 0:w]
        theta = np.radians(angle)
        shade = 1 + 0.12 * (((xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)) / r)
        layer[inside] *= shade[inside, None].astype(np.float32)
    image[inside] = np.clip(layer[inside], 0, 255).astype(np.uint8)
    return inside


def _ellipse(target: np.ndarray, cx: float, cy: float, axes: tuple[float, float], angle: float,
             colour: np.ndarray | int, thickness: int = -1) -> None:
    value = colour if isinstance(colour, int) else tuple(float(c) for c in colour)
    cv2.ellipse(target, _fixed(cx, cy), (_fixed_r(axes[0]), _fixed_r(axes[1])), angle, 0, 360,
                value, thickness, cv2.LINE_8, 4)


def _fixed(x: float, y: float) -> tuple[int, int]:
    """A point in OpenCV's 4-bit fixed point (shift 4): sub-pixel centres."""
    return round(x * 16), round(y * 16)


def _fixed_r(r: float) -> int:
    return max(16, round(r * 16))
