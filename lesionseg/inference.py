"""Batch inference: masks, per-image ISIC metrics, a summary and a report for whole folders,
archives and shard folders, split across processes (`accelerate launch`) and jobs (Slurm).

Pipeline per process: `sources.collect` → this (part, rank)'s items minus those already done →
DataLoader workers read and decode (JPEG draft) and resize with the eval transform → batched
forward (inference mode, channels_last, AMP on CUDA, optional flip TTA) → a thread pool
upsamples each probability map to the original size once, thresholds, writes the mask PNG,
scores it against the truth, and the main thread appends one row per image to its part file.

Restartable: a mask is written (temporary name + rename) before its row, rows are appended
one fsynced line at a time, and a rerun skips every id that already has a row. When a part's
processes finish they leave done markers; whoever sees every part done merges the part files
into metrics.csv, errors.csv, summary.json and report.html (`--merge DIR` does it by hand).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import csv
import io
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lesionseg.config import Config, InferConfig, from_dict, load_config, to_dict
from lesionseg.data.cv import cv2
from lesionseg.data.folds import fold_checkpoints
from lesionseg.data.images import (
    encode_grey_png,
    encode_jpeg,
    load_image,
    load_mask,
    mask_orientation,
    write_mask,
)
from lesionseg.data.sources import Inventory, Item, assign, collect, read_order
from lesionseg.data.transforms import eval_transform, stack_images, to_float_images
from lesionseg.errors import UserError, environment_message, first_line, is_environmental
from lesionseg.export import export_model
from lesionseg.files import atomic_write_bytes, atomic_write_text, check_output_dir, sha256_file
from lesionseg.launch import maybe_relaunch_cpu_ranks
from lesionseg.metrics import METRIC_NAMES, binary_counts, scores, summarize
from lesionseg.postprocess import CHOICES as POSTPROCESS_CHOICES
from lesionseg.postprocess import DEFAULT_THRESHOLD, Postprocess
from lesionseg.runtime import BACKENDS, export_format, open_backend
from lesionseg.threadplan import plan_threads, usable_cores
from lesionseg.workers import WorkerInit

log = logging.getLogger(__name__)

PARTS = "parts"  # under --out: per (part, rank) row files, done markers, run.json
MASKS, PROBS, OVERLAYS, THUMBS = "masks", "probs", "overlays", "thumbs"
ROW_FILE_RE = re.compile(r"^rows-p(\d+)-r(\d+)\.jsonl$")
DONE_FILE_RE = re.compile(r"^done-p(\d+)-r(\d+)-of-(\d+)\.json$")
THUMB_SIDE = 256  # longest side of the report's thumbnails
# metrics.csv columns: DESIGN.md's contract first, then counts and bookkeeping; one row per
# image that got a mask (with truth or not), so it maps every input to its mask.
METRIC_COLUMNS = ("id", "height", "width", "dice", "iou", "accuracy", "sensitivity",
                  "specificity", "threshold_jaccard", "tp", "fp", "fn", "tn", "status", "reason",
                  "input", "mask", "split", "pred_area", "pred_fraction")
ERROR_COLUMNS = ("input", "id", "reason")
# Run settings that must match when a part resumes or joins an existing --out.
SIGNATURE_KEYS = ("num_shards", "inputs", "masks", "checkpoint_sha256", "image_size",
                  "threshold", "postprocess", "tta", "shard_splits")


# Flip TTA: the image and every mirror combination of its two axes (as nnU-Net mirrors 2D
# inputs by default), predicted in one batch and flipped back before averaging.
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


class InferenceError(UserError):
    """An output folder or setting that prevents the run (names the file or option)."""


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `jobs/infer.py` / `lesionseg infer`; unset flags take InferConfig defaults."""
    d = InferConfig()
    parser.description = """\
Segment every image in folders, archives (.zip, .tar, .tar.gz) and packed shard folders.
Writes under --out: masks/<id>_Segmentation.png (original size and orientation, 0/255, ready
for the ISIC scorer), metrics.csv (per image: input, mask, predicted area; scores with truth),
errors.csv (every input that failed), summary.json and report.html. Each probability map is
thresholded and post-processed as chosen on validation at the end of training (stored in the
checkpoint), with flip TTA. Rerun with the same --out to resume where a run stopped (a full
disk or read-only folder stops the run with status 2; the rerun continues). Under
`accelerate launch` the images are split across processes; --num-shards/--shard-index (or a
Slurm array) split them across jobs, and the last part to finish merges."""
    parser.epilog = """examples:
  python jobs/infer.py --checkpoint runs/demo/best.pt --input ISIC2016/ --out out/
  python jobs/infer.py --checkpoint best.pt --input images.zip --masks truth.zip --out out/ --no-tta
  python jobs/infer.py --checkpoint runs/cv5 --input ISIC2016/ --out out/   # 5-fold ensemble
  python jobs/infer.py --checkpoint a/best.pt --checkpoint b/best.pt --input images/ --out out/
  accelerate launch jobs/infer.py --checkpoint best.pt --input shards/isic2016 --out out/
  python jobs/infer.py --merge out/   # combine the parts of an array job by hand"""
    parser.add_argument("--checkpoint", metavar="FILE", action="append", default=[],
                        help="best.pt or last.pt from a training run, or a file from "
                             "`lesionseg export` (.onnx, TorchScript); a cross-validation run "
                             "folder (data.folds=K) stands for its fold-I/best.pt. Repeat it, or "
                             "give a folder of folds, for an ensemble: the probabilities of "
                             "every model (each with its flips under --tta) are averaged before "
                             "the threshold and post-processing. Required unless --merge")
    parser.add_argument("--input", metavar="PATH", action="append", default=[],
                        help="image folder (recursive), image file, .zip, .tar/.tar.gz/.tgz, "
                             "packed shard folder (its test split, or val when it has none; "
                             "infer.shard_splits=[val,test] chooses), ISIC root or official "
                             "zip; repeatable")
    parser.add_argument("--masks", metavar="PATH", action="append", default=[],
                        help="ground-truth folder or zip, matched by id "
                             "(ISIC_0000000_Segmentation.png) or by file stem; repeatable")
    parser.add_argument("--out", metavar="DIR", help="output folder (required unless --merge)")
    parser.add_argument("--num-shards", type=int, metavar="N",
                        help="split the images into N job parts (default: SLURM_ARRAY_TASK_COUNT "
                             "or 1)")
    parser.add_argument("--shard-index", type=int, metavar="I",
                        help="which part this job runs, 0..N-1 (default: SLURM_ARRAY_TASK_ID "
                             "minus SLURM_ARRAY_TASK_MIN, or 0)")
    parser.add_argument("--merge", metavar="DIR",
                        help="only merge the parts under DIR into metrics.csv, errors.csv, "
                             "summary.json and report.html, then exit")
    parser.add_argument("--retry-failed", action="store_true",
                        help="on a rerun, also redo the images that have an error row (by "
                             "default only images without a row are done; failures of the "
                             "machine, such as a full disk, never leave a row)")
    parser.add_argument("--batch-size", type=int, metavar="N",
                        help=f"images per forward pass (default {d.batch_size})")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="decode worker processes per process (default: sized together "
                             "with the torch and finishing threads from the cores; the "
                             "\"threads:\" log line says what was chosen)")
    parser.add_argument("--image-size", type=int, metavar="S",
                        help="side the model sees (default: the checkpoint's data.image_size)")
    parser.add_argument("--threshold", type=float, metavar="P",
                        help="probability above which a pixel is lesion (default: the threshold "
                             "chosen on validation and stored in the checkpoint, else 0.5)")
    parser.add_argument("--postprocess", choices=("auto", *POSTPROCESS_CHOICES), metavar="STEP",
                        help="after thresholding: none, largest (keep the largest connected "
                             "region), fill (fill holes) or largest+fill; default auto: what "
                             "validation chose at the end of training (stored in the checkpoint)")
    parser.add_argument("--device", metavar="DEV",
                        help=f"auto (CUDA when visible), cpu, cuda or cuda:N (default {d.device})")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="what runs the model: torch (default) or onnxruntime (CPU provider, "
                             "CUDA provider where installed). With a checkpoint, onnxruntime "
                             "exports it to ONNX on the fly (parity-checked, as lesionseg "
                             "export); --checkpoint FILE.onnx runs an exported file on "
                             "onnxruntime, a TorchScript file on torch")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average the predictions of the image and its horizontal, vertical "
                             "and double flips (default on: about 1 point of Dice for 4 "
                             "forwards; --no-tta for one forward per image)")
    parser.add_argument("--save-probs", action="store_true", default=None,
                        help="also write 8-bit probability PNGs to probs/")
    parser.add_argument("--save-overlays", action="store_true", default=None,
                        help="also write overlay JPEGs (outlines: prediction blue, truth yellow) "
                             "to overlays/")
    parser.add_argument("--wandb", action="store_true", default=None,
                        help="also log the results to W&B as a run of their own (a table of "
                             "per-image metrics with overlays, and the summary; tracking.* "
                             "settings, offline by default)")
    parser.add_argument("--no-report", action="store_true", default=None,
                        help="do not write report.html (nor its thumbnails)")
    parser.add_argument("--config", metavar="FILE",
                        help="YAML config; its infer: section sets defaults for the flags above")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. infer.post_threads=4 infer.mixed_precision=no")


