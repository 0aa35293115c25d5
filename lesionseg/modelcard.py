"""MODEL_CARD.md: what a checkpoint is, what it was trained on, how well it did, what it is
for, and how it was made, written from the checkpoint itself (its config and metadata) and
the shard manifest it was trained on.

Written beside every best.pt at the end of training and beside every export; a card beside
exports also lists every exported file in its folder that came from the same checkpoint,
with the parity each file carries.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lesionseg import __version__
from lesionseg.checkpoint import build_model_from_checkpoint
from lesionseg.config import Config
from lesionseg.data.shard_format import read_manifest
from lesionseg.errors import UserError
from lesionseg.files import atomic_write_text, sha256_file
from lesionseg.metrics import degenerate_checkpoint
from lesionseg.postprocess import Postprocess
from lesionseg.runtime import ExportedFileError, export_format, read_metadata
from lesionseg.weights import torch_load

log = logging.getLogger(__name__)

CARD_NAME = "MODEL_CARD.md"
EXPORT_SUFFIXES = (".onnx", ".ts", ".pt", ".pth", ".torchscript")

INTENDED_USE = """\
- **Research use only. Not a medical device**: not for diagnosis, screening or any clinical
  decision, and not validated for any of them.
- Trained on **dermoscopy** images (ISIC-style, or synthetic ones for a demo), not on clinical
  photographs taken with ordinary cameras or phones: expect it to fail on those.
- It outlines one lesion per image; it does not say whether a lesion is benign or malignant.
- Skin types, devices and lesion kinds under-represented in the training data (ISIC 2016 is
  mostly light skin) will be segmented worse; check on your own data before relying on it.
- The scores in this card come from the validation split of its own data set; they are not an
  estimate of performance on another population."""


def architecture(model: Any, cfg: Config) -> str:
    """One line naming the network and its parts."""
    return (f"{type(model).__name__}: torchvision MobileNetV2 encoder, decoder widths "
            f"{list(cfg.model.decoder_channels)} at strides 16, 8, 4, 2, transposed-conv "
            "logit head; ImageNet normalization and pad-to-32 inside the model")


def _training_data(cfg: Config) -> list[str]:
    """Lines about the shard folder: manifest name, counts per split, split seed, sources."""
    folder = cfg.data.shards
    if not folder:
        return ["- shard folder: not recorded in the checkpoint's config"]
    try:
        manifest = read_manifest(folder)
    except UserError as e:
        return [f"- shard folder: `{folder}` (manifest not readable here: {e})"]
    splits = manifest["splits"]
    options = manifest.get("options", {})
    counts = ", ".join(f"{s} {splits[s]['count']}" for s in splits)
    return [f"- shard manifest: `{Path(folder).name}/manifest.json` ({folder}), packed by "
            f"lesionseg {manifest.get('lesionseg_version', '?')}",
            f"- images: {manifest.get('total_samples')} ({counts})",
            f"- train/val split: val fraction {options.get('val_fraction')}, split seed "
            f"{options.get('split_seed')} (by a hash of seed and case id)",
            f"- stored at longest side {options.get('max_side')} px; sources: "
            + ", ".join(f"`{s}`" for s in manifest.get("sources", [])[:4])]


def _recipe(cfg: Config) -> list[str]:
    d, m, o, lo, t = cfg.data, cfg.model, cfg.optim, cfg.loss, cfg.train
    length = f"{o.max_steps} steps" if o.max_steps else f"{o.epochs} epochs"
    return [f"- {length}, batch {d.batch_size} per process × {o.grad_accum_steps} accumulation, "
            f"{d.image_size}² crops, seed {t.seed}, mixed precision {t.mixed_precision}",
            (f"- initialised from every weight of `{m.init_from}` (fine-tuned)"
             if m.init_from else
             "- encoder weights: " + (f"`{m.encoder_weights}`" if m.encoder_weights
                                      else "none (randomly initialised)"))
            + f", frozen: {m.freeze_encoder}",
            f"- AdamW lr {o.lr} (encoder × {o.encoder_lr_mult}), weight decay {o.weight_decay}, "
            f"warm-up {o.warmup_steps} steps, cosine to × {o.min_lr_ratio}, grad clip {o.grad_clip}",
            f"- loss: BCE × {lo.bce_weight} + (1 − Dice) × {lo.dice_weight} + (1 − IoU) × "
            f"{lo.iou_weight}, per image: {lo.per_image}",
            f"- augmentation: scale ≥ {d.scale_min}, flips h {d.hflip} / v {d.vflip}, rotation "
            f"± {d.rotate_degrees}°, colour jitter {d.color_jitter}"
            + (f", skin crops {d.skin_crop_prob}" if d.skin_crop_prob else ""),
            f"- weights kept: train.select={t.select}"]


def _warning(meta: dict[str, Any]) -> list[str]:
    """A loud first section when the weights predict (almost) nothing or everything on val
    at 0.5 and tuning found no threshold at which they do not."""
    why = degenerate_checkpoint(meta)
    return [f"> **WARNING — degenerate model:** {why}.", ""] if why else []


def _metrics(meta: dict[str, Any]) -> list[str]:
    val = meta.get("val") or {}
    lines = []
    if val:
        lines.append("| metric | validation |\n| --- | --- |")
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in val.items()]
        lines.append(f"\nMeasured at step {meta.get('step')} (epoch {meta.get('epoch')}), "
                     "threshold 0.5, no post-processing, at the training image size.")
    else:
        lines.append("No validation metrics are stored in this checkpoint.")
    oof = meta.get("oof")
    if not oof:
        lines.append("\n**Out-of-fold metrics:** not measured: this model was trained on one "
                     "train/val split, without cross-validation folds; there are no out-of-fold "
                     "predictions.")
        return lines
    return [*lines, *_oof_table(oof)]


def _oof_table(oof: dict[str, Any]) -> list[str]:
    """The cross-validation's out-of-fold scores as a table: pooled over every fold's held-out
    cases, and this model's own fold."""
    columns = [k for k, v in oof.items() if isinstance(v, dict)]  # pooled, fold_I
    names = sorted({n for c in columns for n in oof[c]}, key=lambda n: (n != "dice", n))
    header = " | ".join(c.replace("_", " ") for c in columns)
    rows = [f"| {n} | " + " | ".join(_cell(oof[c].get(n)) for c in columns) + " |" for n in names]
    return [f"\n**Out-of-fold metrics** ({oof.get('folds')} folds, {oof.get('cases')} cases; "
            f"threshold {oof.get('threshold')}, post-processing {oof.get('postprocess')}):", "",
            f"| metric | {header} |", "| --- |" + " --- |" * len(columns), *rows]


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _postprocess(meta: dict[str, Any]) -> list[str]:
    post = Postprocess.from_meta(meta)
    if post is None:
        return ["- none chosen (the checkpoint holds no choice): threshold 0.5, no steps"]
    stored = meta["postprocess"]
    if stored.get("tuned") is False:
        return [f"- threshold **{post.threshold:g}**, post-processing **{post.name}**: "
                f"{stored.get('why')}",
                f"- val Jaccard {stored.get('val_jaccard')} with it"]
    return [f"- threshold **{post.threshold:g}**, post-processing **{post.name}** (chosen on "
            f"{stored.get('val_images')} {stored.get('chosen_on', 'validation images')} by mean "
            "Jaccard)",
            f"- val Jaccard {stored.get('val_jaccard')} with it, "
            f"{stored.get('val_jaccard_default')} at 0.5 without post-processing"]


