"""After training: fit the quality control of lesionseg.quality on the val images and store it
in best.pt (`meta["quality"]`: the expected-Dice maps; `meta["calibration"]`: the temperature
and the pixel ECE before and after), beside the threshold lesionseg.tuning stored.

The val samples are predicted as the inference job predicts by default (flip TTA, fp32, the
stored threshold and post-processing); the no-TTA map is fitted on the first (unflipped) view
of the same pass. One more pass over val than the tuning's (its probabilities are the views'
mean; the views are what this needs).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lesionseg.checkpoint import load_weights, save_weights
from lesionseg.config import InferConfig
from lesionseg.data.cv import cv2
from lesionseg.data.shard_format import decode_sample, iter_raw
from lesionseg.data.transforms import stack_images
from lesionseg.infer.outputs import full_size_mask
from lesionseg.infer.predict import load_predictor
from lesionseg.infer.refine import model_inputs
from lesionseg.metrics import binary_counts
from lesionseg.postprocess import Postprocess
from lesionseg.quality import (
    FAILURE_DICE,
    auroc,
    fit_dice_model,
    fit_temperature,
    signals,
    uncertainty_feature,
)

log = logging.getLogger(__name__)

CAL_PIXELS = 2_000_000  # pixels (sampled with a fixed seed) the temperature is fitted on
MAX_SCORING_SIDE = 1024  # val truths larger than this are scored at this longest side (memory)


def fit_quality(checkpoint: Path, val_urls: tuple[str, ...], image_size: int,
                device: torch.device | None = None, ids: frozenset[str] | None = None,
                batch_size: int = 8) -> dict[str, Any]:
    """At the end of training: predict the val samples as inference does by default (flip
    TTA, fp32, the stored threshold and post-processing), fit the expected-Dice maps (with
    the four views, and with the first view alone as --no-tta sees it) and the temperature,
    and store them in `checkpoint`'s metadata ("quality", "calibration")."""
    predictor, _, meta = load_predictor(checkpoint, InferConfig(mixed_precision="no"),
                                        device or torch.device("cpu"))
    post = replace(Postprocess.from_meta(meta) or Postprocess(),
                   fallback=InferConfig().empty_fallback)  # as inference applies it
    tta: list[tuple[dict, float]] = []
    single: list[tuple[dict, float]] = []
    cal_probs: list[np.ndarray] = []
    cal_truths: list[np.ndarray] = []
    pending: list[tuple[torch.Tensor, np.ndarray, torch.Tensor | None]] = []

    def flush() -> None:
        probs, views = predictor.predict(stack_images([x for x, _, _ in pending]),
                                         [f for _, _, f in pending])
        for prob, v, (_, truth, _) in zip(probs, views, pending, strict=True):
            tta.append((signals(v, post.threshold), _dice(prob, truth, post)))
            single.append((signals(v[:1], post.threshold), _dice(v[0], truth, post)))
            small = cv2.resize(truth.astype(np.uint8), prob.shape[::-1],
                               interpolation=cv2.INTER_NEAREST_EXACT)
            cal_probs.append(prob.numpy().ravel())
            cal_truths.append(small.ravel())
        pending.clear()

    for raw in iter_raw(val_urls):
        if ids is not None and raw["__key__"] not in ids:
            continue
        sample = decode_sample(raw)
        mask = sample.mask
        scale = MAX_SCORING_SIDE / max(mask.size)
        if scale < 1:
            mask = mask.resize((max(1, round(mask.width * scale)),
                                max(1, round(mask.height * scale))), 0)
        x, fine = model_inputs(sample.image, image_size, predictor.refine)
        pending.append((x, np.asarray(mask) > 127, fine))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    models = [fit_dice_model(f, [s[f] for s, _ in pairs], [d for _, d in pairs])
              for f, pairs in ((uncertainty_feature(4), tta),
                               (uncertainty_feature(1), single))]
    quality = {"dice_models": [m.to_dict() for m in models], "val_images": len(tta),
               "val_auroc": _val_auroc(tta)}
    calibration = (_fit_calibration(np.concatenate(cal_probs), np.concatenate(cal_truths))
                   if cal_probs else {"temperature": 1.0, "applied": False})
    state_dict, cfg, meta = load_weights(checkpoint)
    meta["quality"], meta["calibration"] = quality, calibration
    save_weights(checkpoint, state_dict, cfg, **meta)
    log.info("quality control fitted on %d val images (%s; AUROC of the uncertainty for Dice "
             "< %.1f: %s); temperature %.3f, pixel ECE %.4f → %.4f (%s); stored in %s",
             len(tta), models[0].source, FAILURE_DICE, quality["val_auroc"],
             calibration["temperature"], calibration.get("ece_before", float("nan")),
             calibration.get("ece_after", float("nan")),
             "applied" if calibration["applied"] else "not applied", checkpoint)
    return {"quality": quality, "calibration": calibration}


def _dice(prob: torch.Tensor, truth: np.ndarray, post: Postprocess) -> float:
    """Dice of the mask `prob` gives at the truth's size (both empty: 1)."""
    _, pred, _ = full_size_mask(prob, truth.shape, post)
    tp, fp, fn, _ = binary_counts(pred, truth.astype(np.uint8))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def _val_auroc(pairs: list[tuple[dict, float]]) -> float | None:
    rank = auroc([s[uncertainty_feature(4)] for s, _ in pairs],
                 [d < FAILURE_DICE for _, d in pairs])
    return None if rank is None else round(rank, 4)


def _fit_calibration(probs: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """`fit_temperature` on at most CAL_PIXELS pixels drawn with a fixed seed."""
    if len(probs) > CAL_PIXELS:
        pick = np.random.default_rng(0).choice(len(probs), CAL_PIXELS, replace=False)
        probs, truth = probs[pick], truth[pick]
    return fit_temperature(probs, truth) | {"measured_at": "the model's input size"}
