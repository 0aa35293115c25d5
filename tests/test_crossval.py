"""Cross-validation end to end: fold plans, a 2-fold run, its out-of-fold evaluation
(lesionseg.crossval, `lesionseg cv`) and the fold ensemble at inference."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lesionseg.checkpoint import load_weights
from lesionseg.cli import main
from lesionseg.config import load_config
from lesionseg.data.folds import assign_folds
from lesionseg.data.shard_format import shard_keys, split_urls
from lesionseg.errors import EXIT_USAGE
from lesionseg.files import sha256_file
from lesionseg.metrics import summarize
from lesionseg.recipe import resolve as resolve_recipe
from lesionseg.train.data import plan_data
from lesionseg.train.streams import TrainStream, ValStream

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(ROOT / "tests" / "train_tiny.yaml"), "optim.max_steps=2"]


def train_and_val_ids(shards: Path) -> list[str]:
    return shard_keys(split_urls(shards, "train") + split_urls(shards, "val"))


@pytest.fixture(scope="module")
def cv_run(packed_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only: a 2-fold cross-validation of packed_shards, 2 steps per fold, as a user
    runs it (`python jobs/train.py … data.folds=2`, data.fold=all by default), W&B offline."""
    run = tmp_path_factory.mktemp("cv") / "run"
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), *TINY,
                           f"data.shards={packed_shards}", "data.folds=2",
                           "tracking.backend=wandb", f"train.output_dir={run}"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def test_a_fold_trains_and_validates_only_on_its_own_cases(packed_shards: Path) -> None:
    ids = train_and_val_ids(packed_shards)
    cfg = load_config(ROOT / "tests" / "train_tiny.yaml", ["data.folds=2"])
    resolve_recipe(cfg, total_steps=100, steps_per_epoch=1)
    held = []
    for fold in (0, 1):
        data = plan_data(str(packed_shards), 2, fold, 0)
        assert not data.train_ids & data.val_ids and data.train_ids | data.val_ids == set(ids)
        assert (data.train_count, data.val_count) == (len(data.train_ids), len(data.val_ids))
        stream = TrainStream(data.train_urls, cfg, epoch=0, rank=0, world=1, batches=6,
                             ids=data.train_ids)
        seen = {i for b in DataLoader(stream, batch_size=None) for i in b["id"]}
        assert seen and seen <= data.train_ids
        val = [i for b in DataLoader(ValStream(data.val_urls, cfg, 0, 1, ids=data.val_ids),
                                     batch_size=None) for i in b["id"]]
        assert sorted(val) == sorted(data.val_ids)
        held.append(data.val_ids)
    assert held[0] | held[1] == set(ids) and not held[0] & held[1]


def test_folds_need_no_val_split(make_isic, tmp_path: Path) -> None:
    from lesionseg.config import PackConfig
    from lesionseg.data.shards import pack
    from lesionseg.errors import DataError

    shards = tmp_path / "shards"
    pack([make_isic(6)], shards, PackConfig(val_fraction=0, max_side=64, workers=1),
         progress=False)
    with pytest.raises(DataError, match="data.folds=K"):
        plan_data(str(shards))
    data = plan_data(str(shards), 3, 1, 0)
    assert (data.train_count, data.val_count) == (4, 2)


