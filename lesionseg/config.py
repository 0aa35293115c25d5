"""One configuration tree for every job: dataclass defaults <- YAML file <- key=value overrides.

Merged with OmegaConf in struct mode, so an unknown key or a value of the wrong type is an
error that names the key; `validate` then checks ranges. The resolved tree is saved beside
every output (`save_config`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lesionseg.errors import UserError
from lesionseg.files import atomic_write_text


class ConfigError(UserError, ValueError):
    """A configuration problem a user can fix; the message names the key or the file."""

    shared = True  # every rank reads the same config


@dataclass
class DataConfig:
    shards: str | None = None  # packed shard folder holding manifest.json; null = build and use the demo set
    image_size: int = 384  # side of the square crops the model trains and validates at
    batch_size: int = 8  # images per process per step
    num_workers: int = 2  # DataLoader worker processes per rank (decode + augment)
    worker_start: str = "forkserver"  # how workers start: forkserver (safe, fast), spawn, or fork (can hang in a process running threads, CPython gh-112275)
    worker_timeout_s: float = 120.0  # a worker that sends no batch for this long is an error naming the rank (0 = wait forever)
    shuffle_buffer: int = 256  # samples held in the WebDataset shuffle buffer
    pin_memory: bool = True  # pinned host memory for faster host-to-GPU copies (CUDA only)
    on_error: str = "raise"  # a bad sample in a shard: raise (stop with its name) or skip (count and warn)
    cache: bool = True  # decode once into memory what every epoch decodes alike (val; train when its augmentation is flips/colour only) if it fits in cache_max_mb; false: always stream
    cache_max_mb: int = 4096  # memory per process data.cache may use (resized uint8 samples)
    soft_masks: bool = False  # train on each pixel's lesion share (area-resampled masks, 0-1) instead of nearest-sampled 0/1
    # Cross-validation (lesionseg/data/folds.py): the shards' train + val cases in K folds.
    folds: int = 0  # K folds; 0 = no cross-validation (train on train, validate on val)
    fold: str = "all"  # with folds: the fold held out for validation (0..K-1), or all (one after another)
    fold_seed: int = 0  # seed of the fold assignment (a hash of (seed, id))
    # Augmentation; null = chosen from the schedule's length (lesionseg/recipe.py).
    scale_min: float | None = None  # random-resized-crop: smallest area fraction of the image
    hflip: bool = True  # random horizontal flips
    vflip: bool = True  # random vertical flips (lesions have no up/down)
    rotate_degrees: float | None = None  # random rotation range (+/-); corners outside are filled
    color_jitter: float | None = None  # brightness/contrast/saturation jitter strength; 0 = off
    tint: float | None = None  # colour cast: each of R, G, B scaled by exp(U(-tint, tint)) per training crop (white balance); 0 = off; null = from the schedule (lesionseg/recipe.py)
    skin_tone: float = 0.0  # darker skin: half the training crops seen through added melanin, optical density U(0, skin_tone) (lesionseg/data/transforms.py); 0 = off
    grey_prob: float = 0.0  # share of training crops turned to greyscale (after the other colour changes; against colour cues such as skin tone); 0 = off
    sticker_prob: float = 0.25  # share of training crops that get a round colour-calibration sticker painted near an edge (lesionseg/data/stickers.py); 0 = off
    skin_crop_prob: float = 0.0  # share of training crops moved beside the lesion (none of it in view, an empty mask: skin alone is not lesion); needs crops (streamed training); 0 = off
    demo_cases: int = 160  # number of synthetic cases in the demo set built when shards is null
    demo_dir: str = "shards/demo"  # where the demo set's ISIC-layout source and shards are cached


@dataclass
class PackConfig:
    val_fraction: float = 0.1  # fraction of training cases sent to val, chosen by a hash of (seed, id)
    split_seed: int = 0  # seed of the train/val split
    # Store images with this longest side (downscaled only), 4/3 of the default image_size so
    # that whole-image crops are not upsampled; 0 keeps the original bytes.
    max_side: int = 512
    jpeg_quality: int = 95  # quality of re-encoded JPEGs
    shard_max_samples: int = 32  # at most this many samples per shard (ISIC 2016's ~800 training cases: ~25 shards, enough for 8 GPUs × 2 reader workers)
    shard_max_bytes: int = 1_000_000_000  # at most about this many bytes per shard (tar headers counted)
    workers: int = 2  # worker processes that decode and re-encode (output is the same for any count)
    on_error: str = "raise"  # bad case: raise (stop, name the files) or skip (report and go on)


@dataclass
class ModelConfig:
    encoder_weights: str | None = "imagenet"  # null (random), imagenet (torchvision cache) or a state-dict file
    freeze_encoder: bool = False  # no gradients to the encoder; its BatchNorm statistics stay fixed
    unfreeze_after_epochs: int = 0  # with freeze_encoder: train the encoder too from this epoch on (0 = never)
    decoder_channels: list[int] = field(default_factory=lambda: [96, 64, 48, 32])  # widths at strides 16, 8, 4, 2
    channels_last: bool = True  # NHWC memory format (faster convolutions on GPU and CPU)
    compile: bool = False  # torch.compile the model
    color_constancy: bool = False  # Shades-of-Gray colour constancy per image before the network (removes light casts and skin tone; off by default: a large bright sticker skews it, see docs/BENCHMARKS.md)
    init_from: str | None = None  # start from every weight of an earlier run's best.pt/last.pt (pretrain, then fine-tune); replaces encoder_weights and head_prior
    head_prior: float | None = 0.25  # a new model's initial lesion probability: logit head bias log(p/(1-p)), as RetinaNet's prior; null = PyTorch's init


@dataclass
class LossConfig:
    bce_weight: float = 1.0  # weight of binary cross-entropy
    dice_weight: float = 1.0  # weight of (1 - soft Dice)
    iou_weight: float = 1.0  # weight of (1 - soft IoU)
    smooth: float = 1.0  # smoothing term added to soft Dice/IoU numerator and denominator
    per_image: bool = True  # soft Dice/IoU per image then averaged (false: over the whole batch)
    pos_weight: float | None = None  # BCE weight of lesion pixels (null = 1)


@dataclass
class OptimConfig:
    # null = chosen from the encoder weights and the schedule (lesionseg/recipe.py).
    lr: float | None = None  # peak learning rate of the decoder (auto: 3e-3 random, 1e-3 pretrained)
    encoder_lr_mult: float | None = None  # encoder lr = lr * this (auto: 1 random, 0.1 pretrained)
    weight_decay: float = 1e-4  # AdamW weight decay
    epochs: int = 30  # epochs to train (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps to train; when > 0 it wins over epochs
    steps_per_epoch: int = 0  # optimizer steps per epoch; 0 = ceil(train images / (batch_size * world * grad_accum))
    grad_accum_steps: int = 1  # micro-batches accumulated per optimizer step
    warmup_steps: int | None = None  # linear warmup steps before the cosine decay (auto: 5%)
    min_lr_ratio: float = 0.01  # cosine decays to lr * this
    grad_clip: float = 1.0  # clip the gradient norm to this (0 = off)


@dataclass
class TrainConfig:
    mixed_precision: str = "no"  # no (fp32: bf16 cost 1.6 Dice points on the hard set), fp16 or bf16 (Accelerate autocast)
    seed: int = 0  # seeds weights, data order and every augmentation
    output_dir: str | None = None  # the run folder (best.pt, last.pt, config.yaml, states/); null: runs/<data.shards folder name>, runs/demo for the demo
    resume: str = "auto"  # auto (newest complete state in output_dir), none, or a state folder
    resume_with_changes: bool = False  # resume even when settings differ from the state's (not exact)
    val_every_steps: int = 0  # validate every N optimizer steps (0 = at the end of every epoch)
    # Which weights best.pt holds: final (the end of the schedule, as nnU-Net's
    # checkpoint_final: the cosine decay anneals into them, while the best of many validations
    # on a small val set is picked by its noise) or best (the best val train.best_metric).
    select: str = "final"
    best_metric: str = "dice"  # val metric logged as best (and picking best.pt with select=best)
    keep_states: int = 2  # full training states kept under output_dir/states
    save_every_steps: int = 0  # also save a state every N optimizer steps (0 = only at validation)
    log_every_steps: int = 10  # scalars logged every N optimizer steps
    max_bad_steps: int = 5  # abort after this many non-finite losses in a row
    num_threads: int = 0  # torch CPU threads per process (0 = leave torch's default)
    collective_timeout_s: float = 600.0  # longest wait for the other ranks (a step, a validation, a save); then an error naming the rank
    stop_grace_s: float = 120.0  # after a stop signal, a rank with no progress (no step, no val batch) for this long (waiting for a rank that stopped answering) exits 75 without saving; 0 = wait for the collective timeout
    deterministic: bool = False  # torch deterministic algorithms (needed for bit-exact resume on GPU)
    # After training, choose the threshold and post-processing on the val set (by Jaccard) and
    # store the choice in best.pt, where inference finds it.
    tune_postprocess: bool = True
    tune_min_images: int = 100  # choose only on at least this many val (or pooled out-of-fold) images; fewer: threshold 0.5 and the main region, and the card says why
    # Then fit the per-image quality control (expected Dice, review flag) and the probability
    # temperature on the val set and store them in best.pt (lesionseg.quality_fit).
    fit_quality: bool = True


@dataclass
class TrackingConfig:
    backend: str = "wandb"  # wandb or none
    project: str = "lesionseg"  # W&B project
    run_name: str | None = None  # W&B run name (default: the output_dir's name)
    group: str | None = None  # W&B group
    mode: str = "offline"  # offline, online or disabled; the WANDB_MODE environment variable wins
    dir: str | None = None  # where W&B writes its files (default: output_dir)
    log_images: int = 4  # validation images logged with prediction/truth overlays


@dataclass
class InferConfig:
    batch_size: int = 8  # images per forward pass
    num_workers: int | None = None  # decode workers per process (null: sized with the other threads, lesionseg/threadplan.py)
    worker_type: str = "auto"  # decode workers as thread or process; auto: threads on a CPU with up to 8 workers, else processes
    image_size: int = 0  # side the model sees; 0 = the checkpoint's data.image_size
    threshold: float | None = None  # probability above which a pixel is lesion (null = the checkpoint's choice, else 0.5)
    postprocess: str = "auto"  # auto (the checkpoint's choice), none, main (the region the model is surest of), fill (holes) or main+fill
    tta: bool = True  # average the image's and its h, v and h+v flips' predictions (4 forwards, as nnU-Net mirrors)
    refine: bool = True  # lesion-centred second pass: the crop round the first pass's lesion segmented again and pasted back (lesionseg.infer.refine)
    refine_max_zoom: float = 0.0  # the second pass's largest zoom; 0 = the training crops' own, 1/sqrt(data.scale_min) (a model trained without zoom gets no second pass)
    empty_fallback: float = 0.5  # a mask with no pixel above the threshold becomes the main region above this share of the image's highest probability (every dermoscopic image shows a lesion); 0 = leave it empty
    review_below: float = 0.8  # needs_review when an image's expected_dice is below this (lesionseg.quality)
    review_share: float = 0.1  # needs_review also when its uncertainty is above all but this share of the val images' (0 = off)
    mixed_precision: str = "auto"  # auto (fp16 on CUDA, bf16 on a CPU with AMX/AVX-512 BF16, else fp32), no, fp16 or bf16
    device: str = "auto"  # auto (CUDA when visible), cpu, cuda, or cuda:N (one process)
    backend: str = "torch"  # torch, or onnxruntime (a checkpoint is exported on the fly, parity-checked)
    save_probs: bool = False  # write 8-bit probability PNGs to probs/
    save_overlays: bool = False  # write overlay JPEGs to overlays/
    report: bool = True  # write report.html (and the thumbnails it shows) after merging
    post_threads: int = 0  # threads that upsample, threshold, encode PNGs and score (0: sized with the other threads)
    num_threads: int = 0  # torch CPU threads per process (0: sized with the other threads; CPU: all cores in turns with the stages, half beside them on a busy host)
    overlay_max_side: int = 1024  # longest side of the overlay JPEGs (--save-overlays)
    report_images: int = 60  # overlay thumbnails in report.html, shared by its galleries (worst, best, …)
    log_wandb: bool = False  # also log the results to W&B (tracking.*): per-image table with overlays, summary
    splits: list[str] = field(default_factory=list)  # of inputs with splits (ISIC roots and zips, shard folders): those scored ([] = test; a shard folder without test: val)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    infer: InferConfig = field(default_factory=InferConfig)


_CHOICES = {
    "data.on_error": ("raise", "skip"),
    "data.worker_start": ("forkserver", "spawn", "fork"),
    "pack.on_error": ("raise", "skip"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.best_metric": ("dice", "jaccard", "threshold_jaccard", "accuracy"),
    "train.select": ("final", "best"),
    "tracking.backend": ("wandb", "none"),
    "tracking.mode": ("offline", "online", "disabled"),
    "infer.mixed_precision": ("auto", "no", "fp16", "bf16"),
    "infer.backend": ("torch", "onnxruntime"),
    "infer.worker_type": ("auto", "thread", "process"),
    "infer.postprocess": ("auto", "none", "main", "fill", "main+fill"),
}


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {value!r} is not valid: {why}")


def default_output_dir(shards: str | None) -> str:
    """train.output_dir when not given: runs/<the shard folder's name>, runs/demo without
    shards (the demo)."""
    name = Path(str(shards)).name if shards else ""
    return f"runs/{name}" if name not in ("", ".", "..") else "runs/demo"


def validate(cfg: Config) -> Config:
    """Range and choice checks that types alone cannot express; raises ConfigError naming the key."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value == "False" and "no" in choices:
            # YAML reads a bare `no` (or `off`, `false`) as the boolean false, which a str field
            # keeps as "False": `train.mixed_precision=no` means "no".
            value = "no"
            setattr(getattr(cfg, section), name, value)
        _check(value in choices, key, value, f"choose one of {', '.join(choices)}")
    d, p, m, lo, o, t, i = cfg.data, cfg.pack, cfg.model, cfg.loss, cfg.optim, cfg.train, cfg.infer
    _check(d.image_size >= 32, "data.image_size", d.image_size, "must be at least 32")
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be at least 1")
    _check(cfg.model.head_prior is None or 0 < cfg.model.head_prior < 1, "model.head_prior",
           cfg.model.head_prior, "must be a probability in (0, 1), or null")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _check(d.worker_timeout_s >= 0, "data.worker_timeout_s", d.worker_timeout_s, "must be >= 0")
    _check(d.shuffle_buffer >= 1, "data.shuffle_buffer", d.shuffle_buffer, "must be at least 1")
    _check(d.scale_min is None or 0 < d.scale_min <= 1, "data.scale_min", d.scale_min,
           "must be in (0, 1], or null (auto)")
    _check(d.rotate_degrees is None or 0 <= d.rotate_degrees <= 180, "data.rotate_degrees",
           d.rotate_degrees, "must be in [0, 180], or null (auto)")
    _check(d.color_jitter is None or 0 <= d.color_jitter < 1, "data.color_jitter",
           d.color_jitter, "must be in [0, 1), or null (auto)")
    _check(d.tint is None or 0 <= d.tint <= 1, "data.tint", d.tint,
           "must be in [0, 1], or null (auto)")
    _check(0 <= d.skin_tone <= 3, "data.skin_tone", d.skin_tone, "must be in [0, 3]")
    _check(0 <= d.grey_prob <= 1, "data.grey_prob", d.grey_prob, "must be in [0, 1]")
    _check(0 <= d.sticker_prob <= 1, "data.sticker_prob", d.sticker_prob, "must be in [0, 1]")
    _check(0 <= d.skin_crop_prob < 1, "data.skin_crop_prob", d.skin_crop_prob, "must be in [0, 1)")
    _check(d.cache_max_mb >= 0, "data.cache_max_mb", d.cache_max_mb, "must be >= 0")
    _check(d.folds == 0 or d.folds >= 2, "data.folds", d.folds,
           "must be 0 (no cross-validation) or at least 2")
    _check(d.fold == "all" or (d.fold.isdigit() and (d.folds == 0 or int(d.fold) < d.folds)),
           "data.fold", d.fold, f"choose all or a fold number 0..{max(d.folds, 2) - 1}")
    _check(d.fold == "all" or d.folds >= 2, "data.fold", d.fold,
           "needs data.folds=K (the number of folds) too")
    _check(d.demo_cases >= 8, "data.demo_cases", d.demo_cases, "must be at least 8")
    _check(0 <= p.val_fraction < 1, "pack.val_fraction", p.val_fraction, "must be in [0, 1)")
    _check(p.max_side == 0 or p.max_side >= 32, "pack.max_side", p.max_side, "must be 0 or >= 32")
    _check(1 <= p.jpeg_quality <= 100, "pack.jpeg_quality", p.jpeg_quality, "must be in [1, 100]")
    _check(p.shard_max_samples >= 1, "pack.shard_max_samples", p.shard_max_samples, "must be >= 1")
    _check(p.shard_max_bytes >= 1, "pack.shard_max_bytes", p.shard_max_bytes, "must be >= 1")
    _check(p.workers >= 1, "pack.workers", p.workers, "must be >= 1")
    _check(len(m.decoder_channels) == 4, "model.decoder_channels", m.decoder_channels,
           "needs 4 widths (strides 16, 8, 4, 2)")
    _check(all(c >= 1 for c in m.decoder_channels), "model.decoder_channels", m.decoder_channels,
           "widths must be >= 1")
    _check(m.init_from is None or Path(m.init_from).is_file(), "model.init_from", m.init_from,
           "is not a file: give an earlier run's best.pt or last.pt")
    _check(m.unfreeze_after_epochs >= 0, "model.unfreeze_after_epochs", m.unfreeze_after_epochs, "must be >= 0")
    for name in ("bce_weight", "dice_weight", "iou_weight"):
        _check(getattr(lo, name) >= 0, f"loss.{name}", getattr(lo, name), "must be >= 0")
    _check(lo.bce_weight + lo.dice_weight + lo.iou_weight > 0, "loss.bce_weight",
           (lo.bce_weight, lo.dice_weight, lo.iou_weight), "the three loss weights cannot all be zero")
    _check(lo.smooth >= 0, "loss.smooth", lo.smooth, "must be >= 0")
    _check(lo.pos_weight is None or lo.pos_weight > 0, "loss.pos_weight", lo.pos_weight, "must be > 0")
    _check(o.lr is None or o.lr > 0, "optim.lr", o.lr, "must be > 0, or null (auto)")
    _check(o.encoder_lr_mult is None or o.encoder_lr_mult >= 0, "optim.encoder_lr_mult",
           o.encoder_lr_mult, "must be >= 0, or null (auto)")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(o.epochs >= 1 or o.max_steps > 0, "optim.epochs", o.epochs, "must be >= 1 unless max_steps > 0")
    _check(o.max_steps >= 0, "optim.max_steps", o.max_steps, "must be >= 0")
    _check(o.steps_per_epoch >= 0, "optim.steps_per_epoch", o.steps_per_epoch, "must be >= 0")
    _check(o.grad_accum_steps >= 1, "optim.grad_accum_steps", o.grad_accum_steps, "must be >= 1")
    _check(o.warmup_steps is None or o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps,
           "must be >= 0, or null (auto)")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0")
    _check(t.val_every_steps >= 0, "train.val_every_steps", t.val_every_steps, "must be >= 0")
    _check(t.keep_states >= 1, "train.keep_states", t.keep_states, "must be >= 1")
    _check(t.save_every_steps >= 0, "train.save_every_steps", t.save_every_steps, "must be >= 0")
    _check(t.log_every_steps >= 1, "train.log_every_steps", t.log_every_steps, "must be >= 1")
    _check(t.max_bad_steps >= 1, "train.max_bad_steps", t.max_bad_steps, "must be >= 1")
    _check(t.tune_min_images >= 1, "train.tune_min_images", t.tune_min_images, "must be >= 1")
    _check(t.num_threads >= 0, "train.num_threads", t.num_threads, "must be >= 0")
    _check(t.collective_timeout_s >= 10, "train.collective_timeout_s", t.collective_timeout_s,
           "must be at least 10 (seconds)")
    _check(t.stop_grace_s >= 0, "train.stop_grace_s", t.stop_grace_s, "must be >= 0 (seconds)")
    if t.output_dir is None:  # each data set its own run folder: a demo never meets ISIC's
        t.output_dir = default_output_dir(d.shards)
    _check(bool(t.output_dir), "train.output_dir", t.output_dir, "must not be empty")
    _check(all(s in ("train", "val", "test") for s in i.splits), "infer.splits", list(i.splits),
           "choose from train, val, test (e.g. infer.splits=[train,test])")
    _check(bool(t.resume), "train.resume", t.resume, "use auto, none or a state folder")
    _check(cfg.tracking.log_images >= 0, "tracking.log_images", cfg.tracking.log_images, "must be >= 0")
    _check(i.batch_size >= 1, "infer.batch_size", i.batch_size, "must be at least 1")
    _check(i.num_workers is None or i.num_workers >= 0, "infer.num_workers", i.num_workers,
           "must be >= 0 (or null: sized with the other threads)")
    _check(i.image_size == 0 or i.image_size >= 32, "infer.image_size", i.image_size, "must be 0 or >= 32")
    _check(i.threshold is None or 0 < i.threshold < 1, "infer.threshold", i.threshold,
           "must be in (0, 1), or null (the checkpoint's choice)")
    _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", i.device) is not None, "infer.device", i.device,
           "choose auto, cpu, cuda or cuda:N")
    _check(i.post_threads >= 0, "infer.post_threads", i.post_threads, "must be >= 0")
    _check(i.num_threads >= 0, "infer.num_threads", i.num_threads, "must be >= 0")
    _check(i.overlay_max_side >= 32, "infer.overlay_max_side", i.overlay_max_side, "must be >= 32")
    _check(i.report_images >= 0, "infer.report_images", i.report_images, "must be >= 0")
    _check(i.refine_max_zoom == 0 or i.refine_max_zoom >= 1, "infer.refine_max_zoom",
           i.refine_max_zoom, "must be 0 (the training crops' zoom) or >= 1 (1 = no second pass)")
    _check(0 <= i.empty_fallback < 1, "infer.empty_fallback", i.empty_fallback,
           "must be in [0, 1)")
    _check(0 <= i.review_below <= 1, "infer.review_below", i.review_below, "must be in [0, 1]")
    _check(0 <= i.review_share < 1, "infer.review_share", i.review_share, "must be in [0, 1)")
    return cfg


