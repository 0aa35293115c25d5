"""Export a checkpoint as one deployable file (ONNX or TorchScript) that carries the whole
preprocessing, and prove it against PyTorch before writing it.

The file holds the BatchNorm-folded eval model behind `Deployable`: uint8 (0-255) or float
(0-1) RGB N×3×H×W in, with N, H and W dynamic (H, W ≥ 32; the pad to a multiple of 32 and
the crop back are inside, as in `MobileNetEncoderDecoder.forward`), probabilities N×H×W out.
Its metadata (`build_metadata`) names the lesionseg version, the checkpoint's sha256, the
image size the model was trained at, the stored threshold and post-processing, the input
convention and the parity measured at export.

Parity: the exported file, run by its runtime, against the checkpoint's unfolded fp32 model
on synthetic images of several sizes and batch sizes (`parity_batches`). A file that fails
the limits is never written (`export_model`); `verify_file` checks an existing one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lesionseg import __version__
from lesionseg.checkpoint import build_model_from_checkpoint
from lesionseg.config import Config, to_dict
from lesionseg.data.synthetic import render_case
from lesionseg.data.transforms import to_float_images
from lesionseg.errors import UserError
from lesionseg.files import atomic_write_bytes, check_output_dir, sha256_file
from lesionseg.model import OUTPUT_STRIDE, fuse_for_inference
from lesionseg.modelcard import write_model_card
from lesionseg.postprocess import Postprocess
from lesionseg.runtime import (
    EXPORT_FORMAT,
    FORMATS,
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAME,
    TORCHSCRIPT_EXTRA,
    open_backend,
    read_metadata,
)

log = logging.getLogger(__name__)

OPSET = 17  # ONNX opset of the TorchScript-based exporter (ONNX Runtime ≥ 1.14 runs it)
INPUT_DTYPES = {"uint8": torch.uint8, "float": torch.float32}
PARITY_SEED = 7  # seed of the synthetic parity images


@dataclass(frozen=True)
class Limits:
    """What an exported file must meet against PyTorch fp32 to be written."""

    max_abs: float  # largest |Δprobability| over every pixel of every parity image
    mask_agreement: float  # fraction of pixels whose mask (p > threshold) is identical


LIMITS = {
    "fp32": Limits(max_abs=1e-4, mask_agreement=0.9999),
    # fp16 weights and activations: ~1e-3 of probability where the logit is near 0; the
    # masks must still agree on 99.9% of pixels (measured figures in the README).
    "fp16": Limits(max_abs=1e-2, mask_agreement=0.999),
}


class ExportError(UserError):
    """An export that cannot be made (names the file or option and why)."""


class ParityError(ExportError):
    """An exported model that does not match PyTorch within the limits (holds the table)."""


class Deployable(nn.Module):
    """The exported graph: uint8 or float [0, 1] RGB N×3×H×W → probabilities N×H×W.

    `net` (the folded model) normalizes, pads to a multiple of 32 and crops back itself; this
    adds the uint8 scaling the inference job does (`to_float_images`) and the sigmoid."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(to_float_images(images)))[:, 0]


@dataclass
class Parity:
    """The exported file against PyTorch fp32: per batch and overall."""

    rows: list[dict[str, Any]]
    max_abs: float
    mask_agreement: float
    pixels: int
    threshold: float
    limits: Limits
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        self.passed = (self.max_abs <= self.limits.max_abs
                       and self.mask_agreement >= self.limits.mask_agreement)

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs_diff": self.max_abs, "mask_agreement": self.mask_agreement,
                "pixels": self.pixels, "threshold": self.threshold, "passed": self.passed,
                "limits": asdict(self.limits), "batches": self.rows}

    def lines(self) -> list[str]:
        """The printed table: one line per batch, then the verdict."""
        out = [f"{'batch':>16}  {'max |Δp|':>10}  {'mean |Δp|':>10}  {'masks equal':>12}"]
        for r in self.rows:
            out.append(f"{r['shape']:>16}  {r['max_abs_diff']:10.2e}  {r['mean_abs_diff']:10.2e}"
                       f"  {100 * r['mask_agreement']:11.4f}%")
        verdict = "PASS" if self.passed else "FAIL"
        out.append(f"{verdict}: max |Δp| {self.max_abs:.2e} (limit {self.limits.max_abs:g}), "
                   f"masks equal on {100 * self.mask_agreement:.4f}% of {self.pixels} pixels at "
                   f"threshold {self.threshold:g} (limit {100 * self.limits.mask_agreement:g}%)")
        return out