FLAG_KEYS = {"batch_size": "batch_size", "workers": "num_workers", "image_size": "image_size",
             "threshold": "threshold", "postprocess": "postprocess", "tta": "tta",
             "device": "device", "backend": "backend", "save_probs": "save_probs",
             "save_overlays": "save_overlays", "wandb": "log_wandb"}


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults <- --config <- key=value <- explicit flags (the most specific wins)."""
    overrides = list(args.overrides)
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"infer.{key}={str(value).lower() if isinstance(value, bool) else value}")
    if args.no_report:
        overrides.append("infer.report=false")
    return load_config(args.config, overrides)


def command(args: argparse.Namespace) -> int:
    """Run the job (or only the merge); failures of single images never fail the job."""
    if args.merge:
        report = None if args.no_report is None else not args.no_report
        merge(args.merge, report=report)
        return 0
    missing = [f for f, v in (("--checkpoint", args.checkpoint), ("--input", args.input),
                              ("--out", args.out)) if not v]
    if missing:
        raise InferenceError(f"missing {', '.join(missing)} (or use --merge DIR)")
    cfg = config_from_args(args)
    maybe_relaunch_cpu_ranks()  # `accelerate launch --cpu --num_processes N`: N ranks
    num_shards, shard_index = job_part(args.num_shards, args.shard_index)
    run_inference(args.checkpoint, args.input, args.out, cfg, masks=args.masks,
                  num_shards=num_shards, shard_index=shard_index,
                  retry_failed=args.retry_failed)
    return 0


def job_part(num_shards: int | None, shard_index: int | None,
             env: dict[str, str] | None = None) -> tuple[int, int]:
    """(N, I) from the flags, else from a Slurm array (`--array=0-9:2` gives index 0..4)."""
    env = os.environ if env is None else env
    if num_shards is None:
        num_shards = int(env.get("SLURM_ARRAY_TASK_COUNT", "1"))
    if shard_index is None:
        if "SLURM_ARRAY_TASK_ID" in env and num_shards > 1:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            step = int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
            shard_index = (int(env["SLURM_ARRAY_TASK_ID"]) - first) // step
        else:
            shard_index = 0
    if num_shards < 1:
        raise InferenceError(f"--num-shards must be at least 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise InferenceError(f"--shard-index {shard_index} is outside 0..{num_shards - 1}")
    return num_shards, shard_index


# --------------------------------------------------------------------------- decoding (workers)


class ItemDataset(Dataset):
    """Reads and decodes items in DataLoader workers. A failing item never raises: it comes
    back as {"error": reason} so that one bad file cannot stop the batch."""

    def __init__(self, items: list[Item], image_size: int, preview_side: int) -> None:
        self.items, self.image_size, self.preview_side = items, image_size, preview_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        try:
            return {"index": index, **decode_item(item, self.image_size, self.preview_side)}
        except UserError as e:
            return {"index": index, "error": str(e)}
        except OSError as e:
            if is_environmental(e, reading=True):  # an I/O error: stop, retried on rerun
                return {"index": index, "error": environment_message(e, f"reading {item.origin}"),
                        "environmental": True}
            return {"index": index, "error": f"{item.origin}: {type(e).__name__}: {e}"}
        except Exception as e:  # any reader/decoder failure is this item's, not the batch's
            log.debug("decoding %s failed", item.origin, exc_info=True)
            return {"index": index, "error": f"{item.origin}: {type(e).__name__}: {e}"}


def decode_item(item: Item, image_size: int, preview_side: int) -> dict[str, Any]:
    """Image → eval-transformed tensor; truth → packed bits (1 = lesion) at the original size,
    row-major, h*w bits; preview → an RGB array of at most preview_side pixels a side."""
    data = item.image.read()
    img, display = load_image(data, item.origin, min_size=image_size)
    size = item.orig_size or display
    x, _ = eval_transform(img, None, image_size)
    out: dict[str, Any] = {"image": x, "size": size, "truth_bits": None, "truth_error": None,
                           "truth_note": "", "preview": None}
    if preview_side:  # img is not needed any more: shrink it in place (no copy)
        img.thumbnail((preview_side, preview_side), Image.BILINEAR)
        out["preview"] = np.asarray(img)
    if item.truth is not None:
        try:
            truth, note = read_truth(item, size, display)
            # load_mask gives exactly 0/255, so packbits' "nonzero" is the ISIC "> 128". Packed,
            # the truth crosses to the main process as 1/8 of the bytes (pickled, not shm).
            out["truth_bits"], out["truth_note"] = np.packbits(np.asarray(truth)), note
        except UserError as e:
            out["truth_error"] = str(e)
        except Exception as e:  # unreadable truth: the prediction is still written
            out["truth_error"] = f"{item.truth.origin}: {type(e).__name__}: {e}"
    return out


def read_truth(item: Item, size: tuple[int, int],
               stored: tuple[int, int]) -> tuple[Image.Image, str]:
    """The truth mask at `size` (h, w). A shard's mask stored downscaled with its image is
    resized (nearest) to the original size; any other size mismatch is an error."""
    assert item.truth is not None
    data = item.truth.read()
    if item.truth_scaled and stored != size:
        mask = load_mask(data, item.truth.origin, expected_size=stored)
        return (mask.resize((size[1], size[0]), Image.NEAREST),
                f"truth resized from the shard's {stored[1]}x{stored[0]}")
    mask = load_mask(data, item.truth.origin, expected_size=size)
    orientation = mask_orientation(data, item.truth.origin)
    note = (f"truth carries EXIF orientation {orientation}: read unrotated, as the ISIC scorer "
            "reads it" if orientation != 1 else "")
    return mask, note


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the decoded images; keep per-item extras (and failures) as lists."""
    good = [s for s in samples if "error" not in s]
    images = stack_images([s.pop("image") for s in good]) if good else None
    return {"images": images, "good": good, "failed": [s for s in samples if "error" in s]}