def _quality(meta: dict[str, Any]) -> list[str]:
    """The per-image quality control and the probability calibration (lesionseg.quality)."""
    quality, cal = meta.get("quality"), meta.get("calibration")
    if not quality:
        lines = ["- not fitted (the checkpoint holds no fit): inference's expected Dice uses "
                 "the fixed maps of lesionseg.quality"]
    else:
        models = {m["feature"]: m for m in quality.get("dice_models", [])}
        # the fitted TTA signal: "border_spread" now; older checkpoints fitted "spread" or,
        # before it, "disagreement" (inference uses the fixed map for those)
        tta = next((f for f in ("border_spread", "spread", "disagreement") if f in models),
                   "border_spread")
        named = {"border_spread": "border-weighted spread"}.get(tta, tta)
        lines = ["- per image, inference writes `uncertainty` (with flip TTA: the spread of the "
                 "four views' probabilities, their mean absolute deviation from the mean per "
                 "predicted-lesion pixel, times 1 + the share of the image's edge pixels inside "
                 "the mask; with --no-tta: the share of pixels with probability in (0.3, 0.7) "
                 "relative to the predicted area), `expected_dice` and `needs_review` (expected "
                 "Dice below infer.review_below, an uncertainty above all but "
                 "infer.review_share of the val images', or no pixel above the threshold: the "
                 "mask is then the most confident region)",
                 f"- expected Dice from the {named}"
                 + ("" if tta == "border_spread" else
                    " (fitted before the border weighting: inference uses the fixed map)")
                 + ": "
                 f"{models.get(tta, {}).get('source', 'fixed map')}; without TTA: "
                 f"{models.get('uncertain_share', {}).get('source', 'fixed map')}. A fit needs "
                 "40 val images, else the fixed map; in an ensemble each model is rated by "
                 "its own fit",
                 f"- AUROC of the {named} for val Dice < 0.8: "
                 f"{quality.get('val_auroc')} "
                 f"({quality.get('val_images')} val images; in-sample)"]
    if cal:
        lines.append(f"- pixel probabilities: ECE on val {cal.get('ece_before')} before, "
                     f"{cal.get('ece_after')} after temperature **{cal.get('temperature')}** "
                     f"(fitted on val by log-loss, at {cal.get('measured_at', 'the model size')}"
                     f"); {'applied' if cal.get('applied') else 'not applied'} to the probability "
                     "maps inference writes (masks do not change)")
    return lines


