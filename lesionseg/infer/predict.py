"""The forward pass of inference: one checkpoint (`Predictor`: BatchNorm folded, channels_last,
autocast on CUDA, flip TTA) or an exported file on a runtime, or several as an `Ensemble`
(mean probability); loading them."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lesionseg.checkpoint import build_model_from_checkpoint
from lesionseg.config import Config, InferConfig, from_dict
from lesionseg.data.folds import fold_checkpoints
from lesionseg.device import autocast, precision_dtype, to_model_input
from lesionseg.export import export_model
from lesionseg.infer import InferenceError
from lesionseg.infer.refine import FineCopies, Refine, predict_refined, refine_for
from lesionseg.model import fuse_for_inference
from lesionseg.postprocess import DEFAULT_THRESHOLD, Postprocess
from lesionseg.runtime import export_format, open_backend

log = logging.getLogger(__name__)

# Flip TTA: the image and every mirror combination of its two axes (as nnU-Net mirrors 2D
# inputs by default), predicted in one batch and flipped back before averaging.
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


@dataclass
class Predictor:
    """The model on its device; `__call__` maps a uint8 (or float [0, 1]) batch to
    probabilities at S×S. With `runtime` (an exported file's backend, `lesionseg.runtime`),
    that runs instead of `model`, with the same flip TTA around it."""

    model: torch.nn.Module | None
    device: torch.device
    amp_dtype: torch.dtype | None
    tta: bool
    runtime: Any = None
    refine: Refine | None = None  # the lesion-centred second pass (lesionseg.infer.refine)

    @property
    def backend(self) -> str:
        """torch, onnxruntime or torchscript."""
        return self.runtime.name if self.runtime is not None else "torch"

    @property
    def precision(self) -> str:
        """What the forward computes in: fp16/bf16 (autocast, or an fp16 file) or fp32."""
        return self.runtime.precision if self.runtime is not None else precision_name(self.amp_dtype)

    def __call__(self, images: torch.Tensor, fine: FineCopies = None) -> torch.Tensor:
        return self.predict(images, fine)[0]

    @torch.inference_mode()
    def predict(self, images: torch.Tensor,
                fine: FineCopies = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities N×S×S, the members' views N×V×S×S): with flip TTA the four views,
        each flipped back, whose mean the probabilities are; without it the one map (V = 1).
        The views are what the forward computed anyway (lesionseg.quality reads them). With
        `refine`, the images with a lesion box are forwarded once more, cropped round it (from
        `fine`, the images' finer copies, where given: `lesionseg.infer.refine.fine_copy`)."""
        return predict_refined(self._predict_once, images, self.refine, fine)

    def _predict_once(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.runtime is not None:
            return self._run_exported(images)
        x = to_model_input(images, self.device)
        n = x.shape[0]
        if self.tta:
            x = torch.cat([x.flip(dims) if dims else x for dims in TTA_FLIPS])
        with autocast(self.device, self.amp_dtype):
            probs = torch.sigmoid(self.model(x).float())[:, 0]
        return _with_views(probs.float().cpu(), n, self.tta)

    def _run_exported(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exported file on the batch as given (uint8 on the CPU), flip TTA around it."""
        n = images.shape[0]
        if self.tta:
            images = torch.cat([images.flip(dims) if dims else images for dims in TTA_FLIPS])
        return _with_views(self.runtime(images).float().cpu(), n, self.tta)


@dataclass
class Ensemble:
    """Several predictors on one device whose probabilities are averaged (each with its own
    flip TTA, so that with --tta every model × flip counts once). The models run one after
    another on each batch: only one model's activations are alive at a time (the weights of
    all stay on the device: a few MB each)."""

    members: list[Predictor]
    refine: Refine | None = None  # the second pass, on the ensemble's mean (members have none)

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def runtime(self) -> Any:
        return self.members[0].runtime

    @property
    def backend(self) -> str:
        return self.members[0].backend

    @property
    def precision(self) -> str:
        return self.members[0].precision

    def __call__(self, images: torch.Tensor, fine: FineCopies = None) -> torch.Tensor:
        return self.predict(images, fine)[0]

    @torch.inference_mode()
    def predict(self, images: torch.Tensor,
                fine: FineCopies = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean probabilities, every model × flip view, N×(models·V)×S×S); `refine` crops
        round the ensemble's lesion (from `fine` where given) and runs every model on the
        crop."""
        return predict_refined(self._predict_once, images, self.refine, fine)

    def _predict_once(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total, views = self.members[0].predict(images)
        views = [views]
        for member in self.members[1:]:
            probs, more = member.predict(images)
            total += probs
            views.append(more)
        return total / len(self.members), torch.cat(views, dim=1)


def _with_views(probs: torch.Tensor, n: int, tta: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, views N×V×S×S) of a forward's output: with TTA len(TTA_FLIPS) views of
    n images stacked view by view."""
    if not tta:
        return probs, probs[:, None]
    views = torch.stack([p.flip(dims) if dims else p
                         for p, dims in zip(probs.split(n), TTA_FLIPS, strict=True)], dim=1)
    return sum(views.unbind(1)) / len(TTA_FLIPS), views  # as tta_average, same order


def tta_average(probs: torch.Tensor, n: int) -> torch.Tensor:
    """The mean of the len(TTA_FLIPS) views of n images (stacked view by view), each flipped
    back."""
    views = probs.split(n)
    return sum(p.flip(dims) if dims else p
               for p, dims in zip(views, TTA_FLIPS, strict=True)) / len(TTA_FLIPS)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AMX tiles or AVX-512 BF16), where bf16
    autocast runs the forward ~1.5x faster than fp32; elsewhere bf16 is emulated and slower.
    (torch.cpu's probes are private; a torch without them counts as no.)"""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    try:
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    except Exception:  # noqa: BLE001 (a probe that fails means: do not rely on it)
        return False


def precision_reason(setting: str, predictor: Predictor | Ensemble) -> str:
    """Why the forward runs in its precision, for the start-up line and the summary."""
    if predictor.runtime is not None:
        return f"the {predictor.backend} runtime's file"
    if setting != "auto":
        return f"infer.mixed_precision={setting}"
    why = {"fp16": "fp16 on CUDA", "bf16": "this CPU has bf16 hardware (AMX or AVX-512 BF16)"}
    return ("infer.mixed_precision=auto: "
            + why.get(predictor.precision, "fp32, no bf16 hardware on this device"))


def amp_dtype_for(setting: str, device: torch.device) -> torch.dtype | None:
    """`infer.mixed_precision` → autocast dtype. auto: fp16 on CUDA; bf16 on a CPU with bf16
    hardware (on the accuracy benchmark's 40 hard test images, two trained seeds, Dice moved
    by -0.0002 and -0.0005); fp32 elsewhere."""
    if setting == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None
    return precision_dtype(setting)


def load_predictor(checkpoint: str | Path, cfg: InferConfig,
                   device: torch.device) -> tuple[Predictor, Config, dict[str, Any]]:
    """Model from a checkpoint, BatchNorm folded, on `device`, channels_last, in eval mode;
    or, for an exported file or `cfg.backend` onnxruntime, the runtime that runs it
    (`load_exported`). Returns the checkpoint's config and metadata either way."""
    if cfg.backend != "torch" or export_format(checkpoint) is not None:
        return load_exported(checkpoint, cfg, device)
    model, ckpt_cfg, meta = build_model_from_checkpoint(checkpoint)
    # BatchNorm folded into the convs: ~40% faster here; in place, the model is ours alone
    model = fuse_for_inference(model, inplace=True)
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    predictor = Predictor(model, device, amp_dtype_for(cfg.mixed_precision, device), cfg.tta,
                          refine=run_refine(cfg, ckpt_cfg))
    return predictor, ckpt_cfg, meta


def run_refine(cfg: InferConfig, ckpt_cfg: Config) -> Refine | None:
    """The second pass `cfg` asks for on a model trained as `ckpt_cfg` says."""
    return refine_for(cfg.refine, ckpt_cfg.data.scale_min, cfg.refine_max_zoom)


def ensemble_members(checkpoints: str | Path | Sequence[str | Path]) -> list[Path]:
    """The model files a run uses: every --checkpoint, a cross-validation run folder standing
    for its fold-I/best.pt files (lesionseg.data.folds). A file named twice is an error."""
    given = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    if not given:
        raise InferenceError("missing --checkpoint")
    members: list[Path] = []
    for path in map(Path, given):
        members += fold_checkpoints(path) if path.is_dir() else [path]
    seen: set[Path] = set()
    for path in members:
        if path.resolve() in seen:
            raise InferenceError(f"--checkpoint {path}: given twice (an ensemble member counts "
                                 "once)")
        seen.add(path.resolve())
    return members


def load_ensemble(members: list[Path], cfg: InferConfig, device: torch.device,
                  ) -> tuple[Predictor | Ensemble, Config, dict[str, Any], int]:
    """One predictor (a single member) or the Ensemble of all, the first member's config,
    the metadata the run applies (`ensemble_meta`), and the side the models see:
    `cfg.image_size`, else the members' data.image_size, which must agree."""
    loaded = [load_predictor(path, cfg, device) for path in members]
    sizes = {str(path): c.data.image_size for path, (_, c, _) in zip(members, loaded, strict=True)}
    if not cfg.image_size and len(set(sizes.values())) > 1:
        listed = ", ".join(f"{p}: {s}" for p, s in sizes.items())
        raise InferenceError(f"the ensemble's models were trained at different data.image_size "
                             f"({listed}); pass --image-size S to run them all at S")
    image_size = cfg.image_size or loaded[0][1].data.image_size
    if len(loaded) == 1:
        predictor, ckpt_cfg, meta = loaded[0]
        return predictor, ckpt_cfg, meta, image_size
    metas = [meta for _, _, meta in loaded]
    # one second pass round the ensemble's lesion; the zoom cap is the most cautious member's
    refines = [p.refine for p, _, _ in loaded]
    refine = None if None in refines else min(refines, key=lambda r: r.max_zoom)
    for predictor, _, _ in loaded:
        predictor.refine = None
    return (Ensemble([p for p, _, _ in loaded], refine), loaded[0][1],
            ensemble_meta(members, metas), image_size)


def ensemble_meta(members: list[Path], metas: list[dict[str, Any]]) -> dict[str, Any]:
    """What an ensemble applies: the members' stored threshold and post-processing when they
    all hold the same one (the folds of one cross-validation do: the pooled choice), else none
    (0.5, no steps; a warning says so), and every member's quality fit (`member_quality`)."""
    choices = {str(Postprocess.from_meta(m)) for m in metas}
    # each model's own quality fit: the ensemble's expected Dice and cut are their means
    meta: dict[str, Any] = {"ensemble": len(members),
                            "member_quality": [m.get("quality") or {} for m in metas]}
    if len(choices) == 1 and "postprocess" in metas[0]:
        meta["postprocess"] = metas[0]["postprocess"]
    elif any("postprocess" in m for m in metas):
        log.warning("the ensemble's models stored different thresholds/post-processing; using "
                    "threshold %g without post-processing unless --threshold/--postprocess say "
                    "otherwise", DEFAULT_THRESHOLD)
    return meta


def load_exported(checkpoint: str | Path, cfg: InferConfig,
                  device: torch.device) -> tuple[Predictor, Config, dict[str, Any]]:
    """An exported file on its runtime (ONNX → onnxruntime, TorchScript → torch), or a
    checkpoint exported to ONNX on the fly (parity-checked; the session holds the graph, so
    the temporary file goes at once). Config and metadata come from the file's metadata."""
    fmt = export_format(checkpoint)
    if fmt == "torchscript" and cfg.backend == "onnxruntime":
        raise InferenceError(f"--checkpoint {checkpoint}: a TorchScript file runs on torch; "
                             "use --backend torch, or export to ONNX for onnxruntime")
    threads = torch.get_num_threads()
    if fmt is None:
        with tempfile.TemporaryDirectory(prefix="lesionseg-infer-") as tmp:
            log.info("exporting %s to ONNX for onnxruntime (parity-checked)", checkpoint)
            onnx_path = export_model(checkpoint, Path(tmp) / "model.onnx", "onnx",
                                     write_card=False).path
            runtime, meta = open_backend(onnx_path, str(device), threads)
    else:
        runtime, meta = open_backend(checkpoint, str(device), threads)
    log.info("%s runs %s (%s, %s; providers %s)", runtime.name, checkpoint, meta["file_format"],
             runtime.precision, ", ".join(map(str, runtime.providers)))
    file_cfg = from_dict(meta["config"])
    predictor = Predictor(None, runtime.device, None, cfg.tta, runtime=runtime,
                          refine=run_refine(cfg, file_cfg))
    return predictor, file_cfg, dict(meta.get("checkpoint_meta") or {})



def precision_name(amp_dtype: torch.dtype | None) -> str:
    """What the forward pass computes in: fp16/bf16 (autocast) or fp32."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(amp_dtype, "fp32")