# --------------------------------------------------------------------------- model


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

    @property
    def backend(self) -> str:
        """torch, onnxruntime or torchscript."""
        return self.runtime.name if self.runtime is not None else "torch"

    @property
    def precision(self) -> str:
        """What the forward computes in: fp16/bf16 (autocast, or an fp16 file) or fp32."""
        return self.runtime.precision if self.runtime is not None else precision_name(self.amp_dtype)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.runtime is not None:
            return self._run_exported(images)
        x = to_float_images(images.to(self.device, non_blocking=True))
        x = x.contiguous(memory_format=torch.channels_last)
        n = x.shape[0]
        if self.tta:
            x = torch.cat([x.flip(dims) if dims else x for dims in TTA_FLIPS])
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
               else contextlib.nullcontext())
        with amp:
            probs = torch.sigmoid(self.model(x).float())[:, 0]
        if self.tta:
            probs = tta_average(probs, n)
        return probs.float().cpu()

    def _run_exported(self, images: torch.Tensor) -> torch.Tensor:
        """The exported file on the batch as given (uint8 on the CPU), flip TTA around it."""
        n = images.shape[0]
        if self.tta:
            images = torch.cat([images.flip(dims) if dims else images for dims in TTA_FLIPS])
        probs = self.runtime(images)
        return (tta_average(probs, n) if self.tta else probs).float().cpu()


@dataclass
class Ensemble:
    """Several predictors on one device whose probabilities are averaged (each with its own
    flip TTA, so that with --tta every model × flip counts once). The models run one after
    another on each batch: only one model's activations are alive at a time (the weights of
    all stay on the device: a few MB each)."""

    members: list[Predictor]

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

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        total = self.members[0](images)
        for member in self.members[1:]:
            total += member(images)
        return total / len(self.members)


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
    if predictor.device.type == "cuda":
        return "infer.mixed_precision=auto: fp16 on CUDA"
    if predictor.device.type == "cpu" and cpu_has_bf16():
        return "infer.mixed_precision=auto: this CPU has bf16 hardware (AMX or AVX-512 BF16)"
    return "infer.mixed_precision=auto: fp32, no bf16 hardware on this device"


def amp_dtype_for(setting: str, device: torch.device) -> torch.dtype | None:
    """`infer.mixed_precision` → autocast dtype. auto: fp16 on CUDA; bf16 on a CPU with bf16
    hardware (on the accuracy benchmark's 40 hard test images, two trained seeds, Dice moved
    by -0.0002 and -0.0005); fp32 elsewhere."""
    if setting == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[setting]


def load_predictor(checkpoint: str | Path, cfg: InferConfig,
                   device: torch.device) -> tuple[Predictor, Config, dict[str, Any]]:
    """Model from a checkpoint, BatchNorm folded, on `device`, channels_last, in eval mode;
    or, for an exported file or `cfg.backend` onnxruntime, the runtime that runs it
    (`load_exported`). Returns the checkpoint's config and metadata either way."""
    from lesionseg.checkpoint import build_model_from_checkpoint
    from lesionseg.model import fuse_for_inference

    if cfg.backend != "torch" or export_format(checkpoint) is not None:
        return load_exported(checkpoint, cfg, device)
    model, ckpt_cfg, meta = build_model_from_checkpoint(checkpoint)
    # BatchNorm folded into the convs: ~40% faster here; in place, the model is ours alone
    model = fuse_for_inference(model, inplace=True)
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    return Predictor(model, device, amp_dtype_for(cfg.mixed_precision, device), cfg.tta), ckpt_cfg, meta


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
    return (Ensemble([p for p, _, _ in loaded]), loaded[0][1], ensemble_meta(members, metas),
            image_size)


