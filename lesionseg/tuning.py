"""After training: choose the threshold and post-processing on the validation set, store it.

The model's probabilities for every val sample are computed as the inference job computes them
(the same BatchNorm-folded predictor, the eval transform, bilinear upsampling to the stored
size), then `postprocess.choose` scores every threshold × post-processing combination by mean
Jaccard against the stored val masks. The choice goes into best.pt's metadata
(`meta["postprocess"]`, with the candidate table); `jobs/infer.py` applies it by default. A
cross-validation makes the choice again on the pooled out-of-fold predictions of all its folds
(lesionseg.crossval) and stores that in every fold's best.pt.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from lesionseg.checkpoint import load_weights, save_weights
from lesionseg.config import InferConfig
from lesionseg.data.cv import cv2
from lesionseg.data.shard_format import decode_sample, iter_raw
from lesionseg.data.transforms import stack_images
from lesionseg.infer.predict import load_predictor
from lesionseg.infer.refine import model_inputs
from lesionseg.metrics import degenerate
from lesionseg.postprocess import (
    DEFAULT_THRESHOLD,
    MIN_IMAGES,
    UNTUNED_STEPS,
    Postprocess,
    choose,
)

log = logging.getLogger(__name__)

MAX_SCORING_SIDE = 1024  # val maps larger than this are scored at this longest side (memory)
TABLE_ROWS = 8  # best candidates kept in best.pt beside the choice


def val_probabilities(checkpoint: Path, val_urls: tuple[str, ...], image_size: int,
                      batch_size: int = 8, device: torch.device | None = None,
                      ids: frozenset[str] | None = None,
                      ) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """(sample keys, probability maps, boolean truths) of every val sample (with `ids`, of
    those samples only), at the stored size (at most MAX_SCORING_SIDE), predicted as
    `jobs/infer.py` predicts by default (flip TTA, fp32), on `device` (default the CPU)."""
    predictor, _, _ = load_predictor(checkpoint, InferConfig(mixed_precision="no"),
                                     device or torch.device("cpu"))
    keys: list[str] = []
    probs: list[np.ndarray] = []
    truths: list[np.ndarray] = []
    pending: list[tuple[torch.Tensor, np.ndarray, torch.Tensor | None]] = []

    def flush() -> None:
        out = predictor(stack_images([x for x, _, _ in pending]), [f for _, _, f in pending])
        for p, (_, truth, _) in zip(out, pending, strict=True):
            h, w = truth.shape
            probs.append(cv2.resize(np.ascontiguousarray(p.numpy()), (w, h),
                                    interpolation=cv2.INTER_LINEAR))
            truths.append(truth)
        pending.clear()

    for raw in iter_raw(val_urls):
        if ids is not None and raw["__key__"] not in ids:
            continue
        keys.append(raw["__key__"])
        sample = decode_sample(raw)
        image, mask = sample.image, sample.mask
        scale = MAX_SCORING_SIDE / max(mask.size)
        if scale < 1:
            size = (max(1, round(mask.width * scale)), max(1, round(mask.height * scale)))
            mask = mask.resize(size, 0)  # nearest
        x, fine = model_inputs(image, image_size, predictor.refine)
        pending.append((x, np.asarray(mask) > 127, fine))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return keys, probs, truths


def tune_checkpoint(checkpoint: Path, val_urls: tuple[str, ...], image_size: int,
                    device: torch.device | None = None,
                    min_images: int = MIN_IMAGES) -> Postprocess | None:
    """Choose on the val set, write the choice into `checkpoint` (rewritten atomically) and
    log it beside the default's score."""
    _, probs, truths = val_probabilities(checkpoint, val_urls, image_size, device=device)
    return store_choice([checkpoint], probs, truths, "val images", min_images)


def store_choice(checkpoints: list[Path], probs: list[np.ndarray], truths: list[np.ndarray],
                 chosen_on: str, min_images: int = MIN_IMAGES) -> Postprocess | None:
    """`choose` on (probability map, truth) pairs; write the choice into every checkpoint's
    metadata (each rewritten atomically) and log it beside the default's score. `chosen_on`
    names the images, e.g. "val images". With fewer than `min_images` pairs nothing is
    chosen: the untuned default (0.5, main) is stored with the reason, and the log says so.
    A model that predicts (almost) nothing or everything there even at the best threshold gets
    no choice (a choice on it means nothing): None."""
    if len(probs) < min_images:
        return _store_untuned(checkpoints, probs, truths, chosen_on, min_images)
    chosen, table = choose(probs, truths)
    if _degenerate(probs, chosen.threshold, chosen_on, checkpoints):
        return None
    baseline = next(r["jaccard"] for r in table
                    if r["threshold"] == 0.5 and r["postprocess"] == "none")
    best = next(r["jaccard"] for r in table if r["threshold"] == chosen.threshold
                and r["postprocess"] == chosen.name)
    for checkpoint in checkpoints:
        state_dict, cfg, meta = load_weights(checkpoint)
        meta["postprocess"] = chosen.to_dict() | {
            "val_images": len(probs), "val_jaccard": round(best, 5),
            "val_jaccard_default": round(baseline, 5), "chosen_on": chosen_on,
            "table": table[:TABLE_ROWS]}
        save_weights(checkpoint, state_dict, cfg, **meta)
    log.info("post-processing chosen on %d %s: threshold %.2f, %s (Jaccard %.4f; %.4f at 0.5 "
             "without post-processing); stored in %s", len(probs), chosen_on, chosen.threshold,
             chosen.name, best, baseline, ", ".join(map(str, checkpoints)))
    return chosen


def _degenerate(probs: list[np.ndarray], threshold: float, chosen_on: str,
                checkpoints: list[Path]) -> bool:
    """Whether the model predicts (almost) nothing or everything at `threshold` (then the log
    warns that nothing is chosen)."""
    why = degenerate(float(np.mean([np.mean(p > threshold) for p in probs]))
                     if probs else None, chosen_on)
    if why:
        log.warning("no threshold or post-processing chosen: %s; %s keep none (inference "
                    "applies 0.5 and none)", why, ", ".join(map(str, checkpoints)))
    return bool(why)


def _store_untuned(checkpoints: list[Path], probs: list[np.ndarray], truths: list[np.ndarray],
                   chosen_on: str, min_images: int) -> Postprocess | None:
    """Too few images to choose on: store the untuned default (threshold 0.5, the main
    region) with the reason (and its val score)."""
    default = Postprocess(DEFAULT_THRESHOLD, UNTUNED_STEPS)
    if _degenerate(probs, default.threshold, chosen_on, checkpoints):
        return None
    why = (f"not tuned: {len(probs)} {chosen_on} are fewer than train.tune_min_images="
           f"{min_images}; a choice on so few fits their noise, so the defaults stay")
    table = choose(probs, truths, thresholds=(default.threshold,))[1] if probs else []
    score = next((r["jaccard"] for r in table if r["postprocess"] == default.name), None)
    for checkpoint in checkpoints:
        state_dict, cfg, meta = load_weights(checkpoint)
        meta["postprocess"] = default.to_dict() | {
            "val_images": len(probs), "chosen_on": chosen_on, "tuned": False, "why": why,
            "val_jaccard": None if score is None else round(score, 5),
            "val_jaccard_default": None if score is None else round(score, 5)}
        save_weights(checkpoint, state_dict, cfg, **meta)
    log.warning("post-processing %s (threshold %.2f, %s)", why, default.threshold, default.name)
    return default
