"""The plan of a benchmark run: its cases, sizes, repeats and budgets (`plan_for` gives the
full and --quick presets), and the seeds and constants the cases share."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lesionseg.errors import UserError

CASES = ("data", "train", "infer", "accuracy")
SCHEMA = "lesionseg-bench/1"
SOURCE_SEED = 0  # seed of the full-size synthetic source (data and infer cases)
RACE_SEED = 1  # seed of the demo-sized data set of the equal-time training race
OTHER_STORE_SIDE = 1024  # data case: also shards stored with this longest side (more detail)
RACE_VAL_FRACTION = 0.2  # of the race's cases, validated (more than the default: less noise)
MACS_SIDE = 384  # multiply-accumulates are counted for one image of this side
SPEED_CASE_EPOCHS = 100  # the speed cases resolve the recipe as for a schedule this long


class BenchError(UserError):
    """A benchmark that cannot run (bad option, failed case); the message says why."""


# ============================================================================ plan


@dataclass(frozen=True)
class BenchPlan:
    """Sizes, repeats and budgets of one run (`plan_for` gives the presets)."""

    images: int = 48  # full-size synthetic cases (data and infer cases)
    min_side: int = 1024  # longest side of the synthetic source images: from …
    max_side: int = 4288  # … to (4288x2848 is the largest ISIC 2016 image)
    image_size: int = 384  # training/inference side
    batch_size: int = 8  # images per step / forward
    warmup: int = 1  # untimed rounds before the repeats
    repeats: int = 5  # timed rounds; figures are medians over them
    data_batches: int = 4  # batches per timed round in the data case
    loop_steps: int = 8  # timed steps per block in the loop-vs-pure comparison
    train_workers: int = 2  # DataLoader workers of the real training loop
    race_cases: int = 240  # synthetic cases of the equal-time race (demo-like sizes)
    race_sides: tuple[int, int] = (320, 1024)  # their longest sides: from, to
    race_size: int = 256  # training/validation side of the race
    race_budget_s: float = 300.0  # training seconds each model gets in the race
    race_slice_s: float = 10.0  # models alternate every this many training seconds
    race_lr: float = 3e-3  # constant learning rate (after warm-up) of both models in the race
    peer: bool = True  # include segmentation-models-pytorch when it is installed
    accuracy_size: int = 256  # training side of the accuracy case
    accuracy_epochs: int = 12  # epochs of every trainer in the accuracy case (equal epochs)
    accuracy_train: int = 120  # hard training cases (the official train split)
    accuracy_test: int = 40  # hard test cases scored
    accuracy_sides: tuple[int, int] = (400, 4288)  # longest sides of the hard cases
    accuracy_seeds: int = 2  # training seeds 0..N-1 of every trainer; scores are their means
    real: str | None = None  # ISIC 2016 Part 1 folder (four official folders): the real case
    real_fullsize: str | None = None  # full-size photographs without masks: the no-truth check
    real_size: int = 128  # training side of the real case (every trainer)
    real_epochs: int = 30  # epochs of every trainer in the real case


def plan_for(quick: bool, **overrides: Any) -> BenchPlan:
    """The full plan, or the --quick one (about 12 minutes on a quiet 2-core machine, half of
    it the accuracy case at 128²); overrides win."""
    plan = BenchPlan()
    if quick:
        plan = dataclasses.replace(
            plan, images=16, repeats=3, data_batches=2, loop_steps=5, race_cases=200,
            race_sides=(160, 480), race_size=128, race_budget_s=90.0, race_slice_s=6.0,
            accuracy_size=128, accuracy_seeds=1)
    return dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})
