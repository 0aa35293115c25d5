"""The accuracy benchmark: does the default recipe segment hard cases better than a plain script?

On a hard synthetic set in the ISIC 2016 layout (`synthetic.render_hard_case`: faint borders,
dense hair, rulers, ink, bubbles, vignettes, freckles, dark skin, lesions at the edge), three
trainers are compared on the official test split, scored by the official ISIC scorer:

- **ours**: the real jobs as a user runs them, `pack` → `jobs/train.py` with every default but
  the image size, epochs and a random encoder → `jobs/infer.py` with the choices stored in
  best.pt;
- **plain**: `plain_train`, the 50-line PyTorch script anyone would write: the same
  MobileNetV2 encoder-decoder, whole images resized once from the originals, flips only, one
  AdamW for all weights, OneCycle to 3e-3, BCE + Dice + IoU, threshold 0.5;
- **smp**: the same plain script with `segmentation_models_pytorch.Unet("mobilenet_v2")`.

Each trainer runs at equal epochs, then the peers run again at equal wall time: as many epochs
as fit in the seconds our whole training command took (their image loading counted). With
several training seeds (`AccuracyPlan.train_seeds`) every run is repeated per seed and each
trainer's row is the mean over the seeds, with every seed's score and the spread beside it:
on 40 test images one seed moves a mean by up to 3 points of Dice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lesionseg.bench.measure import rounded
from lesionseg.bench.plan import BenchPlan
from lesionseg.config import load_config
from lesionseg.data.shard_format import MANIFEST
from lesionseg.data.shards import pack
from lesionseg.data.synthetic import OFFICIAL_NAMES, write_isic_dataset
from lesionseg.errors import UserError
from lesionseg.losses import SegmentationLoss
from lesionseg.metrics import binary_counts, summarize
from lesionseg.model import MobileNetEncoderDecoder
from lesionseg.peers import build_peer, peer_available

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
PLAIN_MAX_LR = 3e-3  # OneCycle peak of the plain script
PLAIN_BATCH = 8


@dataclass(frozen=True)
class AccuracyPlan:
    """Sizes of the accuracy case (the full plan; `quick` halves the image side)."""

    image_size: int = 256
    epochs: int = 12
    train_cases: int = 120
    test_cases: int = 40
    data_seed: int = 7  # seed of the hard synthetic set
    train_seeds: tuple[int, ...] = (0,)  # seeds of every trainer's weights and data order
    min_side: int = 400
    max_side: int = 4288


def hard_source(root: Path, plan: AccuracyPlan) -> Path:
    """The hard synthetic set in the ISIC layout under `root`, written once and reused while its
    spec file matches the plan."""
    spec = {"difficulty": "hard", "train": plan.train_cases, "test": plan.test_cases,
            "seed": plan.data_seed, "min_side": plan.min_side, "max_side": plan.max_side}
    spec_file = root / "spec.json"
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        return root
    write_isic_dataset(root, plan.train_cases, plan.test_cases, seed=plan.data_seed,
                       min_side=plan.min_side, max_side=plan.max_side, progress=True,
                       difficulty="hard")
    spec_file.write_text(json.dumps(spec))
    return root


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
        x = torch.from_numpy(np.asarray(img.resize((size, size), Image.BILINEAR)))
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
    result = {"trainer": name, "epochs": epochs, "train_seconds": _r(trained - start),
              "load_seconds": _r(loaded - start),
              "epoch_seconds": _r((trained - loaded) / epochs), "train_images": len(x)}
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
    wall time from start to exit, as a user sees it."""
    workdir.mkdir(parents=True, exist_ok=True)
    run = workdir / "run"
    overrides = [f"data.shards={shards}", f"data.image_size={size}", f"optim.epochs={epochs}",
                 "model.encoder_weights=null", f"train.output_dir={run}", "train.resume=none",
                 f"train.seed={seed}", "tracking.backend=none", *extra]
    start = time.perf_counter()
    _job("train.py", overrides, workdir / "train.log")
    seconds = time.perf_counter() - start
    out = workdir / "infer"
    if out.exists():  # a previous benchmark's masks (a reused --workdir): start afresh
        shutil.rmtree(out)
    _job("infer.py", ["--checkpoint", str(run / "best.pt"), "--input",
                      str(source / OFFICIAL_NAMES[("test", "image")]), "--masks",
                      str(source / OFFICIAL_NAMES[("test", "mask")]), "--out", str(out),
                      "--no-report"], workdir / "infer.log")
    summary = json.loads((out / "summary.json").read_text())
    result = {"trainer": "ours", "epochs": epochs, "train_seconds": _r(seconds),
              "overrides": list(extra), "applied": summary.get("postprocess"),
              "threshold": summary.get("threshold"), "recipe": _recipe_line(workdir / "train.log"),
              "review": review_figures(summary)}
    return result | official_scores(source, out / "masks")


