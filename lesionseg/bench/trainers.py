"""The trainers the accuracy benchmark races, and how their test masks are scored.

- **ours**: the real jobs as a user runs them, `pack` → `jobs/train.py` with every default but
  the image size, epochs and a random encoder → `jobs/infer.py` with the choices stored in
  best.pt (`run_ours`);
- **plain**: `plain_train`, the 50-line PyTorch script anyone would write: the same
  MobileNetV2 encoder-decoder, whole images resized once from the originals, flips only, one
  AdamW for all weights, OneCycle to 3e-3, BCE + Dice + IoU, threshold 0.5 (`run_plain`);
- **smp**: the same plain script with `segmentation_models_pytorch.Unet("mobilenet_v2")`.

Test masks are scored by the official ISIC scorer when it is installed (`official_scores`);
`seed_mean` folds one trainer's runs over several training seeds into one row.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lesionseg.config import load_config
from lesionseg.data.shard_format import MANIFEST, read_manifest
from lesionseg.data.shards import pack
from lesionseg.data.synthetic import OFFICIAL_NAMES
from lesionseg.errors import UserError
from lesionseg.losses import SegmentationLoss
from lesionseg.metrics import binary_counts, summarize
from lesionseg.model import MobileNetEncoderDecoder

REPO = Path(__file__).resolve().parents[2]
PLAIN_MAX_LR = 3e-3  # OneCycle peak of the plain script
PLAIN_BATCH = 8


def plain_model() -> torch.nn.Module:
    """The plain script's model: our encoder-decoder as anyone would build it, without the
    recipe's input colour constancy."""
    return MobileNetEncoderDecoder(color_constancy=False)


def pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, mask) paths of a split ('train' or 'test') of an ISIC-layout folder, by id."""
    images = sorted((root / OFFICIAL_NAMES[(split, "image")]).glob("*.jpg"))
    masks = root / OFFICIAL_NAMES[(split, "mask")]
    return [(p, masks / f"{p.stem}_Segmentation.png") for p in images]


# --------------------------------------------------------------------------- the plain script


def load_resized(items: list[tuple[Path, Path]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image and mask resized once to size×size (bilinear / nearest), as tensors."""
    xs, ys = [], []
    for image, mask in items:
        img = Image.open(image).convert("RGB").resize((size, size), Image.BILINEAR)
        msk = Image.open(mask).convert("L").resize((size, size), Image.NEAREST)
        xs.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
        ys.append(torch.from_numpy((np.asarray(msk) > 127).astype(np.float32))[None])
    return torch.stack(xs).float() / 255, torch.stack(ys)


