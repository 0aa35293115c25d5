"""Calibration stickers: drawn near an edge, away from the lesion, the mask cleared under them;
the same sticker on the streamed and the in-memory augmentation paths."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from lesionseg.data.stickers import MAX_LESION_COVER, draw_sticker
from lesionseg.data.transforms import (
    AugmentParams,
    apply_augmentation,
    draw_augmentation,
    eval_transform,
    flip_and_colour,
    generator_for,
)


def _skin_with_lesion(h: int = 96, w: int = 128) -> tuple[np.ndarray, np.ndarray]:
    image = np.full((h, w, 3), (220, 180, 160), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    mask = (((yy - h / 2) ** 2 + (xx - w / 2) ** 2) <= (h / 4) ** 2).astype(np.uint8) * 255
    image[mask > 0] = (90, 60, 40)
    return image, mask


def test_a_sticker_is_painted_at_an_edge_off_the_lesion_and_clears_the_mask() -> None:
    for seed in range(20):
        image, mask = _skin_with_lesion()
        before_img, before_mask = image.copy(), mask.copy()
        assert draw_sticker(image, mask, np.random.default_rng(seed))
        changed = np.any(image != before_img, axis=-1)
        assert changed.any()
        ys, xs = np.nonzero(changed)
        h, w = mask.shape
        # Near an edge: some painted pixel lies in the outer fifth of the image.
        assert (min(ys.min(), xs.min()) < h / 5 or ys.max() > h - h / 5
                or xs.max() > w - w / 5)
        # The mask only loses pixels (under the sticker), and few of the lesion's.
        assert not np.any((mask > 0) & (before_mask == 0))
        lost = np.count_nonzero((before_mask > 0) & (mask == 0))
        assert lost <= MAX_LESION_COVER * changed.sum() + 4 * changed.sum() ** 0.5


def test_no_sticker_where_the_lesion_fills_the_image() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    mask = np.full((64, 64), 255, np.uint8)
    assert not draw_sticker(image, mask, np.random.default_rng(0))
    assert not image.any() and mask.all()


def test_augmentation_paints_the_same_sticker_streamed_and_in_memory() -> None:
    """With every crop stickered, the whole-image unrotated augmentation gives the same mask
    (and images within one grey level) whether applied to the source or to its eval resize."""
    image, mask = _skin_with_lesion(120, 160)
    pil, pil_mask = Image.fromarray(image), Image.fromarray(mask)
    params = AugmentParams(size=64, scale_min=1.0, rotate_degrees=0.0, color_jitter=0.1,
                           sticker_prob=1.0)
    x0, y0 = eval_transform(pil, pil_mask, 64)
    cached_x, cached_y = x0.clone(), y0.clone()
    for k in range(6):
        aug = draw_augmentation(120, 160, params, generator_for(3, k))
        assert aug.sticker_seed is not None
        xs, ys = apply_augmentation(pil, pil_mask, aug)
        xm, ym = flip_and_colour(x0, y0, aug)
        # The in-memory sample is never painted on (it was, when no flip made a copy).
        assert torch.equal(x0, cached_x) and torch.equal(y0, cached_y)
        assert torch.equal(ys, ym)
        assert (xs.int() - xm.int()).abs().max() <= 1
        assert ys.sum() < y0.sum() or not torch.equal(xs, eval_transform(pil, None, 64)[0])


def test_sticker_prob_zero_draws_nothing_more_from_the_generator() -> None:
    """Without stickers the augmentation stream is what it was: no extra draw from `g`."""
    params = AugmentParams(size=64, scale_min=0.5, rotate_degrees=10.0, color_jitter=0.1)
    g1, g2 = generator_for(1, 2), generator_for(1, 2)
    aug = draw_augmentation(100, 100, params, g1)
    assert aug.sticker_seed is None
    draw_augmentation(100, 100, AugmentParams(size=64, scale_min=0.5, rotate_degrees=10.0,
                                              color_jitter=0.1, sticker_prob=1.0), g2)
    assert float(torch.rand((), generator=g1)) != float(torch.rand((), generator=g2))
