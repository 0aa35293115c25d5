"""The lesion-centred second pass (lesionseg.infer.refine): the box, the zoom cap, the paste,
and the job, the API and an ensemble applying it alike."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lesionseg.api import Segmenter
from lesionseg.checkpoint import load_weights, save_weights
from lesionseg.cli import main
from lesionseg.config import Config, ConfigError, InferConfig, load_config, validate
from lesionseg.data.cv import cv2
from lesionseg.data.shard_format import decode_sample, iter_raw, split_urls
from lesionseg.data.sources import Blob, Item
from lesionseg.data.transforms import crop_sample, eval_transform, stack_images
from lesionseg.infer.decode import collate, decode_item
from lesionseg.infer.predict import load_ensemble, load_predictor
from lesionseg.infer.refine import (
    REFINE_MARGIN,
    Refine,
    crop_resized,
    fine_copy,
    lesion_box,
    max_zoom_for,
    refine_for,
    second_pass,
)
from lesionseg.report.tables import settings
from lesionseg.tuning import val_probabilities


def blob(size: int, cy: int, cx: int, r: int, level: float = 0.9) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.where((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r, level, 0.05).astype(np.float32)


def test_zoom_cap_follows_the_training_crops() -> None:
    assert max_zoom_for(0.5, 0) == pytest.approx(math.sqrt(2))
    assert max_zoom_for(0.25, 0) == pytest.approx(2.0)
    assert max_zoom_for(1.0, 0) == 1.0 and max_zoom_for(None, 0) == 1.0
    assert max_zoom_for(1.0, 3.0) == 3.0  # the setting wins
    # no second pass for a model trained on whole images, or when switched off
    assert refine_for(True, 1.0, 0) is None and refine_for(True, None, 0) is None
    assert refine_for(False, 0.5, 0) is None
    assert refine_for(True, 0.5, 0).max_zoom == pytest.approx(math.sqrt(2))
    assert refine_for(True, 0.5, 1.0) is None  # a cap of 1 means no zoom


def test_box_surrounds_the_main_region_with_margin_inside_the_frame() -> None:
    refine = Refine(max_zoom=4.0)
    prob = blob(64, 4, 12, 5)  # a lesion at the top edge, 11 px wide, its box cut by the frame
    top, left, side = lesion_box(prob, refine)
    assert side == round(11 * (1 + 2 * REFINE_MARGIN))
    assert top == 0 and left >= 0 and top + side <= 64 and left + side <= 64  # shifted inside
    ys, xs = np.nonzero(prob > 0.5)
    assert top <= ys.min() and ys.max() < top + side and left <= xs.min() and xs.max() < left + side
    # the zoom cap: the crop is at least S / max_zoom pixels
    assert lesion_box(prob, Refine(max_zoom=math.sqrt(2)))[2] == math.ceil(64 / math.sqrt(2))


def test_box_follows_the_surest_region_not_the_largest() -> None:
    # a large faint false region and a small sure lesion: the box is the lesion's
    prob = np.maximum(blob(96, 70, 70, 20, level=0.52), blob(96, 15, 15, 6, level=0.99))
    top, left, side = lesion_box(prob, Refine(max_zoom=8.0))
    assert top + side <= 40 and left + side <= 40


def test_no_box_for_an_empty_or_frame_filling_mask() -> None:
    refine = Refine(max_zoom=2.0)
    assert lesion_box(np.full((64, 64), 0.1, np.float32), refine) is None
    assert lesion_box(blob(64, 32, 32, 40), refine) is None  # the box would be the frame


def test_crop_keeps_the_dtype_and_content() -> None:
    image = torch.arange(3 * 32 * 32, dtype=torch.float32).reshape(3, 32, 32).remainder(251)
    u8 = image.to(torch.uint8)
    same = crop_resized(u8, (4, 6, 16), 16)  # no resize: the crop itself
    assert same.dtype == torch.uint8 and torch.equal(same, u8[:, 4:20, 6:22])
    up = crop_resized(u8, (4, 6, 16), 32)
    assert up.shape == (3, 32, 32) and up.dtype == torch.uint8


def test_second_pass_pastes_the_crops_maps_into_the_box_only() -> None:
    size, refine = 64, Refine(max_zoom=4.0)
    images = torch.randint(0, 255, (3, 3, size, size), dtype=torch.uint8)
    probs = torch.stack([torch.from_numpy(blob(size, 20, 40, 6)),  # a lesion: refined
                         torch.full((size, size), 0.1),  # nothing found: kept
                         torch.from_numpy(blob(size, 32, 32, 40))])  # the whole frame: kept
    views = torch.stack([probs, probs * 0.5], dim=1)  # two members
    calls = []

    def crop_forward(crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(crops)
        p = torch.full((crops.shape[0], size, size), 0.7)
        return p, torch.stack([p, p * 0.5], dim=1)

    out, out_views = second_pass(crop_forward, images, probs, views, refine)
    assert len(calls) == 1 and calls[0].shape == (1, 3, size, size)
    top, left, side = lesion_box(probs[0].numpy(), refine)
    assert torch.equal(calls[0][0], crop_resized(images[0], (top, left, side), size))
    inside = (slice(top, top + side), slice(left, left + side))
    assert torch.allclose(out[0][inside], torch.tensor(0.7))
    assert torch.allclose(out_views[0, 1][inside], torch.tensor(0.35))
    outside = torch.ones(size, size, dtype=torch.bool)
    outside[inside] = False
    assert torch.equal(out[0][outside], probs[0][outside])
    assert torch.equal(out[1:], probs[1:]) and torch.equal(out_views[1:], views[1:])
    # the inputs are not changed in place
    assert probs[0, top, left] != 0.7


def stripes(side: int, period: int) -> Image.Image:
    """An RGB image of vertical black and white stripes, `period` pixels each."""
    row = ((np.arange(side) // period) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.repeat(np.tile(row, (side, 1))[..., None], 3, axis=2))


def test_a_larger_image_keeps_a_finer_copy_and_its_crop_shows_its_detail() -> None:
    """An image larger than the model's input keeps a copy at up to S × max_zoom a side; the
    crop at the largest zoom, cut from it, holds the detail the S×S input averaged away."""
    size, refine = 32, Refine(max_zoom=2.0)
    image = stripes(256, 4)  # 4-px stripes: 1-px ones at 64 px a side, grey at 32
    assert fine_copy(image, size, None) is None  # no second pass: no copy
    assert fine_copy(stripes(32, 2), size, refine) is None  # no larger than S: the input is it
    assert fine_copy(stripes(48, 2), size, refine).shape == (3, 48, 48)  # at most its own side
    fine = fine_copy(image, size, refine)
    assert refine.fine_side(size) == 64 and fine.shape == (3, 64, 64)
    assert torch.equal(fine, eval_transform(image, None, 64)[0])
    x = eval_transform(image, None, size)[0]
    box = (8, 8, 16)  # zoom 2: the crop is 16 px of the input, 32 px of the copy
    from_fine = crop_resized(x, box, size, fine)
    assert from_fine.shape == (3, size, size) and from_fine.dtype == torch.uint8
    assert torch.equal(from_fine, fine[:, 16:48, 16:48])  # 1:1, the copy's own pixels
    assert torch.equal(from_fine, crop_sample(fine, (16.0, 16.0, 32.0), size))
    assert from_fine.float().std() > 100 and crop_resized(x, box, size).float().std() < 30
    # a box off the copy's pixel grid, and one below the largest zoom (the crop shrinks)
    assert crop_resized(x, (5, 7, 21), size, fine).shape == (3, size, size)
    assert crop_resized(x, (0, 0, 31), size, fine).shape == (3, size, size)


def test_second_pass_crops_from_the_finer_copy_where_an_image_has_one() -> None:
    size, refine = 32, Refine(max_zoom=2.0)
    images = torch.randint(0, 255, (2, 3, size, size), dtype=torch.uint8)
    fine = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    probs = torch.stack([torch.from_numpy(blob(size, 12, 20, 4))] * 2)
    crops = []

    def crop_forward(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        crops.append(batch)
        return torch.zeros(len(batch), size, size), torch.zeros(len(batch), 1, size, size)

    second_pass(crop_forward, images, probs, probs[:, None], refine, [fine, None])
    box = lesion_box(probs[0].numpy(), refine)
    assert torch.equal(crops[0][0], crop_resized(images[0], box, size, fine))
    assert torch.equal(crops[0][1], crop_resized(images[1], box, size))  # none: the input
    with pytest.raises(ValueError, match="1 finer copies for a batch of 2"):
        second_pass(crop_forward, images, probs, probs[:, None], refine, [fine])


def test_decode_workers_keep_the_finer_copy_and_batches_carry_it(tmp_path: Path) -> None:
    for name, side in (("big", 200), ("small", 40)):
        stripes(side, 2).save(tmp_path / f"{name}.png")
    refine = Refine(max_zoom=2.0)
    samples = [decode_item(Item(id=name, image=Blob("file", str(tmp_path / f"{name}.png"))),
                           64, 0, refine) for name in ("big", "small")]
    assert samples[0]["fine"].shape == (3, 128, 128) and samples[1]["fine"] is None
    assert decode_item(Item(id="big", image=Blob("file", str(tmp_path / "big.png"))), 64,
                       0)["fine"] is None  # no second pass: no copy
    batch = collate([dict(s) for s in samples])
    assert batch["images"].shape == (2, 3, 64, 64)
    assert batch["fine"][0].shape == (3, 128, 128) and batch["fine"][1] is None
    assert collate([dict(samples[1])])["fine"] is None  # no image has one


def test_the_val_passes_predict_with_the_pass_and_the_finer_copies(
        tiny_checkpoint: dict, packed_shards: Path, tmp_path: Path) -> None:
    """The end-of-training val passes (tuning's `val_probabilities`, which the quality fit
    shares the loop of) see what the job predicts: the second pass, its crops from the finer
    copies of the val images larger than the model's input."""
    state, _, meta = load_weights(tiny_checkpoint["ckpt"])
    cfg = load_config(None, ["model.encoder_weights=null", "data.image_size=64",
                             "data.scale_min=0.5"])
    ckpt = save_weights(tmp_path / "best.pt", state, cfg, **meta)
    urls = tuple(split_urls(packed_shards, "val"))
    _, probs, truths = val_probabilities(ckpt, urls, 64)
    predictor = load_predictor(ckpt, InferConfig(mixed_precision="no"), torch.device("cpu"))[0]
    assert predictor.refine.max_zoom == pytest.approx(math.sqrt(2))
    images = [decode_sample(raw).image for raw in iter_raw(urls)]
    fine = [fine_copy(image, 64, predictor.refine) for image in images]
    assert len(images) == len(probs) and any(f is not None for f in fine)
    x = stack_images([eval_transform(image, None, 64)[0] for image in images])
    with_fine, from_input = predictor(x, fine), predictor(x)
    assert not torch.allclose(with_fine, from_input)  # the copies change the maps
    for got, truth, want in zip(probs, truths, with_fine, strict=True):
        h, w = truth.shape
        assert np.allclose(got, cv2.resize(want.numpy(), (w, h), interpolation=cv2.INTER_LINEAR),
                           atol=1e-5)


