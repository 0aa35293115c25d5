"""lesionseg.quality: the signals, the expected-Dice map, the flag, calibration and the summary;
and a no-truth inference run that writes the quality columns and the report's review section."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lesionseg.checkpoint import load_weights, save_weights
from lesionseg.cli import main
from lesionseg.quality import (
    FIXED_MAPS,
    MIN_FIT_IMAGES,
    DiceModel,
    QualityModel,
    auroc,
    calibrate,
    ece,
    fit_dice_model,
    fit_temperature,
    pairwise_disagreement,
    review_summary,
    signals,
)


def _disc(shift: int, size: int = 64) -> np.ndarray:
    """A probability map: a soft disc of radius 16 centred `shift` pixels right of the middle."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2 - shift)
    return (1 / (1 + np.exp(r - 16))).astype(np.float32)


def test_identical_members_have_zero_uncertainty_and_it_grows_with_disagreement() -> None:
    same = np.stack([_disc(0)] * 4)
    assert signals(same, 0.5)["disagreement"] == 0.0 and signals(same, 0.5)["spread"] == 0.0
    assert signals(same, 0.5)["border_spread"] == 0.0
    moved = [signals(np.stack([_disc(0), _disc(0), _disc(s), _disc(-s)]), 0.5)
             for s in (1, 3, 6, 12, 40)]
    for name in ("disagreement", "spread", "border_spread"):
        grown = [m[name] for m in moved]
        assert all(a < b for a, b in zip(grown, grown[1:], strict=False)), (name, grown)
    assert moved[-1]["disagreement"] > 0.6  # one pair disjoint, the others far apart
    rated = QualityModel().row(signals(same, 0.5))
    assert rated["uncertainty"] == 0.0
    assert rated["expected_dice"] == FIXED_MAPS["border_spread"].ys[0]
    rated = QualityModel().row(moved[2])
    assert moved[2]["border"] == 0.0  # the discs stay inside the frame: the plain spread
    assert rated["uncertainty"] == pytest.approx(moved[2]["spread"], abs=1e-5)


def test_the_uncertainty_weights_the_spread_by_the_masks_border_share() -> None:
    """The same members moved to the frame's edge: the spread is the same, the uncertainty is
    the spread times 1 + the share of the image's edge pixels inside the mask."""
    members = [0, 0, 3, -3]
    inside = signals(np.stack([_disc(s) for s in members]), 0.5)
    at_edge = signals(np.stack([np.roll(_disc(s), 28, axis=1) for s in members]), 0.5)
    assert at_edge["spread"] == pytest.approx(inside["spread"], rel=1e-3)
    edge = (np.stack([np.roll(_disc(s), 28, axis=1) for s in members]).mean(0) > 0.5)
    share = np.concatenate([edge[0], edge[-1], edge[:, 0], edge[:, -1]]).mean()
    assert at_edge["border"] == pytest.approx(share) and 0.05 < share < 0.5
    assert at_edge["border_spread"] == pytest.approx(at_edge["spread"] * (1 + share))
    assert QualityModel().row(at_edge)["uncertainty"] > QualityModel().row(inside)["uncertainty"]


def test_spread_counts_members_that_agree_on_the_mask_but_not_on_how_sure() -> None:
    """Two members with the same mask (both above 0.5 on the disc) but one much less sure:
    no Dice disagreement, a spread of half their mean gap per lesion pixel."""
    sure = _disc(0)
    unsure = np.where(sure > 0.5, 0.55, sure).astype(np.float32)
    sig = signals(np.stack([sure, unsure]), 0.5)
    assert sig["disagreement"] == 0.0 and sig["spread"] > 0.1
    area = int((np.stack([sure, unsure]).mean(0) > 0.5).sum())
    expected = np.abs(sure - unsure).sum() / 2 / area  # each member is |gap|/2 from the mean
    assert sig["spread"] == pytest.approx(expected, rel=1e-4)
    # an empty mask: the area counts as 1 % of the image, so the value stays bounded
    faint = np.stack([np.full((64, 64), 0.1, np.float32), np.full((64, 64), 0.3, np.float32)])
    empty = signals(faint, 0.5)
    assert empty["area"] == 0 and empty["spread"] == pytest.approx(0.1 * 64 * 64 / (0.01 * 64 * 64))