def plain_train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int,
                seed: int) -> torch.nn.Module:
    """The plain script's loop: random flips, AdamW + OneCycle to 3e-3, BCE + Dice + IoU."""
    g = torch.Generator().manual_seed(seed)
    loss_fn = SegmentationLoss()
    steps = math.ceil(len(x) / PLAIN_BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=PLAIN_MAX_LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, PLAIN_MAX_LR, total_steps=epochs * steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for k in range(steps):
            idx = order[k * PLAIN_BATCH:(k + 1) * PLAIN_BATCH]
            xb, yb = x[idx], y[idx]
            if torch.rand((), generator=g) < 0.5:
                xb, yb = xb.flip(-1), yb.flip(-1)
            if torch.rand((), generator=g) < 0.5:
                xb, yb = xb.flip(-2), yb.flip(-2)
            loss, _ = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model


@torch.no_grad()
def plain_predict(model: torch.nn.Module, items: list[tuple[Path, Path]], size: int,
                  out: Path) -> None:
    """Resize each test image to size×size, predict, upsample the probability to the original
    size, threshold at 0.5 and write <id>_Segmentation.png into `out`."""
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    for image, _ in items:
        img = Image.open(image).convert("RGB")
        x = torch.from_numpy(np.array(img.resize((size, size), Image.BILINEAR)))
        prob = torch.sigmoid(model(x.permute(2, 0, 1)[None].float() / 255))
        full = F.interpolate(prob, size=(img.height, img.width), mode="bilinear")[0, 0]
        mask = (full > 0.5).numpy().astype(np.uint8) * 255
        Image.fromarray(mask, mode="L").save(out / f"{image.stem}_Segmentation.png")


def run_plain(name: str, build: Callable[[], torch.nn.Module], source: Path, size: int,
              epochs: int, seed: int, out: Path) -> dict[str, Any]:
    """Load, train and predict with the plain script; returns seconds (loading + training),
    the per-epoch training seconds and the official scores of its test masks."""
    start = time.perf_counter()
    x, y = load_resized(pairs(source, "train"), size)
    loaded = time.perf_counter()
    torch.manual_seed(seed)
    model = plain_train(build(), x, y, epochs, seed)
    trained = time.perf_counter()
    plain_predict(model, pairs(source, "test"), size, out)
    result = {"trainer": name, "epochs": epochs, "train_seconds": round4(trained - start),
              "load_seconds": round4(loaded - start),
              "epoch_seconds": round4((trained - loaded) / epochs), "train_images": len(x)}
    return result | official_scores(source, out)


# --------------------------------------------------------------------------- ours, through the jobs


def packed_source(source: Path, shards: Path) -> Path:
    """The source packed with every default of `jobs/pack.py` (once; reused after)."""
    if not (shards / MANIFEST).is_file():
        pack([source], shards, load_config().pack, progress=False)
    return shards


def run_ours(source: Path, shards: Path, workdir: Path, size: int, epochs: int, seed: int,
             extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """`jobs/train.py` on the packed shards (defaults but size, epochs, random encoder) →
    `jobs/infer.py` on the test images → official scores. Seconds are the training command's
    wall time from start to exit, as a user sees it. `refine`: the zoom cap of the second pass
    inference applied (summary.json's, 0 = one pass). `train_images` / `val_images`: the
    shards' train and val counts: ours trains on train only and holds val out for its quality
    fit, while the plain script trains on every training pair (its `train_images`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    run = workdir / "run"
    overrides = [f"data.shards={shards}", f"data.image_size={size}", f"optim.epochs={epochs}",
                 "model.encoder_weights=null", f"train.output_dir={run}", "train.resume=none",
                 f"train.seed={seed}", "tracking.backend=none", *extra]
    start = time.perf_counter()
    run_job("train.py", overrides, workdir / "train.log")
    seconds = time.perf_counter() - start
    out = workdir / "infer"
    if out.exists():  # a previous benchmark's masks (a reused --workdir): start afresh
        shutil.rmtree(out)
    run_job("infer.py", ["--checkpoint", str(run / "best.pt"), "--input",
                      str(source / OFFICIAL_NAMES[("test", "image")]), "--masks",
                      str(source / OFFICIAL_NAMES[("test", "mask")]), "--out", str(out),
                      "--no-report"], workdir / "infer.log")
    summary = json.loads((out / "summary.json").read_text())
    result = {"trainer": "ours", "epochs": epochs, "train_seconds": round4(seconds),
              "overrides": list(extra), "applied": summary.get("postprocess"),
              "threshold": summary.get("threshold"), "refine": summary.get("refine"),
              "recipe": _recipe_line(workdir / "train.log"), "review": review_figures(summary)}
    splits = read_manifest(shards)["splits"]
    result |= {"train_images": splits["train"]["count"], "val_images": splits["val"]["count"]}
    return result | official_scores(source, out / "masks")


def review_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The quality control's figures on the test set (summary.json's review, lesionseg.quality):
    AUROC, shares flagged and caught, expected-Dice error and the ids of the failures the flags
    missed (`missed`, worst first), and the val calibration stored in the checkpoint."""
    truth = (summary.get("review") or {}).get("with_truth") or {}
    cal = ((summary.get("checkpoint") or {}).get("meta") or {}).get("calibration") or {}
    return {"auroc": truth.get("auroc_uncertainty"),
            "flagged_share": (summary.get("review") or {}).get("flagged_share"),
            "caught_share": truth.get("caught_share"), "failures": truth.get("failures"),
            "expected_dice_mae": truth.get("expected_dice_mae"),
            "missed": [m["id"] for m in truth.get("failures_missed") or []],
            "ece_before": cal.get("ece_before"), "ece_after": cal.get("ece_after"),
            "temperature": cal.get("temperature")}


def run_job(script: str, args: list[str], log_file: Path) -> None:
    """Run one of jobs/*.py in a child process (its output into log_file); a failure raises
    with the log's last line."""
    env = dict(os.environ, WANDB_MODE="disabled", LESIONSEG_NO_RELAUNCH="1")
    with open(log_file, "w") as f:
        done = subprocess.run([sys.executable, str(REPO / "jobs" / script), *args], stdout=f,
                              stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        lines = log_file.read_text(errors="replace").strip().splitlines() or ["(no output)"]
        raise UserError(f"accuracy benchmark: jobs/{script} failed (exit {done.returncode}): "
                        f"{lines[-1]} (log: {log_file})")


def _recipe_line(log_file: Path) -> str | None:
    for line in log_file.read_text(errors="replace").splitlines():
        if "recipe:" in line:
            return line.split("recipe:", 1)[1].strip()
    return None


def official_scores(source: Path, masks: Path) -> dict[str, Any]:
    """Macro Dice and Jaccard of a masks folder against the test truth, by the official ISIC
    scorer when it is installed (the [dev] extra), else by lesionseg.metrics (same formulas)."""
    truth = source / OFFICIAL_NAMES[("test", "mask")]
    try:  # optional: the [dev] extra
        from isic_challenge_scoring import SegmentationScore
    except ImportError:
        return _our_scores(truth, masks) | {"scorer": "lesionseg.metrics"}
    macro = SegmentationScore.from_dir(truth, masks).to_dict()["macro_average"]
    return {"dice": round4(macro["dice"]), "jaccard": round4(macro["jaccard"]),
            "threshold_jaccard": round4(macro["threshold_jaccard"]), "scorer": "isic-challenge-scoring"}


def mask_counts(truth: Path, masks: Path) -> dict[str, tuple[int, int, int, int]]:
    """(tp, fp, fn, tn) of each truth mask's prediction in `masks` (same file names), by id;
    both binarised at > 128, as the official scorer reads them."""
    counts = {}
    for t in sorted(truth.glob("*_Segmentation.png")):
        gt = (np.asarray(Image.open(t).convert("L")) > 128).view(np.uint8)
        pred = (np.asarray(Image.open(masks / t.name).convert("L")) > 128).view(np.uint8)
        counts[t.name.split("_Segmentation")[0]] = binary_counts(pred, gt)
    return counts


def _our_scores(truth: Path, masks: Path) -> dict[str, Any]:
    counts = list(mask_counts(truth, masks).values())
    means = summarize(torch.tensor(counts, dtype=torch.long).reshape(-1, 4))
    return {k: round4(means[k]) for k in ("dice", "jaccard", "threshold_jaccard")}


def round4(x: float) -> float:
    return round(float(x), 4)


SCORE_KEYS = ("dice", "jaccard", "threshold_jaccard")


def seed_mean(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One trainer's runs over the seeds → one row: the first run's fields, the mean of the
    scores and seconds, `epochs` when every seed ran the same number (else the mean), each
    seed's (seed, epochs, seconds, Dice, Jaccard, review) under `per_seed` and the Dice
    spread. A review (ours) is the mean of the seeds' figures too (`review_mean`), never one
    seed's beside the others' mean scores."""
    if len(runs) == 1:
        return dict(runs[0])
    row = dict(runs[0])
    for key in (*SCORE_KEYS, "train_seconds"):
        row[key] = round4(sum(r[key] for r in runs) / len(runs))
    epochs = {r["epochs"] for r in runs}
    row["epochs"] = epochs.pop() if len(epochs) == 1 else round4(
        sum(r["epochs"] for r in runs) / len(runs))
    row.pop("seed", None)
    row["per_seed"] = [{k: r.get(k) for k in ("seed", "epochs", "train_seconds", "dice",
                                               "jaccard", "threshold", "applied", "refine", "review")
                        if k in r} for r in runs]
    dice = [r["dice"] for r in runs]
    row["dice_spread"] = round4(max(dice) - min(dice))
    if any("review" in r for r in runs):
        row["review"] = review_mean([r.get("review") or {} for r in runs])
    return row


def review_mean(reviews: list[dict[str, Any]]) -> dict[str, Any]:
    """The seeds' review figures (`review_figures`) → their means (None where a seed has
    none), `seeds` = how many, and `missed` = the failures every seed's flags missed (each
    seed's own list stays in its `per_seed` entry)."""
    out: dict[str, Any] = {"seeds": len(reviews)}
    for key in dict.fromkeys(k for r in reviews for k in r):
        if key == "missed":
            continue
        values = [r.get(key) for r in reviews]
        out[key] = (round4(sum(values) / len(values))
                    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
                    else None)
    missed = [set(r.get("missed") or ()) for r in reviews]
    out["missed"] = [i for i in (reviews[0].get("missed") or []) if all(i in m for m in missed)]
    return out
