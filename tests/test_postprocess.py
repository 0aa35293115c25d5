"""Post-processing: the component filter, hole filling and the validation search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lesionseg.checkpoint import save_weights
from lesionseg.cli import main
from lesionseg.config import load_config
from lesionseg.data.cv import cv2
from lesionseg.data.images import load_image
from lesionseg.data.synthetic import write_isic_dataset
from lesionseg.data.transforms import eval_transform, stack_images, to_float_images
from lesionseg.errors import UserError
from lesionseg.model import MobileNetEncoderDecoder
from lesionseg.postprocess import (
    CHOICES,
    Postprocess,
    choose,
    fallback_region,
    fill_holes,
    largest_component,
    main_component,
)
from lesionseg.tuning import store_choice

TRAIN_DIR = "ISBI2016_ISIC_Part1_Training_Data"
TRUTH_DIR = "ISBI2016_ISIC_Part1_Training_GroundTruth"


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((y - cy) ** 2 + (x - cx) ** 2 <= r * r).astype(np.uint8) * 255


def test_largest_component_removes_a_speck_and_keeps_the_lesion() -> None:
    lesion = _disc(64, 64, 32, 32, 14)
    speck = np.zeros_like(lesion)
    speck[3:6, 55:58] = 255
    out = largest_component(lesion | speck)
    assert np.array_equal(out, lesion)
    assert not largest_component(np.zeros((8, 8), np.uint8)).any()  # empty stays empty


def test_main_component_keeps_the_confident_lesion_beside_a_larger_false_blob() -> None:
    """A lesion the model is sure of (p 0.95) and a blob twice its area that it half-believes
    (p 0.55): by area the blob would win and the lesion vanish; by probability mass above the
    threshold the lesion is kept."""
    lesion = _disc(96, 96, 30, 30, 10)
    blob = _disc(96, 96, 70, 70, 15)
    prob = np.where(lesion > 0, 0.95, np.where(blob > 0, 0.55, 0.05)).astype(np.float32)
    mask = np.where(prob > 0.5, np.uint8(255), np.uint8(0))
    assert np.array_equal(largest_component(mask), blob)  # the old rule erased the lesion
    assert np.array_equal(main_component(mask, prob, 0.5), lesion)
    assert np.array_equal(Postprocess.parse("main", 0.5).mask(prob), lesion)
    # Equally confident: the larger region holds more mass and is kept.
    even = np.where(mask > 0, 0.9, 0.05).astype(np.float32)
    assert np.array_equal(main_component(mask, even, 0.5), blob)
    assert not main_component(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.float32), 0.5).any()


def test_choose_never_takes_a_step_that_erases_a_lesion() -> None:
    """Nine val images where 'main' cleans a speck (a gain) and one where the confident false
    blob wins and the truly overlapping lesion is dropped: 'main' would still gain on the mean,
    but it erased one image's lesion, so it is never chosen."""
    lesion = _disc(64, 64, 20, 20, 8)
    speck = np.zeros_like(lesion)
    speck[50:60, 50:60] = 255
    clean = np.where(lesion > 0, 0.9, np.where(speck > 0, 0.6, 0.0)).astype(np.float32)
    trap_truth = _disc(64, 64, 20, 20, 8) > 0
    trap = np.where(lesion > 0, 0.55, 0.0).astype(np.float32)
    trap[30:64, 30:64] = 0.99  # a large, confident false region
    probs = [clean] * 9 + [trap]
    truths = [lesion > 0] * 9 + [trap_truth]
    chosen, table = choose(probs, truths, thresholds=(0.5,))
    rows = {r["postprocess"]: r for r in table}
    assert rows["main"]["erases"] == 1 and rows["main"]["jaccard"] > rows["none"]["jaccard"]
    assert "main" not in chosen.steps
    # Without the trap image 'main' is chosen.
    chosen, _ = choose(probs[:9], truths[:9], thresholds=(0.5,))
    assert chosen.steps == ("main",)


