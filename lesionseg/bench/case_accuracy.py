"""The accuracy benchmark: does the default recipe segment hard cases better than a plain script?

On a hard synthetic set in the ISIC 2016 layout (`synthetic.render_hard_case`: faint borders,
dense hair, rulers, ink, bubbles, vignettes, freckles, dark skin, lesions at the edge), three
trainers are compared on the official test split, scored by the official ISIC scorer:

ours (the jobs), the plain script and the plain script with smp's U-Net
(`lesionseg.bench.trainers`).

Each trainer runs at equal epochs, then the peers run again at equal wall time: as many epochs
as fit in the seconds our whole training command took (their image loading counted). With
several training seeds (`AccuracyPlan.train_seeds`) every run is repeated per seed and each
trainer's row is the mean over the seeds, with every seed's score and the spread beside it:
on 40 test images one seed moves a mean by up to 3 points of Dice.

With `--real DIR` the case also races the three trainers on real ISIC 2016 images
(`lesionseg.bench.case_real`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lesionseg.bench.case_real import run_real
from lesionseg.bench.measure import rounded
from lesionseg.bench.plan import BenchPlan
from lesionseg.bench.trainers import (
    packed_source,
    plain_model,
    round4,
    run_ours,
    run_plain,
    seed_mean,
)
from lesionseg.data.synthetic import write_isic_dataset
from lesionseg.errors import UserError
from lesionseg.peers import build_peer, peer_available

log = logging.getLogger(__name__)


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
    builders: dict[str, Callable[[], torch.nn.Module]] = {"plain": plain_model}
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
            "budget_s": round4(sum(r["budget_s"] for r in rounds) / len(rounds)),
            "per_seed": rounds,
            "note": "test split, official ISIC scorer macro means; ours = pack/train/infer jobs "
                    "with defaults (image size, epochs, random encoder set); plain and smp = "
                    "the plain script (lesionseg.bench.case_accuracy.plain_train) on every "
                    "training case (ours holds the val split out for its quality fit: see "
                    "train_images and val_images); each trainer's scores are the mean over the "
                    "training seeds"}


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


def bench_accuracy(plan: BenchPlan, workdir: Path) -> dict[str, Any]:
    """Test Dice on hard synthetic data: ours (the jobs, defaults) vs the plain script with our
    model and with smp's U-Net, at equal epochs and equal wall time (`run_accuracy`)."""
    aplan = AccuracyPlan(
        image_size=plan.accuracy_size, epochs=plan.accuracy_epochs,
        train_cases=plan.accuracy_train, test_cases=plan.accuracy_test,
        min_side=plan.accuracy_sides[0], max_side=plan.accuracy_sides[1],
        train_seeds=tuple(range(plan.accuracy_seeds)))
    with_peer = plan.peer and peer_available()
    result = run_accuracy(aplan, workdir / "accuracy", with_peer=with_peer)
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
    if plan.real:
        real = run_real(Path(plan.real), workdir / "accuracy", aplan.train_seeds, with_peer,
                        Path(plan.real_fullsize) if plan.real_fullsize else None,
                        plan.real_size, plan.real_epochs)
        result["real"] = real
        rows = real["trainers"]
        for key, field in (("dice", "dice"), ("jaccard", "jaccard"),
                           ("worst10", "worst10_dice"), ("below_half", "below_half")):
            for name in ("ours", "plain", "smp"):
                result["top_level"][f"real_{key}_{name}"] = (rows[name][field] if name in rows
                                                             else None)
        result["ratios"].update(real_ratios(result["top_level"], rows["ours"].get("review")))
    return result


def real_ratios(top: dict[str, Any], review: dict[str, Any] | None) -> dict[str, Any]:
    """The real case's figures that have targets (table.RATIOS): ours against the plain script
    and smp, our Jaccard and worst tenth, and the review flags' figures on the real test
    images (the mean over the seeds, `trainers.review_mean`)."""
    q = review or {}
    return {
        "real_margin_vs_plain": rounded(top["real_dice_ours"] - top["real_dice_plain"]),
        "real_margin_vs_smp": (rounded(top["real_dice_ours"] - top["real_dice_smp"])
                               if top["real_dice_smp"] is not None else None),
        "real_worst10_margin_vs_plain": rounded(top["real_worst10_ours"]
                                                - top["real_worst10_plain"]),
        "real_jaccard_ours": top["real_jaccard_ours"],
        "real_worst10_ours": top["real_worst10_ours"],
        "real_review_auroc": q.get("auroc"), "real_review_flagged": q.get("flagged_share"),
        "real_review_caught": q.get("caught_share"),
        "real_review_dice_mae": q.get("expected_dice_mae")}