def test_config_checks_the_zoom_cap() -> None:
    validate(Config(infer=InferConfig(refine_max_zoom=1.5)))
    with pytest.raises(ConfigError, match="infer.refine_max_zoom"):
        validate(Config(infer=InferConfig(refine_max_zoom=0.5)))


def test_predictors_carry_the_pass_and_an_ensemble_refines_its_mean(tiny_checkpoint: dict,
                                                                    tmp_path: Path) -> None:
    ckpt = tiny_checkpoint["ckpt"]
    cpu = torch.device("cpu")
    # the tiny checkpoint's data.scale_min is unset (no zoom in training): no second pass
    assert load_predictor(ckpt, InferConfig(), cpu)[0].refine is None
    on = load_predictor(ckpt, InferConfig(refine_max_zoom=2.0), cpu)[0]
    assert on.refine == Refine(2.0)
    assert load_predictor(ckpt, InferConfig(refine=False, refine_max_zoom=2.0), cpu)[0].refine is None
    second = tmp_path / "second.pt"
    second.write_bytes(Path(ckpt).read_bytes())
    ensemble, *_ = load_ensemble([Path(ckpt), second], InferConfig(refine_max_zoom=2.0), cpu)
    assert ensemble.refine == Refine(2.0)
    assert all(m.refine is None for m in ensemble.members)
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    single_probs, _ = on.predict(x)
    ensemble_probs, ensemble_views = ensemble.predict(x)  # two equal models: the same maps
    assert torch.allclose(single_probs, ensemble_probs, atol=1e-6)
    assert ensemble_views.shape[1] == 8


