"""How far to trust each mask: an uncertainty, an expected Dice and a needs-review flag per
image, and the calibration of the pixel probabilities.

- `signals`: per image, from the members the job already ran (the four flip views with TTA;
  every model × flip of an ensemble), at the model's size: the members' spread (the mean
  absolute deviation of their probabilities from their mean, summed over the pixels and
  divided by the predicted area, at least 1 % of the image), the mean pairwise Dice
  disagreement of their masks, the share of uncertain pixels (UNCERTAIN_BAND) relative to the
  predicted area, the mean pixel entropy, the predicted area. No extra forward pass.
- `uncertainty`: the members' spread weighted by the mask's border share,
  `border_spread` = spread × (1 + border): the spread is the soft form of the members'
  disagreement (the best simple failure detector of Zenk et al., 2025), which also counts
  members that agree on the mask but not on how sure they are; the border share (the share of
  the image's edge pixels inside the mask) raises it for masks that run off the frame, where
  confident failures are (a whole skin field taken for lesion, a lesion cut by the frame). On
  the 289 real ISIC 2016 test images the spread's AUROC for Dice < 0.8 was higher than the
  pairwise Dice disagreement's for four models of five, and the border weighting raised it
  on 17 of 20 models (and on 19 of 22 with two re-runs; 0.909 → 0.919 on average) trained
  after the weighting was chosen (docs/DESIGN.md, "Quality control"). With one member
  (--no-tta) the uncertain-pixel share of its map. An ensemble is rated model by model: each
  model's own uncertainty from its own views (`model_uncertainties`), and the means of the
  models' uncertainties, of the expected Dice each model's own map gives, and of their cuts:
  each model's fit saw one model's flips, and its value is on that scale (over all of an
  ensemble's views together the spread is larger, since its models also disagree, and no
  fit saw it).
- `DiceModel`: expected Dice from one signal, a monotone (isotonic, decreasing) piecewise-
  linear map fitted at the end of training on the val images (lesionseg.quality_fit) and stored in
  best.pt (`meta["quality"]`); with fewer than MIN_FIT_IMAGES val images, or for a model
  without a fit of its signal, the fixed map FIXED_MAPS.
- `needs_review`: expected Dice below `infer.review_below`, or an uncertainty above all but
  the `infer.review_share` most uncertain of the val images (the map's `cuts`, quantiles of
  the val uncertainties), or a mask drawn by the empty-mask fallback (no pixel passed the
  threshold: the model found no lesion, and the mask is only its most confident region; the
  views may all agree on that, as on an image that is not dermoscopy at all). Why the first
  two: the expected Dice is a mean, and most uncertain images
  are still fine, so it stays above 0.8 for all but the most uncertain few; on five
  real-data models it flagged 2–5 % of the ISIC test images and caught 3–9 of 12–18 images
  below Dice 0.8, the val share (0.1) flagged 7–13 % and caught 8–13 (docs/DESIGN.md,
  "Quality control").
- Calibration: a temperature on the logit of the (TTA-averaged) probability, fitted on val by
  pixel log-loss, kept (`meta["calibration"]["applied"]`) when it lowers the val ECE; inference
  applies it to the probability maps it writes (--save-probs) and the API's probability; masks
  are unchanged (the threshold moves with the probabilities).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lesionseg.data.cv import cv2

UNCERTAIN_BAND = (0.3, 0.7)  # a pixel is uncertain when its probability lies in this band
MIN_FIT_IMAGES = 40  # fewer val images than this: the fixed map instead of a fit
FAILURE_DICE = 0.8  # the summary's failures: true Dice below this
MISSED_SHOWN = 20  # the summary names at most this many failures the flags missed, worst first
ECE_BINS = 15  # equal-width probability bins of the expected calibration error
TEMPERATURES = np.exp(np.linspace(math.log(0.25), math.log(4.0), 81))  # the search grid


# --------------------------------------------------------------------------- signals


def pairwise_disagreement(masks: np.ndarray) -> float:
    """Mean over member pairs of 1 - Dice of their masks (M×H×W booleans; two empty masks
    agree). 0 for identical members, up to 1 for disjoint ones."""
    m = masks.reshape(masks.shape[0], -1).astype(np.float32)
    areas = m.sum(1)
    inter = m @ m.T
    total = areas[:, None] + areas[None, :]
    dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
    i, j = np.triu_indices(len(m), 1)
    return float(np.mean(1.0 - dice[i, j])) if len(i) else 0.0


SPREAD_MIN_AREA = 0.01  # the spread's area is at least this share of the image (an empty mask)


def spread(views: np.ndarray, area: int) -> float:
    """The members' mean absolute deviation from their mean probability, summed over the
    pixels, per predicted-lesion pixel (the area counted as at least SPREAD_MIN_AREA of the
    image, so an empty mask gets a large but bounded value): 0 for identical members."""
    floor = SPREAD_MIN_AREA * views[0].size
    return float(np.abs(views - views.mean(0)).mean(0).sum() / max(area, floor, 1))


def _uncertainty_signals(v: np.ndarray, threshold: float) -> tuple[dict[str, Any], np.ndarray]:
    """The signals an uncertainty is made of (`members`, `spread`, `border_spread`,
    `uncertain_share`, `area`, `border`) of float32 views V×S×S, and the mask of their mean."""
    prob = v.mean(0)
    mask = (prob > threshold).astype(np.uint8)
    area = int(np.count_nonzero(mask))
    lo, hi = UNCERTAIN_BAND
    band = int(np.count_nonzero((prob > lo) & (prob < hi)))
    edge = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    border = float(edge.mean())
    members_spread = spread(v, area) if len(v) > 1 else None
    return {"members": len(v), "spread": members_spread,
            "border_spread": None if members_spread is None else members_spread * (1 + border),
            "uncertain_share": band / max(area, 1), "area": area / prob.size,
            "border": border}, mask


def signals(views: np.ndarray | torch.Tensor, threshold: float,
            models: int = 1) -> dict[str, Any]:
    """One image's signals from its members' probability maps (V×S×S; their mean is the
    image's probability map). `spread`, `border_spread` and `disagreement` are None with one
    member. `border` is the share of the image's edge pixels inside the mask. For an ensemble
    of `models` models (the views model by model, each model's flips together, as
    `Ensemble.predict` stacks them) also `model_uncertainties`: each model's own uncertainty
    from its own views, on the scale its quality fit saw."""
    v = views.numpy() if isinstance(views, torch.Tensor) else np.asarray(views)
    v = v.astype(np.float32, copy=False)
    sig, mask = _uncertainty_signals(v, threshold)
    p = np.clip(v.mean(0), 1e-6, 1 - 1e-6)
    sig |= {"disagreement": pairwise_disagreement(v > threshold) if len(v) > 1 else None,
            "entropy": float(np.mean(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))),
            "components": cv2.connectedComponents(mask, connectivity=8)[0] - 1}
    if models > 1 and len(v) % models == 0:
        per = len(v) // models
        sig |= {"models": models,
                "model_uncertainties": [
                    uncertainty(_uncertainty_signals(v[k * per:(k + 1) * per], threshold)[0])
                    for k in range(models)]}
    return sig


def uncertainty_feature(members: int) -> str:
    """The signal that is the image's uncertainty: the members' border-weighted spread, or
    with one member the uncertain-pixel share of its map."""
    return "border_spread" if members > 1 else "uncertain_share"


def uncertainty(sig: dict[str, Any]) -> float:
    return float(sig[uncertainty_feature(sig["members"])])


# --------------------------------------------------------------------------- expected Dice


@dataclass(frozen=True)
class DiceModel:
    """Expected Dice as a decreasing piecewise-linear function of one signal (knots xs → ys,
    flat beyond them)."""

    feature: str
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    source: str  # e.g. "isotonic fit on 71 val images" or "fixed map"
    # Quantiles of the signal on the val images the map was fitted on, at evenly spaced
    # probabilities from 0 to 1 (None: a map stored before they were; the fixed map's apply).
    cuts: tuple[float, ...] | None = None

    def __call__(self, sig: dict[str, Any]) -> float:
        return float(np.clip(np.interp(float(sig[self.feature]), self.xs, self.ys), 0.0, 1.0))

    def cut(self, share: float) -> float:
        """The signal above which the `share` most uncertain of the val images lie (inf for a
        share of 0)."""
        if share <= 0:
            return math.inf
        cuts = self.cuts if self.cuts is not None else FIXED_MAPS[self.feature].cuts
        return float(np.interp(1.0 - share, np.linspace(0.0, 1.0, len(cuts)), cuts))

    @property
    def cuts_from_fit(self) -> bool:
        """Whether `cut` reads a fit's own val quantiles: not for a map stored without them
        (the fixed map's apply), nor for a fixed map itself (which carries cuts of its own)."""
        return self.cuts is not None and self is not FIXED_MAPS.get(self.feature)

    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "xs": list(self.xs), "ys": list(self.ys),
                "source": self.source, **({"cuts": list(self.cuts)} if self.cuts else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiceModel:
        return cls(d["feature"], tuple(map(float, d["xs"])), tuple(map(float, d["ys"])),
                   d["source"], tuple(map(float, d["cuts"])) if d.get("cuts") else None)


# Used where no fit applies (see the module docstring): isotonic fits of Dice on a signal over
# the val images of models trained by the default recipe (711 real ISIC 2016 training pairs,
# 128², 30 epochs), read off at round knots, with the signal's quantiles (every 5 %) as the
# review cuts. The border-weighted spread's map pools the 73 val images of eight such models
# (the defaults' two seeds, and two seeds each of weight decay 0.01, no zoom or rotation, and
# batch size 4, whose test figures matched the defaults': 584 images, 13 of them below Dice
# 0.8); beyond 0.2 only 14 images remain, so the tail is rough. The uncertain share's map and
# cuts are those of the default recipe's model (the cuts from 292 val images of four models,
# the share from the first view alone, as --no-tta sees it) (docs/DESIGN.md, "Quality
# control"). A checkpoint fitted on an older signal (the plain spread, the disagreement) gets
# the map of the signal inference computes now.
FIXED_MAPS = {
    "border_spread": DiceModel("border_spread",
                               (0.0, 0.02, 0.03, 0.045, 0.06, 0.08, 0.1, 0.13, 0.16, 0.2, 0.3),
                               (0.979, 0.946, 0.922, 0.908, 0.899, 0.886, 0.882, 0.834, 0.789,
                                0.742, 0.645),
                               "fixed map",
                               (0.0107, 0.0149, 0.0172, 0.019, 0.0209, 0.0221, 0.0231, 0.0248,
                                0.026, 0.0276, 0.029, 0.0309, 0.0335, 0.0364, 0.04, 0.0441,
                                0.0488, 0.0551, 0.0685, 0.1076, 2.2254)),
    "uncertain_share": DiceModel("uncertain_share", (0.0, 0.04, 0.06, 0.09, 0.14, 0.2, 0.4),
                                 (0.98, 0.975, 0.94, 0.905, 0.88, 0.815, 0.68), "fixed map",
                                 (0.0278, 0.042, 0.0471, 0.0504, 0.0538, 0.0582, 0.0613,
                                  0.0642, 0.067, 0.0698, 0.0718, 0.0749, 0.0772, 0.0815,
                                  0.0857, 0.0916, 0.1023, 0.1252, 0.1485, 0.193, 0.6171)),
}


def isotonic_decreasing(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool-adjacent-violators: the non-increasing step fit of y on sorted x, as knots (the
    mean x and the fitted y of each pooled block)."""
    order = np.argsort(x, kind="stable")
    blocks: list[list[float]] = []  # [sum_x, sum_y, n]
    for xi, yi in zip(x[order], y[order], strict=True):
        blocks.append([float(xi), float(yi), 1.0])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] < blocks[-1][1] / blocks[-1][2]:
            sx, sy, n = blocks.pop()
            blocks[-1] = [blocks[-1][0] + sx, blocks[-1][1] + sy, blocks[-1][2] + n]
    return (np.array([b[0] / b[2] for b in blocks]), np.array([b[1] / b[2] for b in blocks]))


CUT_QUANTILES = 101  # a fitted map keeps its val signal's quantiles at every 1 %


def fit_dice_model(feature: str, values: Sequence[float], dices: Sequence[float]) -> DiceModel:
    """The isotonic (decreasing) fit of Dice on one signal, with the val signal's quantiles
    (`DiceModel.cuts`); the fixed map below MIN_FIT_IMAGES images."""
    if len(values) < MIN_FIT_IMAGES:
        fixed = FIXED_MAPS[feature]
        return DiceModel(feature, fixed.xs, fixed.ys,
                         f"fixed map (only {len(values)} val images; a fit needs "
                         f"{MIN_FIT_IMAGES})")
    xs, ys = isotonic_decreasing(np.asarray(values, float), np.asarray(dices, float))
    cuts = np.quantile(np.asarray(values, float), np.linspace(0.0, 1.0, CUT_QUANTILES))
    return DiceModel(feature, tuple(round(float(x), 5) for x in xs),
                     tuple(round(float(y), 5) for y in ys),
                     f"isotonic fit on {len(values)} val images",
                     tuple(round(float(c), 6) for c in cuts))


@dataclass(frozen=True)
class QualityModel:
    """What inference needs to turn an image's signals into its quality columns."""

    dice_models: tuple[DiceModel, ...] = tuple(FIXED_MAPS.values())
    review_below: float = 0.8
    ensemble: bool = False  # several models: each model's own fit on its own views
    review_share: float = 0.1  # also flag above the uncertainty of this top share of val
    # An ensemble's models' stored fits, in member order (empty for a model without a fit).
    member_maps: tuple[tuple[DiceModel, ...], ...] = ()

    @property
    def models(self) -> int:
        """How many models' views an image's signals come from (1 unless an ensemble)."""
        return len(self.member_maps) if self.ensemble and self.member_maps else 1

    def dice_model(self, members: int) -> DiceModel:
        """The map for a signal of `members` views: the stored fit, else the fixed map (also
        for an ensemble's signals taken over all its models' views together)."""
        feature = uncertainty_feature(members)
        if not self.ensemble:
            for m in self.dice_models:
                if m.feature == feature:
                    return m
        return FIXED_MAPS[feature]

    def member_models(self, views_per_model: int) -> list[DiceModel]:
        """Each model's map for its own uncertainty (the fixed map where it stored none)."""
        feature = uncertainty_feature(views_per_model)
        return [next((m for m in maps if m.feature == feature), FIXED_MAPS[feature])
                for maps in self.member_maps]

    def row(self, sig: dict[str, Any], fell_back: bool = False) -> dict[str, Any]:
        """The image's uncertainty, expected_dice and needs_review (expected Dice below the
        level, uncertainty above the review share's cut, or `fell_back`: the mask is the
        empty-mask fallback's, since no pixel passed the threshold). For an ensemble (signals with
        `model_uncertainties`): the mean of its models' uncertainties, of the expected Dice
        each model's own map gives its own uncertainty, and of their cuts."""
        us = sig.get("model_uncertainties")
        if self.ensemble and us and len(us) == len(self.member_maps):
            maps = self.member_models(sig["members"] // len(us))
            feature = maps[0].feature
            expected = float(np.mean([m({feature: u}) for m, u in zip(maps, us, strict=True)]))
            u, cut = float(np.mean(us)), float(np.mean([m.cut(self.review_share) for m in maps]))
        else:
            model = self.dice_model(sig["members"])
            expected, u, cut = model(sig), uncertainty(sig), model.cut(self.review_share)
        return {"uncertainty": round(u, 5), "expected_dice": round(expected, 4),
                "needs_review": expected < self.review_below or u > cut or fell_back}

    def describe(self, members: int, models: int = 1) -> dict[str, Any]:
        """summary.json's account of what the columns are (`members` views in all, from
        `models` models)."""
        per = members // models if models > 1 and members % models == 0 else members
        by_model = self.ensemble and models > 1 and models == len(self.member_maps)
        # the views the spread is taken over: each model's flips, or an ensemble's all together
        views = (f"{per} flip views'" if by_model or not self.ensemble
                 else f"{members} members' (flip views × models)")
        what = (f"spread of the {views} probabilities: their mean absolute deviation "
                "from the mean, per predicted-lesion pixel, times 1 + the share of the image's "
                "edge pixels inside the mask" if per > 1 else
                "share of pixels with probability in (0.3, 0.7) relative to the predicted area")
        rule = ("needs_review: expected_dice < level, or uncertainty > uncertainty_cut (the "
                "review_share most uncertain of the val images lie above it)")
        if by_model:
            maps = self.member_models(per)
            cut = float(np.mean([m.cut(self.review_share) for m in maps]))
            fitted = sum(m.cuts_from_fit for m in maps)
            what = f"mean over the {models} models of each model's own {what}"
            source = ("the mean of each model's own map at its own uncertainty ("
                      + "; ".join(sorted({m.source for m in maps})) + ")")
            cut_from = ("the mean of the models' cuts, each from its own val images"
                        if fitted == models else "the mean of the models' cuts (the fixed "
                        f"map's for the {models - fitted} without a fit)")
            rule = ("needs_review: expected_dice < level, or uncertainty > uncertainty_cut (for "
                    "each model, the review_share most uncertain of its val images lie above "
                    "its own cut)")
        else:
            model = self.dice_model(members)
            if members == 1:
                what += " (one member: --no-tta, one model)"
            cut = model.cut(self.review_share)
            source = model.source + (" (ensemble: fits are per model)" if self.ensemble
                                     and "fixed" in model.source else "")
            cut_from = ("the val images of the fit" if model.cuts_from_fit
                        else "the fixed map's val images")
        return {"uncertainty": what, "expected_dice_model": source,
                "level": self.review_below, "review_share": self.review_share,
                "uncertainty_cut": None if math.isinf(cut) else round(cut, 5),
                "uncertainty_cut_from": cut_from,
                "rule": rule + ", or the mask is the empty-mask fallback's (its reason says so)"}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], review_below: float,
                  review_share: float = 0.1) -> QualityModel:
        """From a checkpoint's metadata, or an ensemble's (`ensemble_meta`: the models' own
        fits under `member_quality`)."""
        stored = meta.get("quality", {}).get("dice_models")
        models = tuple(DiceModel.from_dict(d) for d in stored) if stored else tuple(FIXED_MAPS.values())
        members = tuple(tuple(DiceModel.from_dict(d) for d in (q or {}).get("dice_models", []))
                        for q in meta.get("member_quality", ()))
        return cls(models, review_below, ensemble=bool(meta.get("ensemble")),
                   review_share=review_share, member_maps=members)


# --------------------------------------------------------------------------- calibration


def ece(probs: np.ndarray, truth: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of pixel probabilities: the pixel-weighted mean over
    equal-width bins of |mean probability - share of lesion pixels|."""
    p = probs.ravel().astype(np.float64)
    t = truth.ravel().astype(np.float64)
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    n = np.bincount(idx, minlength=bins)
    gap = np.abs(np.bincount(idx, p, bins) - np.bincount(idx, t, bins))
    return float(gap.sum() / max(len(p), 1)) if n.sum() else 0.0


def calibrate(prob: np.ndarray | torch.Tensor, temperature: float) -> np.ndarray | torch.Tensor:
    """sigmoid(logit(p) / T): the probability map under the temperature."""
    if temperature == 1.0:
        return prob
    if isinstance(prob, torch.Tensor):
        return torch.sigmoid(torch.logit(prob.clamp(1e-6, 1 - 1e-6)) / temperature)
    p = np.clip(prob, 1e-6, 1 - 1e-6)
    return (1.0 / (1.0 + np.exp(-np.log(p / (1 - p)) / temperature))).astype(np.float32)


def fit_temperature(probs: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """The temperature of least pixel log-loss over TEMPERATURES, the ECE before and after,
    and whether it is applied (it lowers the ECE)."""
    p = np.clip(probs.astype(np.float64), 1e-6, 1 - 1e-6)
    logit, t = np.log(p / (1 - p)), truth.astype(np.float64)
    losses = []
    for temp in TEMPERATURES:
        z = logit / temp
        losses.append(float(np.mean(np.logaddexp(0, z) - t * z)))  # binary cross-entropy
    temp = float(TEMPERATURES[int(np.argmin(losses))])
    before, after = ece(probs, truth), ece(calibrate(probs.astype(np.float32), temp), truth)
    return {"temperature": round(temp, 4), "ece_before": round(before, 5),
            "ece_after": round(after, 5), "applied": after < before, "pixels": int(len(t))}


# --------------------------------------------------------------------------- summary


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Area under the ROC curve of `scores` for `positive` (ties count half); None without
    both classes."""
    s, y = np.asarray(scores, float), np.asarray(positive, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return None
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    ranks[order] = np.arange(1, len(s) + 1)
    for value in np.unique(sorted_s):  # average ranks of ties
        tied = s == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def review_summary(rows: list[dict[str, Any]], described: dict[str, Any] | None
                   ) -> dict[str, Any] | None:
    """summary.json's "review": what the columns are, images flagged, and with truth how well
    they did: AUROC of uncertainty for Dice < FAILURE_DICE, failures caught, MAE of
    expected_dice, and the failures the flags missed (`failures_missed`: the worst
    MISSED_SHOWN, worst first, with their scores, so the caught share never stands alone).
    None when no row has the columns (an older run's parts)."""
    rated = [r for r in rows if r.get("uncertainty") is not None]
    if not rated:
        return None
    flagged = sum(bool(r["needs_review"]) for r in rated)
    out: dict[str, Any] = {**(described or {}), "images": len(rated), "flagged": flagged,
                           "flagged_share": round(flagged / len(rated), 4)}
    scored = [r for r in rated if isinstance(r.get("dice"), float)]
    if scored:
        dice = np.array([r["dice"] for r in scored])
        fail = dice < FAILURE_DICE
        caught = sum(bool(r["needs_review"]) for r, f in zip(scored, fail, strict=True) if f)
        rank = auroc([r["uncertainty"] for r in scored], fail)
        out["with_truth"] = {
            "scored": len(scored), "failure_dice": FAILURE_DICE, "failures": int(fail.sum()),
            "auroc_uncertainty": None if rank is None else round(rank, 4),
            "failures_caught": caught,
            "caught_share": round(caught / int(fail.sum()), 4) if fail.any() else None,
            "expected_dice_mae": round(float(np.mean(np.abs(
                dice - np.array([r["expected_dice"] for r in scored])))), 4),
            "mean_dice_unflagged": (round(float(np.mean([r["dice"] for r in scored
                                                         if not r["needs_review"]])), 4)
                                    if any(not r["needs_review"] for r in scored) else None),
            "failures_missed": [
                {"id": r.get("id"), "dice": round(r["dice"], 4),
                 "uncertainty": r["uncertainty"], "expected_dice": r["expected_dice"]}
                for r in missed_failures(scored)[:MISSED_SHOWN]]}
    return out


def missed_failures(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The scored rows with Dice below FAILURE_DICE that are not flagged, worst first (ties
    by id): what a reviewer who looks only at the flagged images would not see."""
    return sorted((r for r in rows if isinstance(r.get("dice"), float)
                   and r["dice"] < FAILURE_DICE and not r.get("needs_review")),
                  key=lambda r: (r["dice"], str(r.get("id"))))