def test_pairwise_disagreement_is_one_minus_dice() -> None:
    a = np.zeros((2, 10), bool)
    a[0, :6] = True  # 6 pixels
    a[1, 3:9] = True  # 6 pixels, 3 shared: Dice 0.5
    assert pairwise_disagreement(a) == pytest.approx(0.5)
    assert pairwise_disagreement(np.zeros((3, 4, 4), bool)) == 0.0  # all empty: agree


def test_one_member_falls_back_to_the_uncertain_pixel_share() -> None:
    sharp, soft = signals(_disc(0)[None], 0.5), signals((_disc(0) * 0.9)[None], 0.5)
    assert sharp["disagreement"] is None and sharp["spread"] is None and sharp["members"] == 1
    assert sharp["border_spread"] is None
    assert QualityModel().row(soft)["uncertainty"] == pytest.approx(soft["uncertain_share"], abs=1e-5)
    assert soft["uncertain_share"] > sharp["uncertain_share"] > 0


def test_the_flag_follows_the_level_and_the_stored_map() -> None:
    stored = DiceModel("border_spread", (0.0, 0.1), (0.95, 0.55), "isotonic fit on 50 val images")
    meta = {"quality": {"dice_models": [stored.to_dict()]}}
    sig = {"members": 4, "border_spread": 0.05}  # expected Dice 0.75
    for level, flagged in ((0.7, False), (0.75, False), (0.76, True), (0.9, True)):
        row = QualityModel.from_meta(meta, level).row(sig)
        assert row["expected_dice"] == pytest.approx(0.75)
        assert row["needs_review"] is flagged
    # an ensemble's members are not what a model's fit saw: the fixed map
    ensemble = QualityModel.from_meta(meta | {"ensemble": 3}, 0.8)
    fixed = FIXED_MAPS["border_spread"](sig)
    assert ensemble.row(sig)["expected_dice"] == pytest.approx(fixed, abs=1e-4)
    # a checkpoint fitted before the border weighting (its map is of the plain spread, or of
    # the disagreement before that): the fixed map
    for feature in ("spread", "disagreement"):
        old = {"quality": {"dice_models": [DiceModel(feature, (0.0, 0.1), (0.95, 0.55),
                                                     "isotonic fit on 50 val images").to_dict()]}}
        assert QualityModel.from_meta(old, 0.8).row(sig)["expected_dice"] == pytest.approx(
            fixed, abs=1e-4)


def test_a_mask_drawn_by_the_empty_mask_fallback_is_always_flagged() -> None:
    """No pixel passed the threshold, so the mask is only the most confident region: flagged
    however sure the views are (they may all agree on nothing, as on a photograph of no
    lesion), with the expected Dice the map gives; the summary's rule says so."""
    quality = QualityModel.from_meta({}, 0.8, 0.1)
    sure = {"members": 4, "border_spread": 0.0}
    assert quality.row(sure)["needs_review"] is False
    flagged = quality.row(sure, fell_back=True)
    assert flagged["needs_review"] is True
    assert flagged["expected_dice"] == quality.row(sure)["expected_dice"] > 0.8
    assert "fallback" in quality.describe(4)["rule"]