def test_job_records_the_pass_and_the_api_gives_its_masks(tiny_checkpoint: dict,
                                                          tmp_path: Path) -> None:
    masks = {}
    for name, flags in (("off", ["--no-refine"]), ("on", [])):
        out = tmp_path / name
        assert main(["infer", "--checkpoint", str(tiny_checkpoint["ckpt"]), "--input",
                     str(tiny_checkpoint["images"]), "--out", str(out), "--workers", "0",
                     "--no-report", "--splits", "train", "infer.num_threads=1",
                     "infer.mixed_precision=no", "infer.refine_max_zoom=2", *flags]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["refine"] == (0 if name == "off" else 2.0)
        said = summary["review"]["uncertainty"]
        assert ("second pass" in said) == (name == "on"), said
        masks[name] = {p.stem: np.asarray(Image.open(p)) for p in (out / "masks").glob("*.png")}
    assert masks["on"].keys() == masks["off"].keys()
    assert any(not np.array_equal(masks["on"][k], masks["off"][k]) for k in masks["on"])
    seg = Segmenter.load(tiny_checkpoint["ckpt"], device="cpu", mixed_precision="no",
                         refine_max_zoom=2.0)
    assert "refine=True" in repr(seg)
    for path in sorted(Path(tiny_checkpoint["images"]).glob("*.jpg")):
        got = seg.segment(path).mask
        assert np.array_equal(got, masks["on"][f"{path.stem}_Segmentation"]), path.name


def test_a_model_trained_with_zoom_gets_the_pass_by_default(tiny_checkpoint: dict) -> None:
    cfg = load_config(None, ["data.scale_min=0.5"])
    refine = refine_for(cfg.infer.refine, cfg.data.scale_min, cfg.infer.refine_max_zoom)
    assert refine.max_zoom == pytest.approx(math.sqrt(2))


def test_report_settings_say_what_the_pass_did() -> None:
    rows = dict(settings({"refine": 1.4142, "tta": True}))
    assert rows["refine"] == "lesion-centred second pass, zoom up to 1.41×"
    assert dict(settings({"refine": 0}))["refine"] == "off"
