"""Mask post-processing and the validation search that decides it (threshold, components, holes).

A lesion is one connected region without holes, as a dermatologist outlines it. Two steps can
turn a probability map into such a mask: keep only the main region (drops freckles, satellite
spots, ink marks and calibration stickers the network half-believed), and fill holes (hair and
bubbles over the lesion that the network carved out).

The main region is the one the model believes in most: the connected region with the largest
probability mass above the threshold, sum(p - threshold) over its pixels, not the largest by
area. A big blob the model half-believes (p just above the threshold: skin, a sticker, a
vignette) loses to a smaller lesion it is sure of; by area alone it would erase the lesion.

Neither step is always right (two lesions in one image; a ring-shaped lesion), so, as nnU-Net
decides its own post-processing, each is kept only when it improves the validation score, and
only when that score rests on enough images: `choose` scores every threshold of a small grid
with every combination and keeps the simplest best, never one that turns a val mask that
overlaps its lesion into one that does not.

The chosen `Postprocess` is stored in best.pt (`meta["postprocess"]`) and applied by the
inference job unless `--threshold` or `--postprocess` says otherwise.

A mask left empty (no pixel above the threshold) is, by default, not written empty: every
dermoscopic image shows a lesion, and a model that saw it but doubted it still put its highest
probabilities there. `Postprocess.fallback` (the inference's `infer.empty_fallback`, 0.5) keeps
instead the main region of the pixels above that share of the image's highest probability
(`fallback_region`). On the 289 real ISIC 2016 test images one mask of ten models' was
empty (ISIC_0003056, a faint lesion beside a green sticker, highest probability 0.47); the
fallback gave it Dice 0.65. Such an image's spread is large (its predicted area is empty), so
it is also flagged for review. 0 leaves empty masks empty (images that may show no lesion).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lesionseg.data.cv import cv2
from lesionseg.errors import UserError
from lesionseg.metrics import binary_counts, summarize

STEPS = ("main", "fill")  # in the order they are applied
CHOICES = ("none", "main", "fill", "main+fill")
# Stored choices of lesionseg <= 0.2 named the component step "largest" (by area); they load
# as "main", the rule that replaced it.
OLD_STEP_NAMES = {"largest": "main"}
DEFAULT_THRESHOLD = 0.5
# Thresholds the validation search tries (a coarse grid: a fine one fits the noise of ~100
# validation images rather than the model).
THRESHOLD_GRID = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
# A choice other than (0.5, none) must beat it by this much mean Jaccard to be taken.
MIN_GAIN = 0.002
# Below this many val images (or pooled out-of-fold images) nothing is chosen: the threshold
# and steps stay at the defaults (a choice on 6-70 images fits their noise: the ablation found
# the threshold worth 0 +/- 0.5 points). train.tune_min_images overrides it.
MIN_IMAGES = 100
# What is stored when there are too few images to choose on: threshold 0.5 and the main region.
# On the 289 real ISIC 2016 test images, two models trained by the defaults (128², 30 epochs):
# 'main' raised the mean Dice by 0.2 points each and the worst tenth's mean by 1.2-1.3 points;
# 'fill' changed neither by more than 0.01 points.
UNTUNED_STEPS = ("main",)
# metrics.csv's reason when no pixel passed the threshold and the fallback drew the mask (such
# a mask is always flagged needs_review, lesionseg.quality).
FALLBACK_NOTE = "empty at the threshold: the mask is the most confident region (infer.empty_fallback)"


@dataclass(frozen=True)
class Postprocess:
    """What turns a probability map into the final mask: probability > threshold, then the
    steps named in `steps` ('main', 'fill'), in STEPS order."""

    threshold: float = DEFAULT_THRESHOLD
    steps: tuple[str, ...] = ()
    # > 0: an empty mask becomes the main region above this share of the highest probability
    # (an inference setting, infer.empty_fallback; not stored with the validation's choice).
    fallback: float = 0.0

    @property
    def name(self) -> str:
        """'none', 'main', 'fill' or 'main+fill'."""
        return "+".join(self.steps) or "none"

    @classmethod
    def parse(cls, name: str, threshold: float = DEFAULT_THRESHOLD) -> Postprocess:
        """From a name in CHOICES; anything else is a UserError listing them."""
        if name not in CHOICES:
            raise UserError(f"post-processing {name!r}: choose one of {', '.join(CHOICES)}")
        return cls(threshold, tuple(s for s in STEPS if s in name.split("+")))

    def to_dict(self) -> dict[str, object]:
        return {"threshold": self.threshold, "steps": list(self.steps), "name": self.name}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Postprocess:
        steps = tuple(OLD_STEP_NAMES.get(str(s), str(s))
                      for s in data.get("steps", ()))  # type: ignore[union-attr]
        if any(s not in STEPS for s in steps):
            raise UserError(f"unknown post-processing steps {list(steps)} (known: {list(STEPS)})")
        return cls(float(data.get("threshold", DEFAULT_THRESHOLD)), steps)  # type: ignore[arg-type]

    @classmethod
    def from_meta(cls, meta: dict[str, object]) -> Postprocess | None:
        """The choice stored in a checkpoint's metadata (`meta["postprocess"]`), if any."""
        stored = meta.get("postprocess")
        return cls.from_dict(stored) if isinstance(stored, dict) else None

    def apply(self, mask: np.ndarray, prob: np.ndarray | None = None) -> np.ndarray:
        """The steps on a thresholded uint8 mask (0 / non-zero) → uint8 0/255; 'main' needs
        the probability map the mask was thresholded from (same shape, float)."""
        out = np.where(mask > 0, np.uint8(255), np.uint8(0))
        if "main" in self.steps:
            if prob is None:
                raise ValueError("the 'main' step needs the probability map")
            out = main_component(out, prob, self.threshold)
        if "fill" in self.steps:
            out = fill_holes(out)
        return out

    def mask(self, prob: np.ndarray) -> np.ndarray:
        """A float probability map → its uint8 0/255 mask: probability > threshold (compared
        in float32), then the steps, then the fallback if the mask is empty."""
        p = np.asarray(prob, dtype=np.float32)
        raw = np.where(p > np.float32(self.threshold), np.uint8(255), np.uint8(0))
        out = self.apply(raw, p) if self.steps else raw
        return self.unless_empty(out, p)[0]

    def falls_back(self, area: int) -> bool:
        """Whether the fallback replaces a mask of `area` pixels: on, and the mask empty."""
        return self.fallback > 0 and area == 0

    def unless_empty(self, mask: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, bool]:
        """(`mask` (uint8 0/255), or with the fallback on and `mask` empty,
        `fallback_region(prob)`; whether it fell back)."""
        if self.falls_back(cv2.countNonZero(mask)):
            return fallback_region(prob, self.fallback), True
        return mask, False


