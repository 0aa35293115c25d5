"""Finishing one image in a finishing thread: upsample, threshold, post-process, write its
outputs, score it; any failure of the image becomes its error row, a failure of the machine
stops the run."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from lesionseg.data.cv import cv2
from lesionseg.data.images import encode_grey_png, write_mask
from lesionseg.data.sources import Item
from lesionseg.errors import UserError, environment_message, first_line, is_environmental
from lesionseg.files import atomic_write_bytes
from lesionseg.infer import InferenceError
from lesionseg.infer.journal import MASKS, PROBS
from lesionseg.infer.outputs import OutputSpec, full_size_mask, write_previews
from lesionseg.infer.phases import ForwardPhases
from lesionseg.metrics import binary_counts
from lesionseg.postprocess import FALLBACK_NOTE
from lesionseg.quality import calibrate, signals

log = logging.getLogger(__name__)


def finish_item(item: Item, sample: dict[str, Any], prob: torch.Tensor, spec: OutputSpec,
                views: torch.Tensor | None = None) -> dict:
    """Upsample one probability map to the original size, threshold, post-process (the
    spec's steps), write the mask (and optional extras), score it against the truth, rate it
    from the members' `views` (V×S×S, lesionseg.quality; default the map alone); returns the
    image's row. Runs in a thread.

    The upsampling is bilinear with pixel centres aligned (as F.interpolate with
    align_corners=False) in float32, by cv2 (~4x cheaper than torch on one thread); the
    prediction is exactly "probability > infer.threshold", compared in float32 (as torch does
    with a Python float). The mask stays a uint8 0/255 array from the compare to the PNG; the
    scores come from it and the 0/1 truth bits without any bool or tensor copies."""
    h, w = sample["size"]
    post = spec.post
    full, pred, fell_back = full_size_mask(prob, (h, w), post)
    area = cv2.countNonZero(pred)
    write_mask(spec.out / MASKS / f"{item.id}_Segmentation.png", pred)
    if spec.save_probs:  # round(prob * 255), ties to even as torch's round
        probs8 = cv2.convertScaleAbs(calibrate(full, spec.temperature), alpha=255.0)
        atomic_write_bytes(spec.out / PROBS / f"{item.id}_prob.png", encode_grey_png(probs8))
    del full
    row: dict[str, Any] = {"id": item.id, "input": item.origin, "height": h, "width": w,
                           "status": "no_truth", "reason": FALLBACK_NOTE if fell_back else "",
                           "pred_area": area}
    sig = signals(prob[None] if views is None else views, post.threshold, spec.quality.models)
    row.update(spec.quality.row(sig, fell_back),
               signals={k: v for k, v in sig.items() if v is not None})
    truth = None
    if sample["truth_error"]:
        row.update(status="failed", reason=f"truth unusable: {sample['truth_error']}")
    elif sample["truth_bits"] is not None:
        truth = np.unpackbits(sample["truth_bits"], count=h * w).reshape(h, w)  # uint8 0/1
        tp, fp, fn, tn = binary_counts(pred, truth)
        reason = "; ".join(r for r in (sample["truth_note"], row["reason"]) if r)
        row.update(status="ok", reason=reason, tp=tp, fp=fp, fn=fn, tn=tn)
    if sample["preview"] is not None:
        write_previews(item.id, sample["preview"], pred, truth, spec)
    return row


def finish_in_turn(phases: ForwardPhases, item: Item, sample: dict[str, Any],
                   prob: torch.Tensor, spec: OutputSpec, views: torch.Tensor | None = None) -> dict:
    """`_finish_safely` once the forward, if phased, has finished its turn."""
    phases.wait()
    return _finish_safely(item, sample, prob, spec, views)


def _finish_safely(item: Item, sample: dict[str, Any], prob: torch.Tensor, spec: OutputSpec,
                   views: torch.Tensor | None = None) -> dict:
    """`finish_item`, with any failure of this image recorded as its error row instead of
    raised (`_finish_or_error_row`); a shard sample's row names its split."""
    row = _finish_or_error_row(item, sample, prob, spec, views)
    if item.split:
        row["split"] = item.split
    return row


def _finish_or_error_row(item: Item, sample: dict[str, Any], prob: torch.Tensor,
                         spec: OutputSpec, views: torch.Tensor | None = None) -> dict:
    """Any failure of this image (whatever its type: cv2.error, numpy, Pillow, MemoryError)
    becomes the image's error row. A failure of the machine (disk full, read-only folder, I/O
    error) is not the image's: it stops the run with an InferenceError and no row, so the
    rerun does the image again."""
    try:
        return finish_item(item, sample, prob, spec, views)
    except OSError as e:
        if is_environmental(e):  # disk full, read-only: stop; the rerun redoes this image
            raise InferenceError(environment_message(
                e, f"{spec.out}: writing the outputs of {item.id}")) from None
        return {"id": item.id, "input": item.origin, "status": "error",
                "reason": f"{item.origin}: writing outputs failed: {first_line(e)}"}
    except UserError as e:
        return {"id": item.id, "input": item.origin, "status": "error", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 (one image must never stop the batch)
        log.debug("finishing %s failed", item.origin, exc_info=True)
        return {"id": item.id, "input": item.origin, "status": "error",
                "reason": f"{item.origin}: {type(e).__name__}: {first_line(e)}"}