def test_the_flag_also_takes_the_most_uncertain_share_of_val() -> None:
    """An image more uncertain than all but review_share of the val images is flagged even
    when its expected Dice is above the level; the cut comes from the fit's val quantiles,
    from the fixed map's for a map stored without them, and share 0 turns the rule off."""
    values = np.linspace(0.0, 0.2, 101)  # val spreads: the top 10 % lie above 0.18
    fitted = fit_dice_model("border_spread", values, np.full(101, 0.95))
    assert fitted.cut(0.1) == pytest.approx(0.18) and fitted.cut(0.0) == float("inf")
    meta = {"quality": {"dice_models": [fitted.to_dict()]}}
    quality = QualityModel.from_meta(meta, 0.8, 0.1)
    assert quality.row({"members": 4, "border_spread": 0.17})["needs_review"] is False
    above = quality.row({"members": 4, "border_spread": 0.19})
    assert above["expected_dice"] == pytest.approx(0.95) and above["needs_review"] is True
    assert QualityModel.from_meta(meta, 0.8, 0.05).row({"members": 4, "border_spread": 0.185})[
        "needs_review"] is False  # the top 5 % lie above 0.19
    assert QualityModel.from_meta(meta, 0.8, 0.0).row({"members": 4, "border_spread": 10.0})[
        "needs_review"] is False
    described = quality.describe(4)
    assert described["uncertainty_cut"] == pytest.approx(0.18)
    assert described["uncertainty_cut_from"] == "the val images of the fit"
    # a map stored before the cuts: the fixed map's val quantiles
    old = {"quality": {"dice_models": [DiceModel("border_spread", (0.0, 1.0), (0.95, 0.95),
                                                 "isotonic fit on 50 val images").to_dict()]}}
    fixed_cut = FIXED_MAPS["border_spread"].cut(0.1)
    assert 0.05 < fixed_cut < 0.2
    old_quality = QualityModel.from_meta(old, 0.8, 0.1)
    assert old_quality.row({"members": 4, "border_spread": fixed_cut * 1.01})["needs_review"]
    assert not old_quality.row({"members": 4, "border_spread": fixed_cut * 0.99})["needs_review"]
    assert old_quality.describe(4)["uncertainty_cut_from"] == "the fixed map's val images"
    # an ensemble: the fixed map (which carries cuts of its own), never the fit's val images
    ensemble = QualityModel.from_meta(meta | {"ensemble": True}, 0.8, 0.1)
    assert ensemble.describe(4)["uncertainty_cut"] == pytest.approx(fixed_cut, abs=1e-5)
    assert ensemble.describe(4)["uncertainty_cut_from"] == "the fixed map's val images"


def test_an_ensemble_rates_each_model_by_its_own_fit() -> None:
    """Views model by model: each model's own uncertainty from its own flips; the ensemble's
    uncertainty, expected Dice and cut are the means of the models' (each model's map at its
    own uncertainty); a model without a fit counts with the fixed map."""
    calm = [_disc(0), _disc(0), _disc(1), _disc(-1)]
    wild = [_disc(0), _disc(0), _disc(8), _disc(-8)]
    sig = signals(np.stack(calm + wild), 0.5, models=2)
    assert sig["members"] == 8 and sig["models"] == 2
    assert sig["model_uncertainties"] == pytest.approx(
        [signals(np.stack(calm), 0.5)["border_spread"], signals(np.stack(wild), 0.5)["border_spread"]])
    assert sig["model_uncertainties"][0] < sig["model_uncertainties"][1]
    u1, u2 = sig["model_uncertainties"]
    first = fit_dice_model("border_spread", np.linspace(0.0, 2 * u2, 101), np.linspace(0.95, 0.35, 101))
    second = fit_dice_model("border_spread", np.linspace(0.0, 4 * u2, 101), np.full(101, 0.9))
    meta = {"ensemble": 2, "member_quality": [{"dice_models": [first.to_dict()]},
                                              {"dice_models": [second.to_dict()]}]}
    quality = QualityModel.from_meta(meta, 0.5, 0.1)
    assert quality.models == 2
    row = quality.row(sig)
    assert row["uncertainty"] == pytest.approx((u1 + u2) / 2, abs=1e-5)
    assert row["expected_dice"] == pytest.approx(
        (first({"border_spread": u1}) + second({"border_spread": u2})) / 2, abs=1e-4)
    cut = (first.cut(0.1) + second.cut(0.1)) / 2  # 0.9 · (2 u2 + 4 u2) / 2 = 2.7 u2
    assert row["expected_dice"] > 0.5 and (u1 + u2) / 2 < cut and row["needs_review"] is False
    # a review share of 0.9: the cut is the mean of the models' 10th percentiles, 0.3 u2
    assert QualityModel.from_meta(meta, 0.5, 0.9).row(sig)["needs_review"] is True
    described = quality.describe(8, 2)
    assert described["uncertainty"].startswith("mean over the 2 models of each model's own")
    assert described["uncertainty_cut"] == pytest.approx(cut, abs=1e-5)
    assert described["uncertainty_cut_from"] == ("the mean of the models' cuts, each from its "
                                                 "own val images")
    # the level moves the flag; a model without a fit: the fixed map and its cut
    assert QualityModel.from_meta(meta, 0.99, 0.1).row(sig)["needs_review"] is True
    unfitted = QualityModel.from_meta(meta | {"member_quality": [meta["member_quality"][0], {}]},
                                      0.5, 0.1)
    fixed = FIXED_MAPS["border_spread"]
    assert unfitted.row(sig)["expected_dice"] == pytest.approx(
        (first({"border_spread": u1}) + fixed({"border_spread": u2})) / 2, abs=1e-4)
    assert unfitted.describe(8, 2)["uncertainty_cut"] == pytest.approx(
        (first.cut(0.1) + fixed.cut(0.1)) / 2, abs=1e-5)
    assert "fixed map's for the 1 without a fit" in unfitted.describe(8, 2)["uncertainty_cut_from"]
    # without TTA each model has one view: its uncertain-pixel share
    one_view = signals(np.stack([calm[0], wild[2]]), 0.5, models=2)
    assert one_view["model_uncertainties"] == pytest.approx(
        [signals(calm[0][None], 0.5)["uncertain_share"], signals(wild[2][None], 0.5)["uncertain_share"]])