def ensemble_meta(members: list[Path], metas: list[dict[str, Any]]) -> dict[str, Any]:
    """What an ensemble applies: the members' stored threshold and post-processing when they
    all hold the same one (the folds of one cross-validation do: the pooled choice), else none
    (0.5, no steps; a warning says so)."""
    choices = {str(Postprocess.from_meta(m)) for m in metas}
    meta: dict[str, Any] = {"ensemble": len(members)}
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
    predictor = Predictor(None, runtime.device, None, cfg.tta, runtime=runtime)
    return predictor, from_dict(meta["config"]), dict(meta.get("checkpoint_meta") or {})


# --------------------------------------------------------------------------- per image outputs


@dataclass(frozen=True)
class OutputSpec:
    """What to write for each image, and where."""

    out: Path
    threshold: float
    save_probs: bool
    save_overlays: bool
    thumbs: bool
    steps: tuple[str, ...] = ()  # post-processing after the threshold (lesionseg.postprocess)


def finish_item(item: Item, sample: dict[str, Any], prob: torch.Tensor, spec: OutputSpec) -> dict:
    """Upsample one probability map to the original size, threshold, post-process (the
    spec's steps), write the mask (and optional extras), score it against the truth; returns
    the image's row. Runs in a thread.

    The upsampling is bilinear with pixel centres aligned (as F.interpolate with
    align_corners=False) in float32, by cv2 (~4x cheaper than torch on one thread); the
    prediction is exactly "probability > infer.threshold", compared in float32 (as torch does
    with a Python float). The mask stays a uint8 0/255 array from the compare to the PNG; the
    scores come from it and the 0/1 truth bits without any bool or tensor copies."""
    h, w = sample["size"]
    full, pred = full_size_mask(prob, (h, w), Postprocess(spec.threshold, spec.steps))
    write_mask(spec.out / MASKS / f"{item.id}_Segmentation.png", pred)
    if spec.save_probs:  # round(prob * 255), ties to even as torch's round
        probs8 = cv2.convertScaleAbs(full, alpha=255.0)
        atomic_write_bytes(spec.out / PROBS / f"{item.id}_prob.png", encode_grey_png(probs8))
    del full
    row: dict[str, Any] = {"id": item.id, "input": item.origin, "height": h, "width": w,
                           "status": "no_truth", "reason": "", "pred_area": cv2.countNonZero(pred)}
    truth = None
    if sample["truth_error"]:
        row.update(status="failed", reason=f"truth unusable: {sample['truth_error']}")
    elif sample["truth_bits"] is not None:
        truth = np.unpackbits(sample["truth_bits"], count=h * w).reshape(h, w)  # uint8 0/1
        tp, fp, fn, tn = binary_counts(pred, truth)
        row.update(status="ok", reason=sample["truth_note"], tp=tp, fp=fp, fn=fn, tn=tn)
    if sample["preview"] is not None:
        write_previews(item.id, sample["preview"], pred, truth, spec)
    return row


def full_size_mask(prob: torch.Tensor, size: tuple[int, int],
                   post: Postprocess) -> tuple[np.ndarray, np.ndarray]:
    """(probability map upsampled to size = (h, w), float32; mask uint8 0/255): bilinear,
    "probability > threshold", then the post-processing steps. The job and `lesionseg.api`
    both turn predictions into masks here."""
    h, w = size
    p = np.ascontiguousarray(prob.detach().float().cpu().numpy())
    full = cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR)  # float32, h x w
    pred = above_threshold(full, post.threshold)  # uint8: 255 where prob > t
    if post.steps:
        pred = post.apply(pred)
    return full, pred


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


# --------------------------------------------------------------------------- part files


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The complete rows of a part file (a torn last line, from a kill, is ignored)."""
    rows = []
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                rows.append(json.loads(line))
            except ValueError:
                log.warning("%s: skipping a malformed row", path)
    return rows


class RowLog:
    """One process's append-only row file: whole lines only, each flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_torn_tail()
        self.file = open(path, "ab")  # noqa: SIM115 (held open across appends; see close)

    def _drop_torn_tail(self) -> None:
        """Truncate a last line without its newline (the process died mid-write)."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning("%s: dropping a torn last row (%d bytes)", self.path, len(data) - keep)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def append(self, row: dict[str, Any]) -> None:
        try:
            self.file.write(json.dumps(row, sort_keys=True).encode("utf-8") + b"\n")
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as e:  # a torn line is dropped when the file is opened again
            raise InferenceError(environment_message(e, f"{self.path}: appending a row")) from None

    def close(self) -> None:
        self.file.close()


RETRIED_STATUSES = ("error", "failed")  # rows that --retry-failed does again


def done_ids(parts_dir: Path, retry_failed: bool = False) -> set[str]:
    """Ids with a row in any part file: finished (or recorded as failed) by an earlier run;
    with `retry_failed`, only those with a row that is not an error or a failed score."""
    ids: set[str] = set()
    for path in sorted(parts_dir.glob("rows-*.jsonl")):
        ids.update(r["id"] for r in read_rows(path)
                   if "id" in r and not (retry_failed and r.get("status") in RETRIED_STATUSES))
    return ids


SIGNATURE_FILE = "signature.json"  # under parts/: created exclusively by the first run


def check_signature(parts_dir: Path, signature: dict[str, Any]) -> None:
    """Claim the output folder for this run's settings, or refuse to mix with a different run.

    The first run creates parts/signature.json exclusively (O_EXCL: of two runs racing into
    one --out exactly one creates it); every other run, part or rank compares its settings
    with it. Reading run.json instead left a window in which two runs with different
    checkpoints both passed and mixed their rows."""
    path = parts_dir / SIGNATURE_FILE
    data = json.dumps({k: signature[k] for k in SIGNATURE_KEYS}, sort_keys=True).encode()
    legacy = parts_dir / "run.json"  # an --out written before signature.json existed
    if not path.exists() and legacy.exists():
        _compare_signature(path, json.loads(legacy.read_text()).get("signature", {}), signature)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        _compare_signature(path, _read_signature(path), signature)
        return
    with os.fdopen(fd, "wb") as f:
        f.write(data + b"\n")
        f.flush()
        os.fsync(f.fileno())


def _read_signature(path: Path, wait_s: float = 10.0) -> dict[str, Any]:
    """The claimed signature; its creator may still be writing it (a few bytes): wait."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            raw = path.read_bytes()
            if raw.endswith(b"\n"):
                return json.loads(raw)
        except ValueError:
            pass
        if time.monotonic() > deadline:
            raise InferenceError(f"{path}: unreadable; delete it (or use a new --out) if no "
                                 "other run is starting there")
        time.sleep(0.05)