def _exports(folder: Path, digest: str) -> list[str]:
    """Table rows of the exported files in `folder` that came from the checkpoint `digest`."""
    rows = []
    for path in sorted(p for p in folder.iterdir() if p.suffix in EXPORT_SUFFIXES):
        if export_format(path) is None:
            continue
        try:
            meta = read_metadata(path)
        except ExportedFileError:
            continue
        if meta.get("checkpoint_sha256") != digest:
            continue
        parity = meta.get("parity") or {}
        rows.append(f"| `{path.name}` | {meta['file_format']} | {meta['precision']} | "
                    f"{meta['input']['dtype']} | {path.stat().st_size / 1e6:.1f} MB | "
                    f"{parity.get('max_abs_diff', float('nan')):.2e} | "
                    f"{100 * parity.get('mask_agreement', float('nan')):.4f}% |")
    if not rows:
        return []
    return ["## Exported files", "",
            "Each is the BatchNorm-folded eval model with its preprocessing inside (RGB "
            "N×3×H×W in, H, W ≥ 32, probabilities N×H×W out); parity is against PyTorch fp32 "
            "on synthetic images of four sizes (`lesionseg export --verify` repeats it).", "",
            "| file | format | precision | input | size | max \\|Δp\\| | masks equal |",
            "| --- | --- | --- | --- | --- | --- | --- |", *rows, ""]


def render_model_card(checkpoint: str | Path, export_folder: Path | None = None) -> str:
    """The card's Markdown text for `checkpoint` (and the exports found in `export_folder`)."""
    checkpoint = Path(checkpoint)
    model, cfg, meta = build_model_from_checkpoint(checkpoint)
    n = sum(p.numel() for p in model.parameters())
    arch = architecture(model, cfg)
    digest = sha256_file(checkpoint)
    written_by = torch_load(checkpoint, UserError, "checkpoint", "unreadable").get(
        "lesionseg_version", "?")
    lines = [
        f"# Model card: lesionseg skin-lesion segmentation (`{checkpoint.name}`)", "",
        *_warning(meta),
        "## Model", "",
        f"- {arch}",
        f"- parameters: {n:,} ({n / 1e6:.2f} M)",
        "- input: an RGB dermoscopy image, resized to "
        f"{cfg.data.image_size}×{cfg.data.image_size}; output: a lesion probability per pixel, "
        "upsampled to the original size, thresholded and post-processed into a 0/255 mask",
        f"- checkpoint sha256: `{digest}`", "",
        "## Training data", "", *_training_data(cfg), "",
        "## Recipe", "", *_recipe(cfg), "",
        "## Metrics", "", *_metrics(meta), "",
        "## Threshold and post-processing", "", *_postprocess(meta), "",
        "## Quality control and calibration", "", *_quality(meta), "",
        "## Intended use and limitations", "", INTENDED_USE, "",
        *(_exports(export_folder, digest) if export_folder else []),
        "## How it was made", "",
        f"- trained with lesionseg {written_by} (this card: lesionseg {__version__})",
        f"- the full resolved config is embedded in `{checkpoint.name}` and saved as "
        "`config.yaml` in the training run folder",
        f"- train.output_dir `{cfg.train.output_dir}`, data.shards `{cfg.data.shards}`", "",
    ]
    return "\n".join(lines)


def write_model_card(checkpoint: str | Path, out: str | Path | None = None) -> Path:
    """Write MODEL_CARD.md beside `checkpoint` (or at `out`), listing the exports beside it."""
    checkpoint = Path(checkpoint)
    out = Path(out) if out is not None else checkpoint.parent / CARD_NAME
    atomic_write_text(out, render_model_card(checkpoint, out.parent))
    log.info("model card written to %s", out)
    return out


def write_run_card(run_dir: str | Path) -> Path | None:
    """The card beside a training run's best.pt (the end of `lesionseg.train.loop.train`); None when the
    run wrote no best.pt."""
    best = Path(run_dir) / "best.pt"
    return write_model_card(best) if best.is_file() else None
