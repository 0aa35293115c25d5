"""`lesionseg infer` / `jobs/infer.py`: the infer job's arguments, its config from them, and
the run (lesionseg.inference runs the job, lesionseg.infer.merge merges)."""

from __future__ import annotations

import argparse

from lesionseg.commands.launch import maybe_relaunch_cpu_ranks
from lesionseg.config import Config, InferConfig, load_config
from lesionseg.infer import InferenceError
from lesionseg.infer.merge import merge
from lesionseg.inference import job_part, run_inference
from lesionseg.postprocess import CHOICES as POSTPROCESS_CHOICES
from lesionseg.runtime import BACKENDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `jobs/infer.py` / `lesionseg infer`; unset flags take InferConfig defaults."""
    d = InferConfig()
    parser.description = """\
Segment every image in folders, archives (.zip, .tar, .tar.gz) and packed shard folders.
Writes under --out: masks/<id>_Segmentation.png (original size and orientation, 0/255, ready
for the ISIC scorer), metrics.csv (per image: input, mask, predicted area; scores with truth),
errors.csv (every input that failed), summary.json and report.html. Of an input with splits
(an ISIC root or its official zips, a packed shard folder) only the test split is scored by
default (--splits chooses); summary.json and the report give each split's own means. Each
probability map is thresholded and post-processed as chosen on validation at the end of
training (stored in the checkpoint), with flip TTA. Every row also gets uncertainty (the flip
views' spread, weighted by the mask's share of the image edge; an ensemble's: the mean of
its models'), expected_dice and needs_review (expected Dice below infer.review_below, 0.8,
or more uncertain than all but infer.review_share, 0.1, of the val images, or no pixel above
the threshold: the mask is then the most confident region); the report lists
the flagged images first. Rerun with the same --out to resume where a run stopped (a full
disk or read-only folder stops the run with status 2; the rerun continues). Under
`accelerate launch` the images are split across processes; --num-shards/--shard-index (or a
Slurm array) split them across jobs, and the last part to finish merges."""
    parser.epilog = """examples (an ISIC root or shard folder: its test images only, unless --splits):
  python jobs/infer.py --checkpoint runs/isic2016/best.pt --input ISIC2016/ --out out/
  python jobs/infer.py --checkpoint best.pt --input images.zip --masks truth.zip --out out/ --no-tta
  python jobs/infer.py --checkpoint runs/cv5 --input ISIC2016/ --out out/   # 5-fold ensemble
  python jobs/infer.py --checkpoint best.pt --input ISIC2016/ --splits train,test --out out/
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
                             "packed shard folder (or its manifest.json), ISIC root or official "
                             "zips; repeatable. Of an input with splits only --splits are "
                             "scored")
    parser.add_argument("--splits", metavar="LIST",
                        help="splits to score of inputs that have them, comma-separated from "
                             "train, val, test (default: test; a shard folder without one: "
                             "val). Sets infer.splits")
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
                        help="after thresholding: none, main (keep the connected region the "
                             "model is surest of: the largest probability mass above the "
                             "threshold), fill (fill holes) or main+fill; default auto: what "
                             "validation chose at the end of training (stored in the checkpoint). "
                             "A mask with no pixel above the threshold becomes the region above "
                             "half the image's highest probability (infer.empty_fallback=0: "
                             "left empty)")
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
    parser.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                        help="lesion-centred second pass: the square crop round the lesion the "
                             "first pass found (plus a quarter of its size on each side) is "
                             "segmented again and pasted back, zooming no further than the "
                             "training crops did (default on; on the real ISIC 2016 test set, "
                             "six models: +0.3 Dice and +2 points of the worst tenth, for "
                             "about 15%% less throughput; --no-refine for one pass; see "
                             "infer.refine_max_zoom)")
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
             "threshold": "threshold", "postprocess": "postprocess", "tta": "tta", "refine": "refine",
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
    if getattr(args, "splits", None):
        overrides.append(f"infer.splits=[{args.splits}]")
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
    relaunched = maybe_relaunch_cpu_ranks()  # `accelerate launch --cpu --num_processes N`
    if relaunched is not None:
        return relaunched
    num_shards, shard_index = job_part(args.num_shards, args.shard_index)
    run_inference(args.checkpoint, args.input, args.out, cfg, masks=args.masks,
                  num_shards=num_shards, shard_index=shard_index,
                  retry_failed=args.retry_failed)
    return 0