def review_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The quality control's figures on the test set (summary.json's review, lesionseg.quality)
    and the val calibration stored in the checkpoint."""
    truth = (summary.get("review") or {}).get("with_truth") or {}
    cal = ((summary.get("checkpoint") or {}).get("meta") or {}).get("calibration") or {}
    return {"auroc": truth.get("auroc_uncertainty"),
            "flagged_share": (summary.get("review") or {}).get("flagged_share"),
            "caught_share": truth.get("caught_share"), "failures": truth.get("failures"),
            "expected_dice_mae": truth.get("expected_dice_mae"),
            "ece_before": cal.get("ece_before"), "ece_after": cal.get("ece_after"),
            "temperature": cal.get("temperature")}


def _job(script: str, args: list[str], log_file: Path) -> None:
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
    return {"dice": _r(macro["dice"]), "jaccard": _r(macro["jaccard"]),
            "threshold_jaccard": _r(macro["threshold_jaccard"]), "scorer": "isic-challenge-scoring"}


def _our_scores(truth: Path, masks: Path) -> dict[str, Any]:
    counts = []
    for t in sorted(truth.glob("*_Segmentation.png")):
        gt = np.asarray(Image.open(t).convert("L")) > 128
        pred = np.asarray(Image.open(masks / t.name).convert("L")) > 128
        counts.append(binary_counts(pred, gt))
    means = summarize(torch.tensor(counts, dtype=torch.long).reshape(-1, 4))
    return {k: _r(means[k]) for k in ("dice", "jaccard", "threshold_jaccard")}


def _r(x: float) -> float:
    return round(float(x), 4)


# --------------------------------------------------------------------------- the case


def equal_time_epochs(budget_s: float, result: dict[str, Any]) -> int:
    """Epochs a plain-script trainer fits into `budget_s` seconds, from its own equal-epoch run
    (its loading counted once, then its seconds per epoch)."""
    return max(1, int((budget_s - result["load_seconds"]) // max(1e-9, result["epoch_seconds"])))


def run_accuracy(plan: AccuracyPlan, workdir: Path, with_peer: bool) -> dict[str, Any]:
    """The whole case: hard set → for each training seed, ours, plain (and smp) at equal
    epochs → the peers again at our wall time. Returns every trainer's scores, seconds and
    epochs: the mean over the seeds, each seed's run under `per_seed`."""
    if not plan.train_seeds:
        raise UserError("accuracy benchmark: no training seed given")
    source = hard_source(workdir / "hard-source", plan)
    shards = packed_source(source, workdir / "hard-shards")
    builders: dict[str, Callable[[], torch.nn.Module]] = {"plain": MobileNetEncoderDecoder}
    if with_peer:
        builders["smp"] = build_peer
    rounds = [_seed_round(plan, seed, source, shards, _seed_dir(workdir, plan, seed), builders)
              for seed in plan.train_seeds]
    return {"image_size": plan.image_size, "epochs": plan.epochs,
            "seeds": list(plan.train_seeds),
            "data": {"difficulty": "hard", "train_cases": plan.train_cases,
                     "test_cases": plan.test_cases, "seed": plan.data_seed,
                     "sides": [plan.min_side, plan.max_side]},
            "equal_epochs": {name: seed_mean([r["equal_epochs"][name] for r in rounds])
                             for name in rounds[0]["equal_epochs"]},
            "equal_time": {name: seed_mean([r["equal_time"][name] for r in rounds])
                           for name in rounds[0]["equal_time"]},
            "budget_s": _r(sum(r["budget_s"] for r in rounds) / len(rounds)),
            "per_seed": rounds,
            "note": "test split, official ISIC scorer macro means; ours = pack/train/infer jobs "
                    "with defaults (image size, epochs, random encoder set); plain and smp = "
                    "the plain script (lesionseg.bench.case_accuracy.plain_train) on every "
                    "training case; each trainer's scores are the mean over the training seeds"}


