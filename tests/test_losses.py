"""SegmentationLoss against an independent float64 reference, under autocast, on edge masks."""

from __future__ import annotations

import math

import pytest
import torch

from lesionseg.losses import SegmentationLoss


def _reference(logits, target, bce_w, dice_w, iou_w, smooth, per_image, pos_weight):
    """Loop-over-pixels reference in Python floats (float64), written from the formulas."""
    x = logits.double().flatten(1).tolist()
    t = target.double().flatten(1).tolist()
    pw = 1.0 if pos_weight is None else pos_weight
    bce_terms = []
    for xs, ts in zip(x, t, strict=True):
        for xi, ti in zip(xs, ts, strict=True):
            p = 1 / (1 + math.exp(-xi))
            bce_terms.append(-(pw * ti * math.log(p) + (1 - ti) * math.log(1 - p)))
    bce = sum(bce_terms) / len(bce_terms)
    groups = list(zip(x, t, strict=True)) if per_image else [(sum(x, []), sum(t, []))]
    dices, ious = [], []
    for xs, ts in groups:
        ps = [1 / (1 + math.exp(-v)) for v in xs]
        inter = sum(p * ti for p, ti in zip(ps, ts, strict=True))
        sp, st = sum(ps), sum(ts)
        dices.append((2 * inter + smooth) / (sp + st + smooth))
        ious.append((inter + smooth) / (sp + st - inter + smooth))
    dice, iou = sum(dices) / len(dices), sum(ious) / len(ious)
    total = bce_w * bce + dice_w * (1 - dice) + iou_w * (1 - iou)
    return total, bce, 1 - dice, 1 - iou


@pytest.mark.parametrize("weights", [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0.5, 2, 0.25)])
@pytest.mark.parametrize("smooth,per_image,pos_weight",
                         [(1.0, True, None), (0.0, True, None), (1.0, False, 3.0),
                          (0.5, False, None)])
def test_matches_reference(weights, smooth, per_image, pos_weight):
    gen = torch.Generator().manual_seed(hash((weights, smooth, per_image)) % 2**31)
    logits = torch.randn(3, 1, 7, 9, generator=gen) * 3
    target = (torch.rand(3, 1, 7, 9, generator=gen) > 0.6).float()
    loss = SegmentationLoss(*weights, smooth=smooth, per_image=per_image, pos_weight=pos_weight)
    total, parts = loss(logits, target)
    ref_total, ref_bce, ref_dice, ref_iou = _reference(logits, target, *weights, smooth,
                                                       per_image, pos_weight)
    assert total.dtype == torch.float32 and total.ndim == 0
    assert total.item() == pytest.approx(ref_total, rel=1e-5, abs=1e-6)
    assert parts["bce"].item() == pytest.approx(ref_bce, rel=1e-5, abs=1e-6)
    assert parts["dice"].item() == pytest.approx(ref_dice, rel=1e-5, abs=1e-6)
    assert parts["iou"].item() == pytest.approx(ref_iou, rel=1e-5, abs=1e-6)


def test_per_image_differs_from_whole_batch():
    """Two images of very different lesion sizes: the mean of Dice ≠ the pooled Dice."""
    logits = torch.full((2, 1, 8, 8), -4.0)
    target = torch.zeros(2, 1, 8, 8)
    target[0, :, :1, :1] = 1
    target[1, :, :, :6] = 1
    logits[1, :, :, :6] = 4.0
    per_image = SegmentationLoss(per_image=True)(logits, target)[1]["dice"]
    pooled = SegmentationLoss(per_image=False)(logits, target)[1]["dice"]
    assert per_image.item() > pooled.item() + 0.1


def test_fp32_under_bf16_autocast_and_with_bf16_logits():
    logits = torch.randn(2, 1, 16, 16, requires_grad=True)
    target = (torch.rand(2, 1, 16, 16) > 0.5).float()
    loss = SegmentationLoss(pos_weight=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = logits.to(torch.bfloat16)
        total, parts = loss(half, target)
    assert total.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in parts.values())
    ref = loss(half.detach().float(), target)[0]  # same bf16 values, plain fp32 path
    assert total.item() == pytest.approx(ref.item(), rel=1e-6)
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("fill", [0.0, 1.0])
@pytest.mark.parametrize("smooth", [0.0, 1.0])
@pytest.mark.parametrize("logit", [-60.0, 0.0, 60.0])
def test_finite_on_empty_and_full_masks(fill, smooth, logit):
    logits = torch.full((2, 1, 8, 8), logit, requires_grad=True)
    target = torch.full((2, 1, 8, 8), fill)
    for per_image in (True, False):
        logits.grad = None
        total, parts = SegmentationLoss(smooth=smooth, per_image=per_image)(logits, target)
        total.backward()
        assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())
        assert torch.isfinite(logits.grad).all()


def test_perfect_prediction_costs_almost_nothing():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    logits = (target * 2 - 1) * 30
    total, parts = SegmentationLoss()(logits, target)
    assert total.item() < 1e-6 and parts["dice"].item() < 1e-6


def test_components_are_detached_and_bool_targets_work():
    logits = torch.randn(1, 1, 8, 8, requires_grad=True)
    target = torch.rand(1, 1, 8, 8) > 0.5
    total, parts = SegmentationLoss()(logits, target)
    assert total.requires_grad and not any(v.requires_grad for v in parts.values())
    assert total.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="same shape"):
        SegmentationLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="pos_weight"):
        SegmentationLoss(pos_weight=0)
    with pytest.raises(ValueError, match=">= 0"):
        SegmentationLoss(dice_weight=-1)