def _compare_signature(path: Path, previous: dict[str, Any], signature: dict[str, Any]) -> None:
    differ = [k for k in SIGNATURE_KEYS if previous.get(k) != signature[k]]
    if differ:
        raise InferenceError(
            f"{path.parent.parent}: holds a run with different {', '.join(differ)}; "
            "use a new --out (or the same settings to resume)")


def parts_done(parts_dir: Path, num_shards: int) -> tuple[bool, list[int]]:
    """(all parts done, missing parts): a part is done when every rank of some world size
    left its marker."""
    markers: dict[tuple[int, int], set[int]] = {}
    for path in parts_dir.glob("done-*.json"):
        m = DONE_FILE_RE.match(path.name)
        if m:
            part, rank, world = (int(g) for g in m.groups())
            markers.setdefault((part, world), set()).add(rank)
    missing = [p for p in range(num_shards)
               if not any(part == p and len(ranks) == world for (part, world), ranks in markers.items())]
    return not missing, missing


# --------------------------------------------------------------------------- the run


def _distributed(device: str = "auto") -> Any:
    """Accelerate's process state (1 process under plain python).

    PartialState, unlike Accelerator, ignores ACCELERATE_USE_CPU: without `cpu=True` a CPU
    launch of N processes would give N processes that each think they are alone (and do
    all the work). So: CPU when asked (infer.device=cpu or the launcher), or when there is
    no CUDA."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InferenceError(f"--device {device}: no CUDA device is visible here; use "
                             "--device cpu (or auto)")
    cpu = device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def local_processes(state: Any) -> int:
    """How many processes of this job share this host's cores: the launcher's local world
    size (torchrun, accelerate launch), else every process of a one-host CPU launch, else 1."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and int(local) > 0:
        return int(local)
    return max(1, state.num_processes) if state.device.type == "cpu" else 1


