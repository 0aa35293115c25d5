"""lesionseg.modelcard: the card's contents from a checkpoint and its shard manifest, and the
card the train job writes beside best.pt."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lesionseg.checkpoint import save_weights
from lesionseg.config import load_config
from lesionseg.data.shard_format import read_manifest
from lesionseg.files import sha256_file
from lesionseg.model import MobileNetEncoderDecoder
from lesionseg.modelcard import render_model_card, write_run_card

ROOT = Path(__file__).resolve().parents[1]


def test_card_names_data_recipe_metrics_choice_and_limits(packed_shards: Path,
                                                          tmp_path: Path) -> None:
    cfg = load_config(None, ["model.encoder_weights=null", "data.image_size=64",
                             f"data.shards={packed_shards}", "optim.epochs=7"])
    ckpt = save_weights(tmp_path / "best.pt", MobileNetEncoderDecoder().state_dict(), cfg,
                        step=12, epoch=7, val={"dice": 0.8123, "jaccard": 0.7},
                        postprocess={"threshold": 0.4, "steps": ["fill"], "val_images": 4,
                                     "val_jaccard": 0.71, "val_jaccard_default": 0.7})
    card = render_model_card(ckpt)
    counts = read_manifest(packed_shards)["splits"]
    assert "parameters: 2,986,505 (2.99 M)" in card and "MobileNetV2 encoder" in card
    assert f"`{packed_shards.name}/manifest.json`" in card
    assert f"train {counts['train']['count']}, val {counts['val']['count']}" in card
    assert "split seed 0" in card and "val fraction 0.25" in card
    assert "7 epochs" in card and "| dice | 0.8123 |" in card and "step 12 (epoch 7)" in card
    assert "encoder weights: none (randomly initialised)" in card
    assert "**Out-of-fold metrics:** not measured" in card
    assert "threshold **0.4**, post-processing **fill**" in card and "val Jaccard 0.71" in card
    assert "Research use only. Not a medical device" in card
    assert "Trained on **dermoscopy** images" in card and "not on clinical" in card
    assert sha256_file(ckpt) in card and "lesionseg 0.2.0" in card
    assert write_run_card(tmp_path / "empty") is None  # a run without best.pt: no card
    assert "degenerate" not in card


def test_card_shows_out_of_fold_metrics_as_a_table_and_warns_of_a_degenerate_model(
        tmp_path: Path) -> None:
    """The out-of-fold metrics were printed as raw JSON; a model that predicts nothing got a
    card like any other."""
    cfg = load_config(None, ["model.encoder_weights=null", "data.image_size=64"])
    oof = {"folds": 2, "cases": 16, "threshold": 0.45, "postprocess": "largest",
           "pooled": {"dice": 0.81234, "jaccard": 0.7}, "fold_1": {"dice": 0.8, "jaccard": 0.69}}
    ckpt = save_weights(tmp_path / "best.pt", MobileNetEncoderDecoder().state_dict(), cfg,
                        step=2, epoch=1, val={"dice": 0.0, "pred_fraction": 0.0}, oof=oof)
    card = render_model_card(ckpt)
    assert "| metric | pooled | fold 1 |" in card and "| dice | 0.8123 | 0.8000 |" in card
    assert '{"folds"' not in card and "2 folds, 16 cases" in card
    assert "WARNING — degenerate model" in card and "almost no lesion" in card
    assert card.index("WARNING") < card.index("## Model")


@pytest.mark.slow
def test_train_writes_the_card_beside_best_pt(packed_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--config",
                        str(ROOT / "tests" / "train_tiny.yaml"), f"data.shards={packed_shards}",
                        "optim.max_steps=2", f"train.output_dir={out}"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    card = (out / "MODEL_CARD.md").read_text()
    payload = torch.load(out / "best.pt", weights_only=True)
    assert sha256_file(out / "best.pt") in card  # the card describes the final best.pt
    # Two steps from a random start predict no lesion: the card says so, and tuning, which
    # finds no threshold at which the model works, stores no choice.
    assert "postprocess" not in payload["meta"]
    assert "WARNING — degenerate model" in card and "none chosen" in card
    assert "Not a medical device" in card and "| dice |" in card