def test_fewer_val_images_than_the_minimum_choose_nothing(tmp_path: Path) -> None:
    """Below train.tune_min_images the defaults are stored with the reason, even where another
    threshold would have won on those images; at the minimum the choice is made."""
    lesion = _disc(48, 48, 24, 24, 14)
    core = _disc(48, 48, 24, 24, 12)
    speck = np.zeros_like(lesion)
    speck[2:5, 2:5] = 255
    # Sure of the core, timid at the rim (only a threshold of 0.4 keeps it), a speck beside.
    probs = [np.where(core > 0, 0.9, np.where(lesion > 0, 0.45, np.where(
        speck > 0, 0.6, 0.1))).astype(np.float32)] * 4
    truths = [lesion > 0] * 4
    cfg = load_config(None, ["model.encoder_weights=null"])
    ckpt = save_weights(tmp_path / "best.pt", MobileNetEncoderDecoder().state_dict(), cfg)
    from lesionseg.checkpoint import load_weights

    untuned = store_choice([ckpt], probs, truths, "val images", min_images=5)
    assert untuned == Postprocess(0.5, ("main",))  # the fixed default, not a choice
    stored = load_weights(ckpt)[2]["postprocess"]
    assert stored["tuned"] is False and stored["val_images"] == 4
    assert "fewer than train.tune_min_images=5" in stored["why"]
    chosen = store_choice([ckpt], probs, truths, "val images", min_images=4)
    assert chosen.threshold == 0.4 and chosen.steps == ("main",)


def test_fill_holes_fills_inside_but_not_bays_open_to_the_border() -> None:
    lesion = _disc(64, 64, 32, 32, 16)
    holed = lesion.copy()
    holed[28:34, 28:34] = 0  # a hair crossing the centre
    assert np.array_equal(fill_holes(holed), lesion)
    # A lesion cut by the image edge: the background around it touches the border, stays.
    edge = _disc(64, 64, 32, 0, 20)
    assert np.array_equal(fill_holes(edge), edge)
    # A ring: its inside is a hole.
    ring = _disc(64, 64, 32, 32, 20) & ~_disc(64, 64, 32, 32, 10)
    assert np.array_equal(fill_holes(ring), _disc(64, 64, 32, 32, 20))


def test_postprocess_parse_apply_and_roundtrip() -> None:
    assert [Postprocess.parse(c).name for c in CHOICES] == list(CHOICES)
    pp = Postprocess.parse("main+fill", 0.4)
    assert pp.steps == ("main", "fill") and pp.threshold == 0.4
    assert Postprocess.from_dict(pp.to_dict()) == pp
    # A choice stored by lesionseg <= 0.2 ("largest") loads as the rule that replaced it.
    assert Postprocess.from_dict({"threshold": 0.4, "steps": ["largest", "fill"]}) == pp
    with pytest.raises(UserError, match="choose one of"):
        Postprocess.parse("biggest")
    lesion = _disc(48, 48, 24, 24, 12)
    noisy = lesion.copy()
    noisy[22:26, 22:26] = 0
    noisy[0:2, 0:2] = 255
    prob = noisy.astype(np.float32) / 255
    assert np.array_equal(pp.apply(noisy, prob), lesion)
    assert np.array_equal(pp.mask(prob), lesion)
    assert np.array_equal(Postprocess().apply(noisy), noisy)
    with pytest.raises(ValueError, match="probability map"):
        pp.apply(noisy)


def test_choose_finds_the_known_best_threshold() -> None:
    """A timid model: lesion pixels have probabilities in [0.36, 0.45), background in
    [0, 0.34): only the threshold 0.35 of the grid separates them, and no post-processing
    step can help."""
    rng = np.random.default_rng(0)
    probs, truths = [], []
    for _ in range(6):
        truth = _disc(40, 40, 20, 20, rng.uniform(8, 14)) > 0
        prob = np.where(truth, rng.uniform(0.36, 0.45, truth.shape),
                        rng.uniform(0, 0.34, truth.shape)).astype(np.float32)
        probs.append(prob)
        truths.append(truth)
    chosen, table = choose(probs, truths)
    assert chosen.threshold == 0.35
    assert table[0]["jaccard"] == pytest.approx(1.0)
    assert {r["postprocess"] for r in table} == set(CHOICES)


def test_choose_keeps_a_step_only_when_it_helps() -> None:
    lesion = _disc(48, 48, 24, 24, 12)
    speck = np.zeros_like(lesion)
    speck[2:5, 2:5] = 255
    clean = [lesion.astype(np.float32) / 255] * 4
    chosen, _ = choose(clean, [lesion > 0] * 4)
    assert chosen == Postprocess()  # nothing to gain: the default stays
    specked = [(lesion | speck).astype(np.float32) / 255] * 4
    chosen, _ = choose(specked, [lesion > 0] * 4)
    assert chosen.steps == ("main",) and chosen.threshold == 0.5


