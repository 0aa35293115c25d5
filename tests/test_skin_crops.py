"""Skin crops (`data.skin_crop_prob`): a share of the training crops framed beside the lesion,
so the model also sees skin alone, with an empty mask; off, nothing else changes."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from lesionseg.config import Config, ConfigError, validate
from lesionseg.data.images import encode_jpeg, encode_png
from lesionseg.data.memory import train_cacheable
from lesionseg.data.shard_format import decode_sample, raw_mask
from lesionseg.data.transforms import (
    SKIN_CROP_MIN_SIDE,
    AugmentParams,
    draw_augmentation,
    generator_for,
    lesion_box,
    skin_crop,
    train_transform,
)
from lesionseg.train.streams import _augmented


def _small_lesion(h: int = 120, w: int = 160) -> tuple[Image.Image, Image.Image]:
    """A lesion in the lower right (rows 70-110, columns 100-150): skin above and left."""
    mask = np.zeros((h, w), np.uint8)
    mask[70:110, 100:150] = 255
    rgb = np.full((h, w, 3), (200, 150, 130), np.uint8)
    rgb[mask > 0] = (90, 50, 40)
    return Image.fromarray(rgb, "RGB"), Image.fromarray(mask, "L")


def test_lesion_box_bounds_the_lesion_and_is_none_for_an_empty_mask() -> None:
    _, mask = _small_lesion()
    assert lesion_box(np.asarray(mask) > 127) == (70, 100, 110, 150)
    assert lesion_box(np.zeros((8, 8), bool)) is None


def test_a_skin_crop_lies_beside_the_lesion_at_the_image_aspect() -> None:
    h, w, box = 120, 160, (70, 100, 110, 150)
    for i in range(50):
        top, left, ch, cw = skin_crop(h, w, box, generator_for(i))
        assert top >= 0 and top + ch <= h and left >= 0 and left + cw <= w
        outside = top + ch <= box[0] or top >= box[2] or left + cw <= box[1] or left >= box[3]
        assert outside, (top, left, ch, cw)
        assert ch >= SKIN_CROP_MIN_SIDE * h and cw >= SKIN_CROP_MIN_SIDE * w
        assert cw / ch == pytest.approx(w / h, rel=0.05)
    # a lesion filling the frame leaves no band wide enough
    assert skin_crop(h, w, (10, 10, 110, 150), generator_for(0)) is None


def test_skin_crops_give_empty_masks_and_off_draws_nothing_more() -> None:
    image, mask = _small_lesion()
    base = AugmentParams(size=48, scale_min=0.5, rotate_degrees=0, color_jitter=0.1)
    skin = replace(base, skin_crop_prob=0.5)
    box = lesion_box(np.asarray(mask) > 127)
    moved = 0
    for i in range(40):
        a = draw_augmentation(120, 160, base, generator_for(i), box)
        assert a == draw_augmentation(120, 160, base, generator_for(i))  # off: box unused
        s = draw_augmentation(120, 160, skin, generator_for(i), box)
        assert replace(s, crop=a.crop) == a  # only the frame moves
        _, m = train_transform(image, mask, skin, generator_for(i))
        if s.crop != a.crop:
            moved += 1
            assert int(m.sum()) == 0  # skin alone: an empty mask
    assert 10 <= moved <= 30  # about half of 40
    # no lesion to step beside (an empty mask): every crop stays where it was drawn
    for i in range(40):
        assert draw_augmentation(120, 160, skin, generator_for(i), None).crop == \
            draw_augmentation(120, 160, base, generator_for(i)).crop


def test_streamed_training_reads_the_mask_before_the_draw() -> None:
    """The streamed path draws from the stored size and decodes afterwards; with skin crops
    it reads the mask first, so its frames are those of the decoded pair's `train_transform`."""
    image, mask = _small_lesion()
    raw = {"__key__": "x", "jpg": encode_jpeg(image, 95), "png": encode_png(mask),
           "json": b'{"id": "x"}'}
    params = AugmentParams(size=48, scale_min=0.5, rotate_degrees=0, color_jitter=0.1,
                           skin_crop_prob=0.5)
    sample = decode_sample(raw)
    empty = 0
    for i in range(20):
        _, x, m = _augmented(raw, params, generator_for(i))
        rx, rm = train_transform(sample.image, sample.mask, params, generator_for(i))
        assert torch.equal(m, rm)  # the same frame; the image may be JPEG-drafted smaller
        assert (x.float() - rx.float()).abs().mean() < 3
        empty += int(m.sum()) == 0
    assert empty >= 3


def test_skin_crops_stream_and_are_validated() -> None:
    assert train_cacheable(AugmentParams(size=32, scale_min=1.0, rotate_degrees=0))
    assert not train_cacheable(AugmentParams(size=32, scale_min=1.0, rotate_degrees=0,
                                             skin_crop_prob=0.2))
    cfg = Config()
    cfg.data.skin_crop_prob = 1.0
    with pytest.raises(ConfigError, match="data.skin_crop_prob"):
        validate(cfg)


def test_raw_mask_reads_the_stored_mask_alone() -> None:
    _, mask = _small_lesion()
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    got = raw_mask({"__key__": "x", "png": buf.getvalue()})
    assert got.mode == "L" and np.array_equal(np.asarray(got), np.asarray(mask))
