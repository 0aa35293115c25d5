"""The per-image outputs of inference: what to write (`OutputSpec`), the full-size mask from a
probability map (`full_size_mask`, shared with lesionseg.api), and the previews: overlay
JPEGs and report thumbnails with the prediction's and the truth's outlines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lesionseg.data.cv import cv2
from lesionseg.data.images import encode_jpeg
from lesionseg.files import atomic_write_bytes
from lesionseg.infer.journal import OVERLAYS, THUMBS
from lesionseg.postprocess import Postprocess
from lesionseg.quality import QualityModel

THUMB_SIDE = 256  # longest side of the report's thumbnails


@dataclass(frozen=True)
class OutputSpec:
    """What to write for each image, and where."""

    out: Path
    post: Postprocess  # threshold, steps and empty-mask fallback (lesionseg.postprocess)
    save_probs: bool
    save_overlays: bool
    thumbs: bool
    quality: QualityModel = QualityModel()  # uncertainty, expected Dice, review flag
    temperature: float = 1.0  # applied to the written probability maps (lesionseg.quality)


def full_size_mask(prob: torch.Tensor, size: tuple[int, int],
                   post: Postprocess) -> tuple[np.ndarray, np.ndarray, bool]:
    """(probability map upsampled to size = (h, w), float32; mask uint8 0/255; whether the
    mask is the empty-mask fallback's): bilinear, "probability > threshold", then the
    post-processing steps, then the fallback of an empty mask (`Postprocess.unless_empty`).
    The job and `lesionseg.api` both turn predictions into masks here."""
    h, w = size
    p = np.ascontiguousarray(prob.detach().float().cpu().numpy())
    full = cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR)  # float32, h x w
    pred = above_threshold(full, post.threshold)  # uint8: 255 where prob > t
    if post.steps:
        pred = post.apply(pred, full)
    return full, *post.unless_empty(pred, full)


def above_threshold(full: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 255 where `full` > threshold (float32 compare), else 0. cv2.compare reads a 1×1
    array as a scalar and refuses "scalar op scalar", so a one-pixel image is done by numpy."""
    if full.size == 1:
        return np.where(full > np.float32(threshold), 255, 0).astype(np.uint8)
    return cv2.compare(full, float(threshold), cv2.CMP_GT)


def write_previews(image_id: str, preview: np.ndarray, pred: np.ndarray,
                   truth: np.ndarray | None, spec: OutputSpec) -> None:
    """Overlay JPEG (outlines: prediction blue, truth yellow) and/or report thumbnail."""
    overlay = render_overlay(preview, pred, truth)
    if spec.save_overlays:
        atomic_write_bytes(spec.out / OVERLAYS / f"{image_id}_overlay.jpg", encode_jpeg(overlay, 90))
    if spec.thumbs:
        overlay.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.BILINEAR)
        atomic_write_bytes(spec.out / THUMBS / f"{image_id}.jpg", encode_jpeg(overlay, 80))


def _mask_at(mask: np.ndarray | torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """A full-size mask (nonzero = lesion) as a 0/255 L image at (width, height) = size, by
    nearest neighbour (pixel centres, as PIL's NEAREST). Only the output pixels are touched."""
    arr = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if arr.dtype != np.uint8:
        arr = arr.astype(np.uint8)
    small = cv2.resize(arr, size, interpolation=cv2.INTER_NEAREST_EXACT)
    return Image.fromarray(above_threshold(small, 0), mode="L")


def render_overlay(preview: np.ndarray, pred: np.ndarray | torch.Tensor,
                   truth: np.ndarray | torch.Tensor | None) -> Image.Image:
    """The image with the predicted lesion's outline in blue and the truth's in yellow:
    outlines, not fills, so the lesion itself stays visible under both (blue/yellow also
    reads for red-green colour-blind eyes). The prediction is drawn last, on top.

    Whole-array arithmetic and cv2.erode: boolean fancy indexing of the RGB pixels and PIL's
    sort-based MinFilter cost ~3 ms each on a 256-pixel preview."""
    size = (preview.shape[1], preview.shape[0])
    width = max(2, max(size) // 128)  # 2 px on a 256-px thumbnail, also after shrinking
    out = np.array(preview, dtype=np.uint8, copy=True)
    for mask, colour in ((truth, TRUTH_RGB), (pred, PRED_RGB)):
        if mask is not None:
            out[_outline(np.asarray(_mask_at(mask, size)), width) > 0] = colour
    return Image.fromarray(out, mode="RGB")


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The inner band of `width` pixels of a 0/255 mask: the mask minus its erosion (outside
    the image counts as the nearest pixel, so the image border is not an outline)."""
    return mask ^ cv2.erode(mask, _KERNEL_3X3, iterations=width, borderType=cv2.BORDER_REPLICATE)


PRED_RGB = (30, 144, 255)  # prediction outline: blue
TRUTH_RGB = (255, 215, 0)  # truth outline: yellow
_KERNEL_3X3 = np.ones((3, 3), np.uint8)
