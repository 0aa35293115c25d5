"""lesionseg.quality_fit: the end-of-training fit on val shards, stored in best.pt."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from lesionseg.checkpoint import load_weights, save_weights
from lesionseg.modelcard import render_model_card
from lesionseg.quality import FIXED_MAPS, MIN_FIT_IMAGES, QualityModel
from lesionseg.quality_fit import fit_quality


def test_fit_stores_maps_and_temperature_that_inference_reads(
        tiny_checkpoint: dict[str, Path], packed_shards: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "best.pt"
    shutil.copy(tiny_checkpoint["ckpt"], ckpt)
    urls = tuple(str(p) for p in sorted(packed_shards.glob("val-*.tar")))
    fitted = fit_quality(ckpt, urls, 64)
    _, _, meta = load_weights(ckpt)  # weights_only: plain types only
    assert meta["quality"] == fitted["quality"] and meta["calibration"] == fitted["calibration"]
    assert meta["postprocess"]["threshold"] == 0.45  # the tuning's choice is kept
    quality = meta["quality"]
    assert 0 < quality["val_images"] < MIN_FIT_IMAGES  # a tiny val set: the fixed maps
    assert [m["feature"] for m in quality["dice_models"]] == ["border_spread", "uncertain_share"]
    assert all(m["source"].startswith("fixed map (only") for m in quality["dice_models"])
    cal = meta["calibration"]
    assert 0.25 <= cal["temperature"] <= 4 and cal["applied"] == (cal["ece_after"] < cal["ece_before"])
    model = QualityModel.from_meta(meta, 0.8)
    row = model.row({"members": 4, "border_spread": 0.0})
    assert row["expected_dice"] == pytest.approx(FIXED_MAPS["border_spread"].ys[0])
    assert not row["needs_review"]
    card = render_model_card(ckpt)
    assert "## Quality control and calibration" in card and str(cal["temperature"]) in card
    assert "expected Dice from the border-weighted spread: fixed map (only" in card
    assert np.isfinite(cal["ece_before"])
    # a checkpoint fitted before the border weighting (its map is of the plain spread): the
    # card says inference uses the fixed map instead
    state, cfg, meta = load_weights(ckpt)
    meta["quality"]["dice_models"][0]["feature"] = "spread"
    save_weights(ckpt, state, cfg, **meta)
    assert ("expected Dice from the spread (fitted before the border weighting: inference uses "
            "the fixed map)") in render_model_card(ckpt)