def test_the_dice_fit_is_decreasing_and_needs_enough_images() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 0.3, 200)
    y = np.clip(0.95 - 1.5 * x + rng.normal(0, 0.05, 200), 0, 1)
    model = fit_dice_model("border_spread", x, y)
    assert model.source == "isotonic fit on 200 val images"
    assert all(a >= b for a, b in zip(model.ys, model.ys[1:], strict=False))
    preds = np.array([model({"border_spread": v}) for v in x])
    assert np.mean(np.abs(preds - y)) < 0.06
    few = fit_dice_model("border_spread", x[:MIN_FIT_IMAGES - 1], y[:MIN_FIT_IMAGES - 1])
    assert few.ys == FIXED_MAPS["border_spread"].ys and few.source.startswith("fixed map")


def test_temperature_fixes_overconfident_probabilities() -> None:
    rng = np.random.default_rng(1)
    true_p = rng.uniform(0.02, 0.98, 200_000)
    truth = rng.uniform(size=true_p.size) < true_p
    overconfident = calibrate(true_p.astype(np.float32), 0.4)  # logits ×2.5
    fit = fit_temperature(overconfident, truth)
    assert fit["temperature"] == pytest.approx(2.5, rel=0.05)  # undoes the ×2.5
    assert fit["applied"] and fit["ece_after"] < fit["ece_before"] / 3
    assert ece(true_p, truth) < 0.01
    assert torch.allclose(calibrate(torch.tensor([0.5, 0.9]), 2.0),
                          torch.tensor([0.5, 0.75]), atol=1e-4)


def test_auroc_counts_pairs_and_ties_half() -> None:
    assert auroc([0.1, 0.2, 0.9, 0.8], [False, False, True, True]) == 1.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    assert auroc([0.3, 0.1, 0.2], [True, False, False]) == 1.0
    assert auroc([0.1, 0.2], [True, True]) is None


def test_review_summary_with_and_without_truth() -> None:
    rows = [{"id": i, "uncertainty": u, "expected_dice": e, "needs_review": e < 0.8, "dice": d}
            for i, u, e, d in (("a", 0.01, 0.95, 0.94), ("b", 0.2, 0.6, 0.5),
                               ("c", 0.05, 0.85, 0.7), ("d", 0.3, 0.5, 0.9))]
    out = review_summary(rows, {"level": 0.8})
    assert out["flagged"] == 2 and out["flagged_share"] == 0.5 and out["level"] == 0.8
    truth = out["with_truth"]
    assert truth["failures"] == 2 and truth["failures_caught"] == 1
    assert truth["auroc_uncertainty"] == 0.5  # each failure above one of the two good images
    assert truth["expected_dice_mae"] == pytest.approx((0.01 + 0.1 + 0.15 + 0.4) / 4, abs=1e-4)
    # the failure the flags missed is named with its scores; the caught one ("b") is not
    assert truth["failures_missed"] == [{"id": "c", "dice": 0.7, "uncertainty": 0.05,
                                         "expected_dice": 0.85}]
    bare = review_summary([{k: v for k, v in r.items() if k != "dice"} for r in rows], None)
    assert "with_truth" not in bare and bare["flagged"] == 2