def run_device(setting: str, state: Any) -> torch.device:
    """The device this process runs on: the launcher's (cuda:LOCAL_RANK, or cpu), except that
    one process may be sent to a chosen GPU with infer.device=cuda:N."""
    if ":" not in setting:
        return state.device
    if state.num_processes > 1:
        raise InferenceError(f"--device {setting}: one GPU per process is chosen by the "
                             "launcher; use --device cuda with several processes")
    index = int(setting.split(":")[1])
    if index >= torch.cuda.device_count():
        raise InferenceError(f"--device {setting}: only {torch.cuda.device_count()} CUDA "
                             "device(s) visible")
    return torch.device(setting)


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """What the forward pass computes in: fp16/bf16 (autocast) or fp32."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(amp_dtype, "fp32")


def run_inference(checkpoint: str | Path | Sequence[str | Path], inputs: list[str | Path],
                  out: str | Path, cfg: Config | None = None, *, masks: list[str | Path] = (),
                  num_shards: int = 1, shard_index: int = 0,
                  retry_failed: bool = False) -> dict[str, Any] | None:
    """Process this job part's share of `inputs` in this process; returns the merged summary
    when this process finished the last part (else None). `checkpoint`: one model file, or
    several and/or cross-validation run folders for an ensemble (`ensemble_members`).
    `retry_failed` redoes the images whose earlier row is an error."""
    cfg = cfg or load_config(None, [])
    check_output_dir(out, "--out")
    threads = torch.get_num_threads()
    try:
        return _run(checkpoint, inputs, Path(out), cfg, list(masks), num_shards, shard_index,
                    retry_failed)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _run(checkpoint: str | Path | Sequence[str | Path], inputs: list[str | Path], out: Path,
         cfg: Config,
         masks: list[str | Path], num_shards: int, shard_index: int,
         retry_failed: bool = False) -> dict[str, Any] | None:
    """Enumerate, pick this (part, rank)'s unfinished items, process them, mark the part done
    and merge if it was the last one."""
    icfg = cfg.infer
    state = _distributed(icfg.device)
    device = run_device(icfg.device, state)
    if not state.is_main_process:
        logging.getLogger("lesionseg").setLevel(logging.WARNING)
    # Threads first: the runtime (torch or onnxruntime) takes its count when it is opened.
    threads = plan_threads(usable_cores() // local_processes(state), device.type == "cuda",
                           icfg.num_threads, icfg.num_workers, icfg.post_threads,
                           torch_default=torch.get_num_threads())
    torch.set_num_threads(threads.torch_threads)
    icfg = replace(icfg, num_threads=threads.torch_threads, num_workers=threads.decode_workers,
                   post_threads=threads.finish_threads)
    cfg = replace(cfg, infer=icfg)
    log.info("threads: %s", threads.describe())
    parts_dir = out / PARTS
    parts_dir.mkdir(parents=True, exist_ok=True)

    members = ensemble_members(checkpoint)
    predictor, ckpt_cfg, meta, image_size = load_ensemble(members, icfg, device)
    post, post_source = applied_postprocess(icfg, meta)
    icfg = replace(icfg, threshold=post.threshold, postprocess=post.name)
    cfg = replace(cfg, infer=icfg)
    if predictor.runtime is not None:
        device = predictor.device
    runtime = {"device": device.type if state.num_processes > 1 else str(device),
               "precision": predictor.precision,
               "precision_reason": precision_reason(icfg.mixed_precision, predictor),
               "backend": predictor.backend, "processes": state.num_processes}
    log.info("inference on %s, %s precision (%s), backend %s, "
             "%d process(es), %s, %d px, threshold %g, post-processing %s (%s)%s",
             runtime["device"], runtime["precision"], runtime["precision_reason"],
             runtime["backend"],
             state.num_processes, f"ensemble of {len(members)} models" if len(members) > 1
             else "one model", image_size, post.threshold, post.name, post_source,
             ", flip TTA" if icfg.tta else "")
    run_cfg = _run_config(ckpt_cfg, cfg, image_size)
    digests = [sha256_file(p) for p in members]
    signature = {
        "num_shards": num_shards, "inputs": [str(Path(p).resolve()) for p in inputs],
        "masks": [str(Path(p).resolve()) for p in masks],
        # An ensemble's: every member's, in order (resuming or joining needs the same models).
        "checkpoint_sha256": digests[0] if len(digests) == 1 else digests,
        "image_size": image_size,
        "threshold": icfg.threshold, "postprocess": icfg.postprocess, "tta": icfg.tta,
        "shard_splits": list(icfg.shard_splits),
    }
    check_signature(parts_dir, signature)
    inventory = collect(inputs, masks, tuple(icfg.shard_splits))
    _write_run_files(parts_dir, signature, _checkpoint_record(checkpoint, members, digests, meta),
                     run_cfg, inventory, shard_index, state.process_index, runtime)

    mine = assign(inventory.items, num_shards, shard_index, state.num_processes, state.process_index)
    finished = done_ids(parts_dir, retry_failed)
    todo = read_order([it for it in mine if it.id not in finished])
    log.info("part %d/%d, process %d/%d: %d images (%d of %d already done); %d inputs skipped "
             "as not images, %d input errors", shard_index, num_shards, state.process_index,
             state.num_processes, len(todo), len(mine) - len(todo), len(mine),
             sum(inventory.skipped.values()), len(inventory.errors))

    spec = OutputSpec(out, post.threshold, icfg.save_probs, icfg.save_overlays, icfg.report,
                      post.steps)
    row_log = RowLog(parts_dir / f"rows-p{shard_index:04d}-r{state.process_index:03d}.jsonl")
    try:
        stats = process_items(todo, predictor, image_size, icfg, spec, row_log,
                              show_progress=state.is_local_main_process)
    finally:
        row_log.close()
    stats.update(part=shard_index, rank=state.process_index, world_size=state.num_processes,
                 assigned=len(mine), threads=threads.as_dict())
    atomic_write_text(parts_dir / f"done-p{shard_index:04d}-r{state.process_index:03d}-of-"
                      f"{state.num_processes:03d}.json", json.dumps(stats, indent=1))
    # Every process of this part is done before anyone looks: then the main process alone
    # says what is left and merges (a rank finishing first would report its siblings missing).
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    complete, missing = parts_done(parts_dir, num_shards)
    if not complete:
        log.info("part %d of %d done; part(s) %s of this --num-shards %d job not finished yet "
                 "(the last part to finish merges, or run --merge %s when they are)",
                 shard_index, num_shards, ", ".join(map(str, missing)), num_shards, out)
        return None
    return merge(out)


def _run_config(ckpt_cfg: Config, cfg: Config, image_size: int) -> Config:
    """The checkpoint's config with this run's infer (image_size resolved) and tracking
    sections."""
    return replace(ckpt_cfg, infer=replace(cfg.infer, image_size=image_size),
                   tracking=cfg.tracking)


def applied_postprocess(icfg: InferConfig, meta: dict[str, Any]) -> tuple[Postprocess, str]:
    """The threshold and post-processing this run applies, and where they come from: what
    the command line (or config) says, else the checkpoint's validation choice
    (`meta["postprocess"]`, written at the end of training), else 0.5 and none."""
    chosen = Postprocess.from_meta(meta)
    threshold = icfg.threshold
    sources = []
    if threshold is None:
        threshold = chosen.threshold if chosen else DEFAULT_THRESHOLD
        sources.append("threshold from the checkpoint's validation" if chosen else
                       "threshold default")
    else:
        sources.append("threshold given")
    if icfg.postprocess == "auto":
        steps = chosen.steps if chosen else ()
        sources.append("post-processing from the checkpoint's validation" if chosen else
                       "post-processing default (the checkpoint holds no choice)")
    else:
        steps = Postprocess.parse(icfg.postprocess).steps
        sources.append("post-processing given")
    return Postprocess(float(threshold), steps), "; ".join(sources)


def _checkpoint_record(given: str | Path | Sequence[str | Path], members: list[Path],
                       digests: list[str], meta: dict) -> dict[str, Any]:
    """run.json's (and summary.json's) "checkpoint": path, sha256 and metadata of the model,
    or for an ensemble what was given, and every member's path and sha256."""
    if len(members) == 1:
        return {"path": str(members[0].resolve()), "sha256": digests[0], "meta": _plain(meta)}
    given = [given] if isinstance(given, (str, Path)) else list(given)
    return {"path": ", ".join(str(Path(g).resolve()) for g in given), "sha256": None,
            "meta": _plain(meta),
            "members": [{"path": str(p.resolve()), "sha256": d}
                        for p, d in zip(members, digests, strict=True)]}


def _write_run_files(parts_dir: Path, signature: dict, checkpoint: dict[str, Any],
                     run_cfg: Config, inventory: Inventory, part: int, rank: int,
                     runtime: dict[str, Any]) -> None:
    """run.json (settings, checkpoint, config) and this part's inventory (input errors and
    skip counts, the same for every part; the merge takes the union)."""
    if rank == 0:
        run = {"signature": signature, "checkpoint": checkpoint,
               "runtime": runtime, "config": to_dict(run_cfg)}
        atomic_write_text(parts_dir / "run.json", json.dumps(run, indent=1))
        inv = {"errors": inventory.errors, "skipped": dict(inventory.skipped),
               "shard_splits": inventory.shard_splits,
               "images": len(inventory.items) + len(inventory.errors),
               "masks_found": inventory.masks_found, "masks_unused": inventory.masks_unused}
        atomic_write_text(parts_dir / f"inventory-p{part:04d}.json", json.dumps(inv, indent=1))


def _plain(value: Any) -> Any:
    """JSON-safe copy of checkpoint metadata (numbers, strings, lists, dicts)."""
    return json.loads(json.dumps(value, default=str))