def test_search_scores_empty_as_one_like_the_scorer() -> None:
    """The search scores with lesionseg.metrics: an empty truth predicted empty is Jaccard 1,
    predicted full 0."""
    empty = np.zeros((4, 4), bool)
    _, table = choose([np.zeros((4, 4), np.float32)], [empty], thresholds=(0.5,))
    assert {r["postprocess"]: r["jaccard"] for r in table}["none"] == 1.0
    _, table = choose([np.ones((4, 4), np.float32)], [empty], thresholds=(0.5,))
    assert {r["postprocess"]: r["jaccard"] for r in table}["none"] == 0.0


# --------------------------------------------------------------------------- stored and applied


@pytest.fixture(scope="module")
def noisy_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Six tiny synthetic cases and a random model whose masks are speckled (many regions,
    holes): what post-processing exists to clean."""
    root = tmp_path_factory.mktemp("pp")
    isic = write_isic_dataset(root / "isic", 6, seed=3, min_side=48, max_side=160)
    torch.manual_seed(0)
    model = MobileNetEncoderDecoder().eval()
    images = sorted((isic / TRAIN_DIR).glob("*.jpg"))
    batch = to_float_images(stack_images([
        eval_transform(load_image(p.read_bytes())[0], None, 64)[0] for p in images]))
    with torch.no_grad():
        model.decoder.head.bias -= model(batch).median()
    cfg = load_config(None, ["model.encoder_weights=null", "data.image_size=64"])
    plain = save_weights(root / "plain.pt", model.state_dict(), cfg)
    # Its probabilities all lie within 0.48-0.52: near 0.5 the raw masks are speckled.
    chosen = Postprocess.parse("main+fill", 0.499)
    tuned = save_weights(root / "tuned.pt", model.state_dict(), cfg,
                         postprocess=chosen.to_dict() | {"val_images": 3})
    return {"isic": isic, "images": isic / TRAIN_DIR, "truth": isic / TRUTH_DIR,
            "plain": plain, "tuned": tuned}


def _infer(ckpt: Path, images: Path, truth: Path, out: Path, *extra: str) -> dict:
    argv = ["infer", "--checkpoint", str(ckpt), "--input", str(images), "--masks", str(truth),
            "--out", str(out), "--workers", "0", "--batch-size", "2", "--splits", "train", *extra,
            "infer.num_threads=1"]
    assert main(argv) == 0
    return json.loads((out / "summary.json").read_text())


def _masks(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((out / "masks").glob("*.png"))}


def test_a_checkpoints_choice_is_applied_reported_and_can_be_turned_off(
        noisy_model: dict[str, Path], tmp_path: Path) -> None:
    d = noisy_model
    auto = _infer(d["tuned"], d["images"], d["truth"], tmp_path / "auto")
    assert (auto["threshold"], auto["postprocess"]) == (0.499, "main+fill")
    report = (tmp_path / "auto" / "report.html").read_text()
    assert "main+fill" in report and "0.499" in report
    for arr in _masks(tmp_path / "auto").values():  # one region, no holes
        assert np.array_equal(largest_component(arr), arr)
        assert np.array_equal(fill_holes(arr), arr)

    off = _infer(d["tuned"], d["images"], d["truth"], tmp_path / "off", "--postprocess", "none")
    assert (off["threshold"], off["postprocess"]) == (0.499, "none")
    raw = _masks(tmp_path / "off")
    assert any(not np.array_equal(largest_component(a), a) for a in raw.values())
    # With the steps on, each mask is one region of the thresholded mask, holes filled.
    for k, v in _masks(tmp_path / "auto").items():
        n, labels = cv2.connectedComponents(raw[k], connectivity=8)
        regions = [np.where(labels == i, np.uint8(255), np.uint8(0)) for i in range(1, n)]
        assert any(np.array_equal(fill_holes(r), v) for r in regions) or not v.any()

    given = _infer(d["tuned"], d["images"], d["truth"], tmp_path / "given", "--threshold", "0.501")
    assert (given["threshold"], given["postprocess"]) == (0.501, "main+fill")
    # A checkpoint without a stored choice: 0.5 and nothing after it.
    plain = _infer(d["plain"], d["images"], d["truth"], tmp_path / "plain")
    assert (plain["threshold"], plain["postprocess"]) == (0.5, "none")


def test_tuning_stores_the_validation_choice_in_the_checkpoint(
        noisy_model: dict[str, Path], packed_shards: Path, tmp_path: Path) -> None:
    """store_choice writes choose()'s answer (and its table) into best.pt, the weights
    unchanged; tune_checkpoint scores the val shards as inference would, and on a random
    model, whose best "choice" is lesion everywhere, claims none ("threshold chosen …" on a
    degenerate model was the defect)."""
    from lesionseg.checkpoint import load_weights
    from lesionseg.data.shard_format import split_urls
    from lesionseg.tuning import store_choice, tune_checkpoint, val_probabilities

    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(d_bytes := noisy_model["plain"].read_bytes())
    urls = tuple(split_urls(packed_shards, "val"))
    _, probs, truths = val_probabilities(ckpt, urls, 64)
    assert len(probs) == len(truths) > 0
    assert all(p.shape == t.shape for p, t in zip(probs, truths, strict=True))
    assert np.mean([np.mean(p > choose(probs, truths)[0].threshold) for p in probs]) > 0.95
    assert tune_checkpoint(ckpt, urls, 64, min_images=1) is None and d_bytes == ckpt.read_bytes()
    # Maps that follow the truth (a model that learnt something): the choice is stored.
    rng = np.random.default_rng(0)
    useful = [np.clip(t * 0.6 + 0.2 + rng.normal(0, 0.1, t.shape), 0, 1).astype(np.float32)
              for t in truths]
    expected, _ = choose(useful, truths)
    chosen = store_choice([ckpt], useful, truths, "val images", min_images=1)
    assert chosen == expected
    state, _, meta = load_weights(ckpt)
    assert Postprocess.from_meta(meta) == chosen
    assert meta["postprocess"]["val_images"] == len(probs) and meta["postprocess"]["table"]
    before, _, _ = load_weights(noisy_model["plain"])
    assert all(torch.equal(state[k], before[k]) for k in before)
    assert d_bytes != ckpt.read_bytes()


def test_inference_says_whether_the_stored_choice_was_tuned() -> None:
    """An untuned checkpoint (too few val images: tuning stored its defaults) is not
    described as the validation's choice."""
    from lesionseg.config import InferConfig
    from lesionseg.inference import applied_postprocess
    stored = {"threshold": 0.5, "steps": ["main"], "name": "main"}
    tuned, how = applied_postprocess(InferConfig(), {"postprocess": stored})
    assert tuned.name == "main" and how.startswith("threshold from the checkpoint's validation")
    untuned, how = applied_postprocess(InferConfig(), {"postprocess": stored | {"tuned": False}})
    assert untuned == tuned and "untuned defaults (too few val images" in how
    assert "validation" not in how