def _merge(base: DictConfig, other: Any, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        if "not in" in msg or "Key '" in msg and "not" in msg:
            raise ConfigError(f"{origin}: unknown config key '{key}'") from None
        raise ConfigError(f"{origin}: config key '{key}': {msg}") from None


def parse_overrides(overrides: list[str]) -> DictConfig:
    """Turn ['optim.lr=0.01', …] into a DictConfig; a malformed item is an error naming it."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.001)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"overrides: {str(e).splitlines()[0]}") from None


def load_config(config_file: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- key=value overrides, validated; raises ConfigError before any work."""
    merged = OmegaConf.structured(Config)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml errors come in several types
            raise ConfigError(f"config file {path}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file {path}: expected a mapping of sections (data:, model:, …)")
        merged = _merge(merged, loaded, str(path))
    if overrides:
        merged = _merge(merged, parse_overrides(overrides), "command line")
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}': {str(e).splitlines()[0]}") from None
    assert isinstance(cfg, Config)
    return validate(cfg)


def was_set(key: str, config_file: str | Path | None, overrides: list[str] | None) -> bool:
    """Whether the user set `key` (dotted) in the file or on the command line."""
    sources = [parse_overrides(overrides or [])]
    if config_file is not None:
        sources.append(OmegaConf.load(config_file))
    return any(OmegaConf.select(s, key, default="__unset__") != "__unset__" for s in sources)


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (for W&B, summary.json and checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a checkpoint's), tolerating keys a newer
    version added by ignoring sections and keys this version does not know."""
    # Built directly, not through OmegaConf's structured merge: the values were written by
    # `to_dict` of a validated Config, and the merge cost ~70 ms of every inference start-up.
    sections = {}
    for f in dataclasses.fields(Config):
        section = f.default_factory()  # type: ignore[misc]
        values = data.get(f.name)
        if isinstance(values, dict):
            names = {g.name for g in dataclasses.fields(section)}
            section = dataclasses.replace(section, **{k: v for k, v in values.items() if k in names})
        sections[f.name] = section
    return validate(Config(**sections))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically."""
    return atomic_write_text(path, to_yaml(cfg))