def make_loader(items: list[Item], image_size: int, icfg: InferConfig, preview_side: int,
                pin_memory: bool) -> Iterator[dict[str, Any]]:
    """Workers decode and resize; batches keep failures alongside the good images.

    With pinned memory (CUDA) a worker decodes a whole batch, pinned as it arrives. Otherwise
    each worker decodes single images and this process stacks them into batches: the first
    batch is ready when every worker has decoded its share of it, not when one worker has
    decoded all of it (on 2 cores with 2 batches in all, the wait for the first batch is a
    large part of the job's time)."""
    if pin_memory:
        workers = min(icfg.num_workers or 0, max(1, math.ceil(len(items) / icfg.batch_size)))
        return iter(DataLoader(ItemDataset(items, image_size, preview_side),
                               batch_size=icfg.batch_size, shuffle=False, num_workers=workers,
                               collate_fn=collate, pin_memory=True, persistent_workers=False,
                               prefetch_factor=2 if workers else None,
                               worker_init_fn=WorkerInit() if workers else None))
    workers = min(icfg.num_workers or 0, len(items))
    # Two batches in flight, as with whole batches per worker.
    prefetch = max(2, math.ceil(2 * icfg.batch_size / workers)) if workers else None
    loader = DataLoader(ItemDataset(items, image_size, preview_side), batch_size=None,
                        shuffle=False, num_workers=workers, collate_fn=_one_sample,
                        persistent_workers=False, prefetch_factor=prefetch,
                        worker_init_fn=WorkerInit() if workers else None)
    return _batched(iter(loader), icfg.batch_size)


def _one_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """The loader's per-sample 'collate': the sample as the worker made it."""
    return sample


def _batched(samples: Iterator[dict[str, Any]], batch_size: int) -> Iterator[dict[str, Any]]:
    """Group single samples, in order, into `collate`d batches of `batch_size` (the last may
    be smaller)."""
    chunk: list[dict[str, Any]] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == batch_size:
            yield collate(chunk)
            chunk = []
    if chunk:
        yield collate(chunk)


def process_items(items: list[Item], predictor: Predictor | Ensemble, image_size: int,
                  icfg: InferConfig,
                  spec: OutputSpec, row_log: RowLog, show_progress: bool = True) -> dict[str, Any]:
    """The loop: decode (workers) → forward (here) → finish (threads) → rows (here)."""
    start = time.perf_counter()
    counts = {"images": 0, "errors": 0, "forward_s": 0.0}
    if not items:
        return _loop_stats(counts, time.perf_counter() - start)
    preview_side = icfg.overlay_max_side if spec.save_overlays else (THUMB_SIDE if spec.thumbs else 0)
    # The decode workers fork here, before any thread exists in this process.
    batches = make_loader(items, image_size, icfg, preview_side,
                          pin_memory=predictor.device.type == "cuda")
    threads = icfg.post_threads or 1
    max_pending = 2 * threads + icfg.batch_size  # bounds memory: full-size maps live only here
    bar = tqdm(total=len(items), unit="img", disable=not show_progress, desc="infer")
    pending: set[cf.Future] = set()

    def record(row: dict[str, Any]) -> None:
        row_log.append(row)
        counts["errors"] += row["status"] == "error"
        counts["images"] += 1
        bar.update(1)

    def drain(limit: int) -> None:
        """Record every finished image; block until at most `limit` are still pending."""
        while True:
            for fut in [f for f in pending if f.done()]:
                pending.discard(fut)
                record(fut.result())
            if len(pending) <= limit:
                return
            cf.wait(pending, return_when=cf.FIRST_COMPLETED)

    # The bar closes also when a full disk stops the run, so the error is the last line.
    with cf.ThreadPoolExecutor(threads, thread_name_prefix="finish") as pool, \
            contextlib.closing(bar):
        for batch in batches:
            for failed in batch["failed"]:
                if failed.get("environmental"):
                    raise InferenceError(failed["error"])
                item = items[failed["index"]]
                record({"id": item.id, "input": item.origin, "status": "error",
                        "reason": failed["error"], **({"split": item.split} if item.split else {})})
            if batch["images"] is None:
                continue
            t0 = time.perf_counter()
            probs = predictor(batch["images"])
            counts["forward_s"] += time.perf_counter() - t0
            for sample, prob in zip(batch["good"], probs, strict=True):
                drain(max_pending - 1)
                pending.add(pool.submit(_finish_safely, items[sample["index"]], sample, prob, spec))
        drain(0)
    return _loop_stats(counts, time.perf_counter() - start)