def fallback_region(prob: np.ndarray, share: float) -> np.ndarray:
    """uint8 0/255: the main region (`main_component`) of the pixels whose probability is
    above `share` × the map's highest (empty for a map that is 0 everywhere)."""
    p = np.asarray(prob, dtype=np.float32)
    top = float(p.max()) if p.size else 0.0
    if top <= 0:
        return np.zeros(p.shape, np.uint8)
    level = np.float32(share * top)
    mask = np.where(p > level, np.uint8(255), np.uint8(0))
    return main_component(mask, p, float(level))


def main_component(mask: np.ndarray, prob: np.ndarray, threshold: float) -> np.ndarray:
    """Keep the 8-connected foreground region of a 0/255 uint8 mask with the largest
    probability mass above the threshold, sum(prob - threshold) over its pixels (an empty
    mask stays empty; ties go to the lower label)."""
    n, labels = cv2.connectedComponents(mask, connectivity=8)
    if n <= 2:  # background only, or one region
        return mask
    margin = np.asarray(prob, dtype=np.float32) - np.float32(threshold)
    mass = np.bincount(labels.ravel(), weights=np.where(mask > 0, margin, 0).ravel(),
                       minlength=n)
    keep = 1 + int(np.argmax(mass[1:]))
    return np.where(labels == keep, np.uint8(255), np.uint8(0))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 8-connected foreground region of a 0/255 uint8 mask (an empty mask
    stays empty). Geometry only (the synthetic renderer's shapes); predictions use
    `main_component`."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 2:  # background only, or one region
        return mask
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return np.where(labels == biggest, np.uint8(255), np.uint8(0))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill every background region of a 0/255 uint8 mask that does not touch the image border
    (4-connected background, so a diagonal gap in the outline does not leak)."""
    h, w = mask.shape
    background = (mask == 0).view(np.uint8)
    n, labels = cv2.connectedComponents(background, connectivity=4)
    if n <= 2:
        return mask
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    holes = (labels > 0) & ~np.isin(labels, edge)
    out = mask.copy()
    out[holes] = 255
    return out


def choose(probs: Sequence[np.ndarray], truths: Sequence[np.ndarray],
           thresholds: Sequence[float] = THRESHOLD_GRID) -> tuple[Postprocess, list[dict]]:
    """The threshold and steps with the best mean Jaccard over (probability map, truth) pairs.

    Every threshold × every choice is scored; a candidate replaces the default (0.5, none)
    only if it gains at least MIN_GAIN, and among near-equal candidates (within MIN_GAIN of
    the best) the one with fewer steps and the threshold nearest 0.5 wins. A candidate whose
    steps turn any image's mask that overlaps the truth into one that does not is never
    chosen (its row says `erases`: how many images it did that to). Returns the choice and the
    table of every candidate's mean Jaccard (sorted best first).
    """
    if not probs or len(probs) != len(truths):
        raise ValueError("choose needs as many probability maps as truths, at least one")
    table = []
    truth8 = [(np.asarray(gt) > 0).view(np.uint8) for gt in truths]
    probs32 = [np.asarray(p, dtype=np.float32) for p in probs]
    for t in thresholds:
        masks = [np.where(p > np.float32(t), np.uint8(255), np.uint8(0)) for p in probs32]
        raw = [binary_counts(m, gt) for m, gt in zip(masks, truth8, strict=True)]
        for name in CHOICES:
            pp = Postprocess.parse(name, float(t))
            counts = raw if not pp.steps else [
                binary_counts(pp.apply(m, p), gt)
                for m, p, gt in zip(masks, probs32, truth8, strict=True)]
            erases = sum(1 for before, after in zip(raw, counts, strict=True)
                         if before[0] > 0 and after[0] == 0)
            score = summarize(torch.tensor(counts, dtype=torch.long))["jaccard"]
            table.append({"threshold": float(t), "postprocess": name, "jaccard": score,
                          "erases": erases})
    baseline = next((r["jaccard"] for r in table
                     if r["threshold"] == DEFAULT_THRESHOLD and r["postprocess"] == "none"), None)
    allowed = [r for r in table if r["erases"] == 0]
    best = max(r["jaccard"] for r in allowed)
    if baseline is not None and best < baseline + MIN_GAIN:
        chosen = Postprocess()
    else:
        near = [r for r in allowed if r["jaccard"] >= best - MIN_GAIN / 2]
        pick = min(near, key=lambda r: (len(Postprocess.parse(r["postprocess"]).steps),
                                        abs(r["threshold"] - DEFAULT_THRESHOLD), -r["jaccard"]))
        chosen = Postprocess.parse(pick["postprocess"], pick["threshold"])
    table.sort(key=lambda r: -r["jaccard"])
    return chosen, table