def _seed_dir(workdir: Path, plan: AccuracyPlan, seed: int) -> Path:
    """Where one seed's runs go: the case folder itself for a single seed, else seed-<s>/."""
    return workdir if len(plan.train_seeds) == 1 else workdir / f"seed-{seed}"


def _seed_round(plan: AccuracyPlan, seed: int, source: Path, shards: Path, workdir: Path,
                builders: dict[str, Callable[[], torch.nn.Module]]) -> dict[str, Any]:
    """One training seed: ours, then each peer at equal epochs and at our wall time."""
    size, epochs = plan.image_size, plan.epochs
    log.info("accuracy: ours, %d epochs at %d², seed %d", epochs, size, seed)
    ours = run_ours(source, shards, workdir / "ours", size, epochs, seed) | {"seed": seed}
    equal_epochs: dict[str, Any] = {"ours": ours}
    equal_time: dict[str, Any] = {"ours": ours}
    for name, build in builders.items():
        log.info("accuracy: %s, %d epochs at %d², seed %d", name, epochs, size, seed)
        equal_epochs[name] = run_plain(name, build, source, size, epochs, seed,
                                       workdir / f"{name}-masks") | {"seed": seed}
        fit = equal_time_epochs(ours["train_seconds"], equal_epochs[name])
        if fit == epochs:
            equal_time[name] = equal_epochs[name]
            continue
        log.info("accuracy: %s, %d epochs at %d² (our %.0f s of training), seed %d", name, fit,
                 size, ours["train_seconds"], seed)
        equal_time[name] = run_plain(name, build, source, size, fit, seed,
                                     workdir / f"{name}-masks-equal-time") | {"seed": seed}
    return {"seed": seed, "equal_epochs": equal_epochs, "equal_time": equal_time,
            "budget_s": ours["train_seconds"]}


SCORE_KEYS = ("dice", "jaccard", "threshold_jaccard")


def seed_mean(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One trainer's runs over the seeds → one row: the first run's fields, the mean of the
    scores and seconds, `epochs` when every seed ran the same number (else the mean), each
    seed's (seed, epochs, seconds, Dice, Jaccard) under `per_seed` and the Dice spread."""
    if len(runs) == 1:
        return dict(runs[0])
    row = dict(runs[0])
    for key in (*SCORE_KEYS, "train_seconds"):
        row[key] = _r(sum(r[key] for r in runs) / len(runs))
    epochs = {r["epochs"] for r in runs}
    row["epochs"] = epochs.pop() if len(epochs) == 1 else _r(
        sum(r["epochs"] for r in runs) / len(runs))
    row.pop("seed", None)
    row["per_seed"] = [{k: r.get(k) for k in ("seed", "epochs", "train_seconds", "dice",
                                               "jaccard", "threshold", "applied")
                        if k in r} for r in runs]
    dice = [r["dice"] for r in runs]
    row["dice_spread"] = _r(max(dice) - min(dice))
    return row



def bench_accuracy(plan: BenchPlan, workdir: Path) -> dict[str, Any]:
    """Test Dice on hard synthetic data: ours (the jobs, defaults) vs the plain script with our
    model and with smp's U-Net, at equal epochs and equal wall time (`run_accuracy`)."""
    aplan = AccuracyPlan(
        image_size=plan.accuracy_size, epochs=plan.accuracy_epochs,
        train_cases=plan.accuracy_train, test_cases=plan.accuracy_test,
        min_side=plan.accuracy_sides[0], max_side=plan.accuracy_sides[1],
        train_seeds=tuple(range(plan.accuracy_seeds)))
    result = run_accuracy(aplan, workdir / "accuracy", with_peer=plan.peer and peer_available())
    epochs, times = result["equal_epochs"], result["equal_time"]
    ours = epochs["ours"]["dice"]
    result["top_level"] = {f"accuracy_dice_{k}": epochs[k]["dice"] if k in epochs else None
                           for k in ("ours", "plain", "smp")}
    result["ratios"] = {
        "accuracy_margin_vs_plain": rounded(ours - epochs["plain"]["dice"]),
        "accuracy_margin_vs_smp": (rounded(ours - epochs["smp"]["dice"]) if "smp" in epochs
                                   else None),
        "accuracy_time_margin_vs_plain": rounded(ours - times["plain"]["dice"]),
        "accuracy_time_margin_vs_smp": (rounded(ours - times["smp"]["dice"]) if "smp" in times
                                        else None),
    }
    return result