def parity_batches(image_size: int) -> list[torch.Tensor]:
    """uint8 batches of synthetic lesion images at several sizes and batch sizes: the trained
    size, a non-square size that needs padding on both axes, the smallest allowed side, and a
    multiple of 32 (no pad). Deterministic."""
    s = image_size
    shapes = [(2, s, s), (1, s + 19, s // 2 + 13), (3, 32, 57), (1, 96, 128)]
    batches, index = [], 0
    for n, h, w in shapes:
        images = []
        for _ in range(n):
            img, _ = render_case(PARITY_SEED, index, min_side=64, max_side=max(64, h, w))
            images.append(torch.from_numpy(np.array(img.resize((w, h)))).permute(2, 0, 1))
            index += 1
        batches.append(torch.stack(images))
    return batches


def reference_probabilities(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """PyTorch fp32 on the checkpoint's own (unfolded) eval model, channels_last as the job's
    torch path runs (on this CPU contiguous NCHW is ~8x slower through oneDNN)."""
    x = to_float_images(images).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return torch.sigmoid(model(x).float())[:, 0]


def measure_parity(backend: Any, model: nn.Module, threshold: float, limits: Limits,
                   image_size: int) -> Parity:
    """Run every parity batch through `backend` and `model`; compare probabilities and masks."""
    rows, worst, agree, total = [], 0.0, 0, 0
    model = model.eval().to(memory_format=torch.channels_last)  # in place
    for images in parity_batches(image_size):
        ref = reference_probabilities(model, images)
        got = backend(images)
        if got.shape != ref.shape:
            raise ExportError(f"exported model returned shape {tuple(got.shape)} for input "
                              f"{tuple(images.shape)}; PyTorch returns {tuple(ref.shape)}")
        diff = (got - ref).abs()
        same = int(((got > threshold) == (ref > threshold)).sum())
        rows.append({"shape": "x".join(map(str, images.shape)),
                     "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                     "mask_agreement": same / ref.numel()})
        worst = max(worst, float(diff.max()))
        agree, total = agree + same, total + ref.numel()
    return Parity(rows, worst, agree / total, total, threshold, limits)


def build_metadata(checkpoint: Path, cfg: Config, meta: dict[str, Any], fmt: str,
                   input_dtype: str, precision: str) -> dict[str, Any]:
    """What the file says about itself (JSON): enough for `lesionseg.api` and the infer job to
    run it exactly as they run the checkpoint, without the checkpoint."""
    post = Postprocess.from_meta(meta)
    takes = "uint8 0-255" if input_dtype == "uint8" else "float32 0-1"
    if fmt == "torchscript":
        takes = "uint8 0-255 or float32 0-1"
    return {
        "format": EXPORT_FORMAT,
        "lesionseg_version": __version__,
        "file_format": fmt,
        "precision": precision,
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": sha256_file(checkpoint),
        "image_size": cfg.data.image_size,
        "threshold": (post or Postprocess()).threshold,
        "postprocess": (post or Postprocess()).to_dict(),
        "postprocess_source": "validation" if post else "default (the checkpoint holds no choice)",
        # The jobs' default for an empty mask (infer.empty_fallback), so that a program other
        # than lesionseg reading the file can do the same.
        "empty_fallback": cfg.infer.empty_fallback,
        "input": {"name": INPUT_NAME, "dtype": takes, "layout": "N×3×H×W RGB",
                  "dynamic": ["N", "H", "W"], "min_side": 32, "pad_multiple": OUTPUT_STRIDE,
                  "resize": "lesionseg resizes each image to image_size² (eval_transform) "
                            "and upsamples the probabilities back (bilinear)"},
        "output": {"name": OUTPUT_NAME, "layout": "N×H×W float32", "meaning": "sigmoid "
                   "probability of lesion; mask = probability > threshold, then postprocess; "
                   "a mask left empty becomes, of the pixels above empty_fallback × the "
                   "image's highest probability, the 8-connected region with the largest "
                   "probability mass above that level (0: left empty)"},
        "tta": "the jobs average 4 flip views (identity, W, H, H+W) outside the file",
        "parity": None,
        "checkpoint_meta": json.loads(json.dumps(meta, default=str)),
        "config": to_dict(cfg),
    }


def _onnx_proto(deployable: nn.Module, example: torch.Tensor, workdir: Path) -> Any:
    """The TorchScript-based exporter (`dynamo=False`): it needs no onnxscript, and its tracer
    records the size arithmetic of the pad and crop, so H and W stay dynamic."""
    import onnx

    path = workdir / "model.onnx"
    with warnings.catch_warnings():  # its deprecation notice and tracer warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(
            deployable, (example,), str(path), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
            dynamic_axes={INPUT_NAME: {0: "N", 2: "H", 3: "W"},
                          OUTPUT_NAME: {0: "N", 1: "H", 2: "W"}})
    return onnx.load(str(path))


def _onnx_bytes(proto: Any, metadata: dict[str, Any]) -> bytes:
    """The model with `metadata` as its one lesionseg metadata_props entry."""
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, sort_keys=True)
    proto.producer_name, proto.producer_version = "lesionseg", __version__
    return proto.SerializeToString()


def _torchscript_module(deployable: Deployable, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace the folded net (dynamic sizes recorded as in ONNX), script the wrapper around it
    so that the one file takes uint8 and float input alike."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(deployable.net, to_float_images(example), check_trace=False)
        return torch.jit.script(Deployable(traced))


def _torchscript_bytes(module: torch.jit.ScriptModule, metadata: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(module, buf,
                       _extra_files={TORCHSCRIPT_EXTRA: json.dumps(metadata, sort_keys=True)})
    return buf.getvalue()


@dataclass
class ExportResult:
    path: Path
    metadata: dict[str, Any]
    parity: Parity
    seconds: float
    bytes: int


def export_model(checkpoint: str | Path, out: str | Path, fmt: str = "onnx",
                 input_dtype: str = "uint8", fp16: bool = False,
                 write_card: bool = True) -> ExportResult:
    """Export `checkpoint` to `out`, check parity, and write the file (atomically) only if it
    passes; raises ExportError with the parity table otherwise. Writes MODEL_CARD.md beside it."""
    checkpoint, out = Path(checkpoint), Path(out)
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if input_dtype not in INPUT_DTYPES:
        raise ExportError(f"--input {input_dtype}: choose uint8 or float")
    if fp16 and fmt != "onnx":
        raise ExportError("--fp16 is offered for ONNX only (--format onnx)")
    check_output_dir(out.parent, "--out")
    if out.is_dir():
        raise ExportError(f"--out {out}: is a folder; name the file to write (e.g. {out}/best.onnx)")
    start = time.perf_counter()
    model, cfg, meta = build_model_from_checkpoint(checkpoint)
    precision = "fp16" if fp16 else "fp32"
    metadata = build_metadata(checkpoint, cfg, meta, fmt, input_dtype, precision)
    deployable = Deployable(fuse_for_inference(model)).eval()
    # Sides that are not multiples of 32, so the traced graph holds the pad (and the crop).
    example = torch.randint(0, 256, (2, 3, 2 * OUTPUT_STRIDE + 13, 3 * OUTPUT_STRIDE + 7),
                            dtype=torch.uint8)
    if input_dtype == "float":
        example = to_float_images(example)
    with tempfile.TemporaryDirectory(prefix="lesionseg-export-") as tmp:
        work = Path(tmp)
        if fmt == "onnx":
            proto = _onnx_proto(deployable, example, work)
            if fp16:
                from onnxruntime.transformers.float16 import convert_float_to_float16

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    # keep_io_types: uint8/float32 in, float32 probabilities out, as fp32 files
                    proto = convert_float_to_float16(proto, keep_io_types=True)
            data = _onnx_bytes(proto, metadata)
            candidate = work / "candidate.onnx"
        else:
            module = _torchscript_module(deployable, example)
            data = _torchscript_bytes(module, metadata)
            candidate = work / "candidate.ts"
        candidate.write_bytes(data)
        backend, _ = open_backend(candidate, "cpu", torch.get_num_threads())
        parity = measure_parity(backend, model, metadata["threshold"], LIMITS[precision],
                                cfg.data.image_size)
        if not parity.passed:
            raise ParityError(f"{out}: not written: the exported model does not match PyTorch\n"
                              + "\n".join(parity.lines()))
        metadata["parity"] = parity.to_dict()
        data = (_onnx_bytes(proto, metadata) if fmt == "onnx"
                else _torchscript_bytes(module, metadata))
    atomic_write_bytes(out, data)
    seconds = time.perf_counter() - start
    log.info("exported %s (%s, %s, %.1f MB, sha256 %s) in %.1f s", out, fmt, precision,
             len(data) / 1e6, hashlib.sha256(data).hexdigest()[:12], seconds)
    if write_card:
        write_model_card(checkpoint, out.parent / "MODEL_CARD.md")
    return ExportResult(out, metadata, parity, seconds, len(data))


def verify_file(path: str | Path, checkpoint: str | Path) -> Parity:
    """Parity of an existing exported file against `checkpoint` (which must be the one it was
    exported from: same sha256), with the limits of the file's precision."""
    path, checkpoint = Path(path), Path(checkpoint)
    metadata = read_metadata(path)
    digest = sha256_file(checkpoint)
    if metadata.get("checkpoint_sha256") != digest:
        raise ExportError(f"{path}: exported from a checkpoint with sha256 "
                          f"{str(metadata.get('checkpoint_sha256'))[:12]}…, not {checkpoint} "
                          f"({digest[:12]}…); pass the checkpoint it came from")
    model, cfg, _ = build_model_from_checkpoint(checkpoint)
    backend, _ = open_backend(path, "cpu", torch.get_num_threads())
    limits = LIMITS.get(metadata.get("precision", "fp32"), LIMITS["fp32"])
    return measure_parity(backend, model, float(metadata["threshold"]), limits,
                          int(metadata.get("image_size") or cfg.data.image_size))
