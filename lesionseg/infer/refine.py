"""The lesion-centred second pass of inference (`infer.refine`): after the whole image, a
square crop round the lesion the first pass found is segmented again at the model's size, and
its probabilities replace the first pass's inside the crop.

Why: on the real ISIC 2016 test set the worst masks were small lesions beside the round
calibration stickers at the frame's edge, and lesions whose outline the model drew coarsely.
The crop leaves the sticker and the dark dermoscope corners out and shows the lesion a little
larger, as the training crops did. The zoom never exceeds the training crops' own largest
zoom (1/√`data.scale_min`: the random-resized crops keep at least that share of the image's
area), because a model that never saw a lesion larger than that draws only its darkest core
(measured on val: at 3× zoom a faint lesion lost 40 points of Dice). A checkpoint trained
without zoom (`data.scale_min` 1.0, the light augmentation level) gets no second pass.

The box comes from the first pass's main region at probability 0.5 (`postprocess.
main_component`, whatever threshold the run applies, so that tuning the threshold on val and
the second pass do not depend on each other), grown by `REFINE_MARGIN` of its side on every
side, made square, at least S / max_zoom pixels, shifted inside the frame. A mask that is
empty, or whose box would not be smaller than the frame, keeps its first pass. Every member's
view (flips, fold models) is replaced in the same box by the crop's view, so the quality
signals (`lesionseg.quality`) read the views of the final probabilities.

The crop is cut from a finer copy of the image when the image is larger than the model's
input (`fine_copy`: the whole image at up to ⌈S × max_zoom⌉ pixels a side, made beside the
S×S input by the decode workers, the Python API and the val passes), so that a crop zoomed
up to the cap shows the photograph's own detail, not the S×S input enlarged. The crop is
resampled as a training crop is (`lesionseg.data.transforms`: area reduction, then bilinear),
so the second pass sees what a training crop of that region of the image would have been.
An image no larger than S (the 128² ISIC pairs) has no finer copy: its crop is cut from the
S×S input, which then holds every pixel of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lesionseg.data.transforms import crop_sample, eval_transform
from lesionseg.postprocess import DEFAULT_THRESHOLD, main_component

# Context kept round the lesion's bounding box, as a share of its longer side, on each side.
# Chosen on the val images of 12 real-data models (margins 0.1 and 0.25 were tied there).
REFINE_MARGIN = 0.25

Box = tuple[int, int, int]  # (top, left, side) in the S×S model frame
PredictFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# Per image of a batch, its finer copy (`fine_copy`, C×F×F uint8) or None; None for none at all.
FineCopies = Sequence[torch.Tensor | None] | None


@dataclass(frozen=True)
class Refine:
    """How far the second pass may zoom (> 1), and the margin round the box."""

    max_zoom: float
    margin: float = REFINE_MARGIN

    def describe(self) -> str:
        return f"lesion-centred second pass (zoom up to {self.max_zoom:.2f}x, margin {self.margin:g})"

    def fine_side(self, size: int) -> int:
        """The side of the finer copy a crop at the largest zoom needs at the model's size S:
        ⌈S × max_zoom⌉ (the crop then holds about S of its pixels a side)."""
        return math.ceil(size * self.max_zoom)


def max_zoom_for(scale_min: float | None, setting: float) -> float:
    """The zoom cap: `infer.refine_max_zoom` when set (> 0), else the training crops' largest
    zoom, 1/√data.scale_min (1 = none: a checkpoint trained on whole images)."""
    if setting > 0:
        return float(setting)
    if not scale_min or scale_min >= 1:
        return 1.0
    return 1.0 / math.sqrt(scale_min)


def refine_for(enabled: bool, scale_min: float | None, setting: float) -> Refine | None:
    """The second pass a run applies, or None (off, or a model trained without zoom)."""
    zoom = max_zoom_for(scale_min, setting)
    return Refine(zoom) if enabled and zoom > 1.0 else None


def lesion_box(prob: np.ndarray, refine: Refine) -> Box | None:
    """The square crop round the main region of `prob > 0.5` (S×S), or None when the mask is
    empty or the crop would not be smaller than the frame."""
    size = prob.shape[-1]
    p = np.asarray(prob, dtype=np.float32)
    mask = main_component(np.where(p > DEFAULT_THRESHOLD, np.uint8(255), np.uint8(0)), p,
                          DEFAULT_THRESHOLD)
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    side = round(max(y1 - y0, x1 - x0) * (1 + 2 * refine.margin))
    side = max(side, math.ceil(size / refine.max_zoom))
    if side >= size:
        return None
    top = min(max((y0 + y1) // 2 - side // 2, 0), size - side)
    left = min(max((x0 + x1) // 2 - side // 2, 0), size - side)
    return top, left, side


def fine_copy(image: Image.Image, size: int, refine: Refine | None) -> torch.Tensor | None:
    """The finer copy of an RGB image the second pass crops from: the whole image squashed as
    `eval_transform` squashes it, at `refine.fine_side(size)` a side or the image's own longer
    side if smaller; None without a second pass or for an image no larger than `size` (its
    S×S input already holds every pixel)."""
    if refine is None:
        return None
    side = min(refine.fine_side(size), max(image.size))
    return eval_transform(image, None, side)[0] if side > size else None


def decode_side(size: int, refine: Refine | None) -> int:
    """The side a reduced-scale (draft) decode must keep for the model's size S: the finer
    copy's with a second pass, else S."""
    return refine.fine_side(size) if refine else size