def test_out_of_fold_run_predicts_every_training_id_exactly_once(cv_run: Path,
                                                                 packed_shards: Path) -> None:
    ids = train_and_val_ids(packed_shards)
    with open(cv_run / "cv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["id"] for r in rows) == sorted(ids)  # each once; no test case
    # the report links errors.csv: it is there, with no failed case
    assert (cv_run / "cv" / "errors.csv").read_text() == "input,id,reason\n"
    folds = assign_folds(ids, 2, seed=0)
    assert all(int(r["fold"]) == folds[r["id"]] for r in rows)
    assert all((cv_run / "cv" / r["mask"]).is_file() for r in rows)

    summary = json.loads((cv_run / "cv" / "summary.json").read_text())
    counts = torch.tensor([[int(r[k]) for k in ("tp", "fp", "fn", "tn")] for r in rows])
    assert summary["cases"] == len(ids) and summary["folds"] == 2
    assert summary["means"]["dice"] == pytest.approx(summarize(counts)["dice"], abs=1e-12)
    fold_dice = [f["means"]["dice"] for f in summary["per_fold"]]
    assert sum(f["images"] for f in summary["per_fold"]) == len(ids)
    assert summary["spread"]["dice"]["std"] == pytest.approx(np.std(fold_dice, ddof=1))
    assert "Cross-validation report" in (cv_run / "cv" / "report.html").read_text()

    # Every fold's best.pt gets the out-of-fold scores. Two steps from a random start learn
    # nothing, so no threshold is claimed on them (lesionseg.tuning refuses: a degenerate
    # model); the choice itself is stored as tests/test_postprocess.py shows.
    assert (summary["threshold"], summary["postprocess"]) == (0.5, "none")
    assert summary["postprocess_stored"] is False and summary["oof_stored"] is True
    for i, member in enumerate(summary["checkpoint"]["members"]):
        _, cfg, meta = load_weights(member["path"])
        assert member["sha256"] == sha256_file(member["path"])
        assert (cfg.data.folds, cfg.data.fold) == (2, str(i))
        assert "postprocess" not in meta
        assert meta["oof"]["pooled"]["dice"] == round(summary["means"]["dice"], 5)


def test_cv_command_writes_on_demand_and_refuses_missing_folds(cv_run: Path, tmp_path: Path,
                                                               capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(cv_run, run)
    shutil.rmtree(run / "cv")
    assert main(["cv", str(run), "--no-wandb"]) == 0
    again = json.loads((run / "cv" / "summary.json").read_text())
    first = json.loads((cv_run / "cv" / "summary.json").read_text())
    assert again["means"] == first["means"] and again["threshold"] == first["threshold"]
    assert "cases in 2 folds" in capsys.readouterr().out

    (run / "fold-1" / "oof.npz").unlink()
    assert main(["cv", str(run), "--no-wandb"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert "fold(s) 1 of 2 have no oof.npz" in err and "\n" not in err
    assert main(["cv", str(tmp_path / "nothing")]) == EXIT_USAGE
    assert "not a cross-validation run folder" in capsys.readouterr().err


def test_fold_folder_as_checkpoint_is_an_ensemble_with_the_pooled_choice(
        cv_run: Path, packed_shards: Path, tmp_path: Path) -> None:
    from lesionseg.inference import run_inference

    cfg = load_config(None, ["infer.num_workers=0", "infer.report=false"])
    summary = run_inference(cv_run, [packed_shards], tmp_path / "out", cfg)
    cv = json.loads((cv_run / "cv" / "summary.json").read_text())
    assert (summary["threshold"], summary["postprocess"]) == (cv["threshold"], cv["postprocess"])
    members = summary["checkpoint"]["members"]
    assert [m["path"] for m in members] == [str(cv_run / f"fold-{i}" / "best.pt") for i in (0, 1)]
    assert [m["sha256"] for m in members] == [sha256_file(m["path"]) for m in members]
    assert summary["scored"] == json.loads((packed_shards / "manifest.json").read_text())[
        "splits"]["test"]["count"]


def test_folds_and_their_summary_share_one_wandb_group(cv_run: Path) -> None:
    from test_tracking import summary_values, wandb_records

    def run_record(folder: Path):
        return next(r.run for r in wandb_records(next(folder.glob("run-*.wandb")))
                    if r.WhichOneof("record_type") == "run")

    folds = [next((cv_run / f"fold-{i}" / "wandb").glob("offline-run-*")) for i in (0, 1)]
    cv = next((cv_run / "cv" / "wandb").glob("offline-run-*"))
    records = [run_record(f) for f in (*folds, cv)]
    assert {r.run_group for r in records} == {"run"}
    assert [r.display_name for r in records] == ["run-fold-0", "run-fold-1", "run-cv"]
    assert records[2].job_type == "cross-validation"
    summary = json.loads((cv_run / "cv" / "summary.json").read_text())
    logged = summary_values(cv)
    assert logged["cv/dice"] == pytest.approx(summary["means"]["dice"])
    assert logged["cv/dice_fold_std"] == pytest.approx(summary["spread"]["dice"]["std"])
    assert logged["cv/fold_1/jaccard"] == pytest.approx(summary["per_fold"][1]["means"]["jaccard"])