def _loop_stats(counts: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {"images": counts["images"], "errors": counts["errors"], "seconds": round(seconds, 3),
            "forward_seconds": round(counts["forward_s"], 3),
            "images_per_s": round(counts["images"] / seconds, 3) if counts["images"] else None}


def _finish_safely(item: Item, sample: dict[str, Any], prob: torch.Tensor, spec: OutputSpec) -> dict:
    """`finish_item`, with any failure of this image recorded as its error row instead of
    raised (`_finish_or_error_row`); a shard sample's row names its split."""
    row = _finish_or_error_row(item, sample, prob, spec)
    if item.split:
        row["split"] = item.split
    return row


def _finish_or_error_row(item: Item, sample: dict[str, Any], prob: torch.Tensor,
                         spec: OutputSpec) -> dict:
    """Any failure of this image (whatever its type: cv2.error, numpy, Pillow, MemoryError)
    becomes the image's error row. A failure of the machine (disk full, read-only folder, I/O
    error) is not the image's: it stops the run with an InferenceError and no row, so the
    rerun does the image again."""
    try:
        return finish_item(item, sample, prob, spec)
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


# --------------------------------------------------------------------------- merge


def _collect_rows(parts_dir: Path) -> list[dict[str, Any]]:
    """All part rows, one per id (an 'ok' row wins over others), sorted by id."""
    best: dict[str, dict[str, Any]] = {}
    rank = {"ok": 0, "failed": 1, "no_truth": 2, "error": 3}
    for path in sorted(parts_dir.glob("rows-*.jsonl")):
        for row in read_rows(path):
            old = best.get(row["id"])
            if old is None or rank.get(row["status"], 9) < rank.get(old["status"], 9):
                best[row["id"]] = row
    return [best[k] for k in sorted(best)]


def with_scores(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Add the six ISIC scores (from lesionseg.metrics) to every 'ok' row; return the counts."""
    scored = [r for r in rows if r["status"] == "ok"]
    counts = torch.tensor([[r["tp"], r["fp"], r["fn"], r["tn"]] for r in scored],
                          dtype=torch.int64).reshape(-1, 4)
    if scored:
        per_image = {k: v.tolist() for k, v in scores(counts).items()}
        for i, row in enumerate(scored):
            for name in METRIC_NAMES:
                row[name] = per_image[name][i]
            row["iou"] = row["jaccard"]
    return rows, counts


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


def merge(out: str | Path, report: bool | None = None) -> dict[str, Any]:
    """Combine every part under `out` into metrics.csv, errors.csv, summary.json (and
    report.html): rows deduplicated by id and sorted. Safe to run again at any time."""
    from lesionseg.report import write_report

    out = Path(out)
    parts_dir = out / PARTS
    if not (parts_dir / "run.json").is_file():
        raise InferenceError(f"{out}: no inference run here (missing {PARTS}/run.json)")
    run = json.loads((parts_dir / "run.json").read_text())
    num_shards = run["signature"]["num_shards"]
    complete, missing = parts_done(parts_dir, num_shards)
    if not complete:
        log.warning("%s: part(s) %s not finished; merging what is there", out,
                    ", ".join(map(str, missing)))
    if complete:
        _remove_stale_temps(out)
    rows, counts = with_scores(_collect_rows(parts_dir))
    inventory = _merged_inventory(parts_dir)
    metric_rows = [{**r, "mask": f"{MASKS}/{r['id']}_Segmentation.png",
                    "pred_fraction": _fraction(r.get("pred_area"), r)} for r in rows
                   if r["status"] in ("ok", "failed", "no_truth")]
    error_rows = inventory["errors"] + [
        {"input": r["input"], "id": r["id"], "reason": r["reason"]}
        for r in rows if r["status"] in ("error", "failed")]
    error_rows.sort(key=lambda e: (e["id"], e["input"]))
    write_csv(out / "metrics.csv", METRIC_COLUMNS, metric_rows)
    write_csv(out / "errors.csv", ERROR_COLUMNS, error_rows)
    summary = _summary(run, rows, counts, inventory, error_rows, parts_dir, complete, missing)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    if report if report is not None else run["config"]["infer"]["report"]:
        write_report(out / "report.html", summary, metric_rows, out / THUMBS)
    if complete and run["config"]["infer"].get("log_wandb"):
        from lesionseg.tracking import log_inference

        log_inference(out, summary, metric_rows, out / THUMBS, run["config"].get("tracking", {}),
                      images=run["config"]["infer"].get("report_images", 60))
    log.info("merged %d images into %s: %d scored, mean Dice %s, %d errors", len(rows), out,
             int(counts.shape[0]), _fmt(summary["means"].get("dice")), len(error_rows))
    return summary


def _fraction(area: int | None, row: dict[str, Any]) -> float | None:
    """Predicted lesion area as a fraction of the image (None for rows of an older version)."""
    if area is None or not row.get("height") or not row.get("width"):
        return None
    return round(area / (row["height"] * row["width"]), 6)


def _remove_stale_temps(out: Path) -> None:
    """Delete temporary files a killed writer left (`.<name>.*.tmp`): the ISIC scorer would
    pair them by the id in their names. Only once every part is done, so no writer is live."""
    for folder in (MASKS, PROBS, OVERLAYS, THUMBS):
        for tmp in (out / folder).glob(".*.tmp"):
            log.warning("removing %s, left by a killed writer", tmp)
            tmp.unlink(missing_ok=True)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) and not math.isnan(value) else "n/a"


def _merged_inventory(parts_dir: Path) -> dict[str, Any]:
    """Input errors and skip counts (every part found the same; union of their files)."""
    errors: dict[tuple[str, str], dict[str, str]] = {}
    merged: dict[str, Any] = {"skipped": {}, "images": 0, "masks_found": 0, "masks_unused": 0,
                              "shard_splits": {}}
    for path in sorted(parts_dir.glob("inventory-p*.json")):
        inv = json.loads(path.read_text())
        for e in inv["errors"]:
            errors[(e["input"], e["id"])] = e
        for key in ("skipped", "images", "masks_found", "masks_unused", "shard_splits"):
            merged[key] = inv.get(key, merged[key])
    merged["errors"] = list(errors.values())
    return merged


def _summary(run: dict, rows: list[dict], counts: torch.Tensor, inventory: dict,
             error_rows: list[dict], parts_dir: Path, complete: bool, missing: list[int]) -> dict:
    """summary.json: macro means, counts, failures, checkpoint, config, throughput."""
    means = summarize(counts)
    means["iou"] = means["jaccard"]
    status = {s: sum(1 for r in rows if r["status"] == s) for s in ("ok", "failed", "no_truth", "error")}
    timing = [json.loads(p.read_text()) for p in sorted(parts_dir.glob("done-*.json"))]
    return {
        "complete": complete, "missing_parts": missing, "num_shards": run["signature"]["num_shards"],
        "images_found": inventory["images"],
        "masks_written": status["ok"] + status["failed"] + status["no_truth"],
        "scored": status["ok"], "metrics_failed": status["failed"], "without_truth": status["no_truth"],
        "errors": len(error_rows), "skipped_files": inventory["skipped"],
        "shard_splits_read": inventory["shard_splits"],
        "inputs": run["signature"]["inputs"], "masks": run["signature"]["masks"],
        "truth_masks_found": inventory["masks_found"], "truth_masks_unused": inventory["masks_unused"],
        "means": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in means.items()},
        "failures": [{"id": e["id"], "input": e["input"], "reason": e["reason"]} for e in error_rows],
        "threshold": run["signature"].get("threshold"),
        "postprocess": run["signature"].get("postprocess", "none"),
        "tta": run["signature"].get("tta", False),
        "device": run.get("runtime", {}).get("device"),
        "backend": run.get("runtime", {}).get("backend", "torch"),
        "precision": run.get("runtime", {}).get("precision"),
        "precision_reason": run.get("runtime", {}).get("precision_reason"),
        "checkpoint": run["checkpoint"], "config": run["config"],
        "throughput": {"images_per_s": round(sum(t.get("images_per_s") or 0 for t in timing), 3),
                       "note": "sum over processes of images/s in their last session",
                       "processes": timing},
    }