def model_inputs(image: Image.Image, size: int,
                 refine: Refine | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What inference forwards for an RGB image, made alike by the decode workers, the Python
    API and the val passes: the uint8 3×S×S input (`eval_transform`) and its finer copy
    (`fine_copy`, or None)."""
    return eval_transform(image, None, size)[0], fine_copy(image, size, refine)


def crop_resized(image: torch.Tensor, box: Box, size: int,
                 source: torch.Tensor | None = None) -> torch.Tensor:
    """The box (in the C×S×S image's frame) as a C×size×size crop in the image's dtype (a
    uint8 batch stays uint8, rounded, as the decode workers make it). From the S×S image
    itself, bilinear; from a finer copy of the whole image (`source`, C×F×F uint8, F > S), the
    same region resampled as a training crop is (`crop_sample`)."""
    top, left, side = box
    if source is not None:
        scale = source.shape[-1] / image.shape[-1]
        return crop_sample(source, (top * scale, left * scale, side * scale), size)
    crop = image[:, top:top + side, left:left + side].float()[None]
    out = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
    if image.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(image.dtype)


def predict_refined(predict_once: PredictFn, images: torch.Tensor, refine: Refine | None,
                    fine: FineCopies = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, views) of `predict_once` on the batch, then, with `refine`, after the
    second pass (a Predictor's and an Ensemble's `predict`); `fine`: the images' finer copies
    (`fine_copy`), None where an image has none."""
    probs, views = predict_once(images)
    if refine is None:
        return probs, views
    return second_pass(predict_once, images, probs, views, refine, fine)


def second_pass(predict_once: PredictFn, images: torch.Tensor, probs: torch.Tensor,
                views: torch.Tensor, refine: Refine, fine: FineCopies = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities N×S×S, views N×V×S×S) after the second pass: the images with a box are
    forwarded again, cropped (one batch; from the finer copy where `fine` has one), and their
    maps pasted back into the box."""
    if fine is not None and len(fine) != len(images):
        raise ValueError(f"{len(fine)} finer copies for a batch of {len(images)} images")
    boxes = [lesion_box(p.numpy(), refine) for p in probs]
    todo = [k for k, box in enumerate(boxes) if box is not None]
    if not todo:
        return probs, views
    size = images.shape[-1]
    crops = torch.stack([crop_resized(images[k].cpu(), boxes[k], size,
                                      fine[k] if fine is not None else None) for k in todo])
    crop_probs, crop_views = predict_once(crops)
    probs, views = probs.clone(), views.clone()
    for j, k in enumerate(todo):
        top, left, side = boxes[k]
        both = torch.cat([crop_probs[j][None], crop_views[j]])[None].float()
        back = F.interpolate(both, size=(side, side), mode="bilinear", align_corners=False)[0]
        probs[k, top:top + side, left:left + side] = back[0]
        views[k, :, top:top + side, left:left + side] = back[1:]
    return probs, views