def test_an_empty_mask_falls_back_to_the_most_confident_region() -> None:
    """No pixel above the threshold: with the fallback the mask is the main region above half
    the highest probability (the doubted lesion, not a weaker blob elsewhere); a mask with a
    region is untouched; fallback 0 and an all-zero map stay empty."""
    prob = np.zeros((64, 64), np.float32)
    prob[_disc(64, 64, 20, 20, 8) > 0] = 0.45  # the lesion the model doubted
    prob[_disc(64, 64, 48, 48, 12) > 0] = 0.25  # a bigger, weaker blob (a sticker)
    assert not Postprocess(0.5).mask(prob).any()
    post = Postprocess(0.5, ("main",), fallback=0.5)
    mask = post.mask(prob)
    assert np.array_equal(mask, _disc(64, 64, 20, 20, 8))
    assert np.array_equal(fallback_region(prob, 0.5), mask)
    # a weaker blob above half the top (0.25 > 0.225 at share 0.5) but less mass: still the lesion
    assert np.array_equal(Postprocess(0.5, fallback=0.5).mask(prob), _disc(64, 64, 20, 20, 8))
    sure = prob.copy()
    sure[_disc(64, 64, 48, 48, 3) > 0] = 0.9  # one pixel region above 0.5: no fallback
    assert np.array_equal(post.mask(sure), _disc(64, 64, 48, 48, 3))
    assert not fallback_region(np.zeros((8, 8), np.float32), 0.5).any()
    assert not Postprocess(0.5, fallback=0.5).mask(np.zeros((8, 8), np.float32)).any()