def test_no_truth_run_writes_the_columns_and_the_review_section(
        tiny_checkpoint: dict[str, Path], tmp_path: Path) -> None:
    """A run without masks: metrics.csv has uncertainty, expected_dice, needs_review for every
    image; summary.json's review counts the flags; the report shows the flagged count at the
    top and the review section, most uncertain first. A stored map that flags everything and
    one that flags nothing move the flags."""
    ckpt = tmp_path / "best.pt"
    shutil.copy(tiny_checkpoint["ckpt"], ckpt)
    state, cfg, meta = load_weights(ckpt)
    flat = DiceModel("border_spread", (0.0, 1.0), (0.7, 0.7), "test map")
    meta["quality"] = {"dice_models": [flat.to_dict()]}
    save_weights(ckpt, state, cfg, **meta)

    def run(out: Path, *extra: str) -> list[dict[str, str]]:
        assert main(["infer", "--checkpoint", str(ckpt), "--input", str(tiny_checkpoint["images"]),
                     "--out", str(out), "--workers", "0", "--splits", "train",
                     "infer.num_threads=1", *extra]) == 0
        with open(out / "metrics.csv", newline="") as f:
            return list(csv.DictReader(f))

    rows = run(tmp_path / "flag-all")  # expected 0.7 < 0.8: every image
    assert rows and all(r["expected_dice"] == "0.7" and r["needs_review"] == "True"
                        and float(r["uncertainty"]) >= 0 for r in rows)
    summary = json.loads((tmp_path / "flag-all" / "summary.json").read_text())
    assert summary["review"]["flagged"] == len(rows) and "with_truth" not in summary["review"]
    assert summary["review"]["expected_dice_model"] == "test map"
    page = (tmp_path / "flag-all" / "report.html").read_text()
    assert f"{len(rows)} flagged for review" in page
    assert f"Review these first ({len(rows)} of {len(rows)} flagged)" in page
    section = page[page.index("Review these first"):page.index("<h2>", page.index("Review these first"))]
    order = [r["id"] for r in sorted(rows, key=lambda r: (-float(r["uncertainty"]), r["id"]))]
    assert [section.index(f'alt="{i}"') for i in order] == sorted(section.index(f'alt="{i}"')
                                                                  for i in order)
    none = run(tmp_path / "flag-none", "infer.review_below=0.6", "infer.review_share=0")
    assert {r["needs_review"] for r in none} == {"False"}
    assert "No image is flagged" in (tmp_path / "flag-none" / "report.html").read_text()
    no_tta = run(tmp_path / "no-tta", "--no-tta")
    assert all(r["uncertainty"] != "" for r in no_tta)
    described = json.loads((tmp_path / "no-tta" / "summary.json").read_text())["review"]
    assert "(0.3, 0.7)" in described["uncertainty"]


def test_a_degenerate_checkpoint_is_named_in_the_log_summary_and_report(
        tiny_checkpoint: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint whose own val figures say it learnt nothing (no tuned choice stored, val
    predictions almost empty): the infer job warns, summary.json carries the warning and the
    report shows it under its first line; the same weights with their tuned choice do not."""
    ckpt = tmp_path / "best.pt"
    state, cfg, meta = load_weights(tiny_checkpoint["ckpt"])
    meta.pop("postprocess")
    meta["val"] = {"dice": 0.01, "pred_fraction": 0.001}
    save_weights(ckpt, state, cfg, **meta)
    for name, path in (("degenerate", ckpt), ("fine", tiny_checkpoint["ckpt"])):
        out = tmp_path / name
        caplog.clear()
        assert main(["infer", "--checkpoint", str(path), "--input",
                     str(tiny_checkpoint["images"]), "--out", str(out), "--workers", "0",
                     "--splits", "train", "infer.num_threads=1"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        page = (out / "report.html").read_text()
        if name == "degenerate":
            assert "almost no lesion on val" in summary["warning"]
            assert any("DEGENERATE CHECKPOINT" in r.message for r in caplog.records)
            assert page.index("WARNING — degenerate checkpoint") < page.index("<h2>")
        else:
            assert "warning" not in summary and "WARNING" not in page
