"""Samples held in memory (lesionseg/data/memory.py): the cached flips/colour equal the streamed
warp, a cached epoch is deterministic, covers every sample and resumes exactly, and the
training job says and does what data.cache decides."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lesionseg.config import load_config
from lesionseg.data.memory import CachedSamples, CachedTrainEpoch, fits, train_cacheable
from lesionseg.data.transforms import (
    AugmentParams,
    apply_augmentation,
    draw_augmentation,
    eval_transform,
    flip_and_colour,
    generator_for,
    is_flip_and_colour,
    stack_images,
)
from lesionseg.train.cache import plan_memory
from lesionseg.train.data import plan_data
from lesionseg.train.evaluate import evaluate_checkpoint
from lesionseg.train.loader import Loader
from lesionseg.train.streams import ValStream
from tests.test_training import TINY, run_train


def _photo(h: int, w: int, seed: int) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 5:h * 3 // 4, w // 3:w * 5 // 6] = 255
    return Image.fromarray(rgb, "RGB"), Image.fromarray(mask, "L")


@pytest.mark.parametrize("soft", [False, True], ids=["binary", "soft"])
@pytest.mark.parametrize("shape", [(90, 120), (300, 451), (40, 40)])
def test_flips_and_colour_on_the_resized_copy_equal_the_streamed_warp(shape, soft):
    """The augmentation applied to the eval-resized copy (cached path) against the one warp
    from the source (streamed path): binary masks identical, images (and soft masks) within
    one grey level."""
    image, mask = _photo(*shape, seed=shape[0])
    params = AugmentParams(size=64, scale_min=1.0, rotate_degrees=0.0, color_jitter=0.3,
                           tint=0.2, skin_tone=2.0, grey_prob=0.3)
    base_image, base_mask = eval_transform(image, mask, 64, soft_mask=soft)
    flipped = 0
    for i in range(12):
        aug = draw_augmentation(mask.height, mask.width, params, generator_for(i))
        assert is_flip_and_colour(aug)
        flipped += aug.hflip + aug.vflip
        streamed = apply_augmentation(image, mask, aug, soft_mask=soft)
        cached = flip_and_colour(base_image, base_mask, aug)
        if soft:
            assert (cached[1].int() - streamed[1].int()).abs().max() <= 1
        else:
            assert torch.equal(cached[1], streamed[1])
        diff = (cached[0].int() - streamed[0].int()).abs().max()
        assert diff <= 1, f"draw {i}: images differ by {diff}"
        assert cached[0].permute(1, 2, 0).is_contiguous()  # HWC memory, as the stream gives
    assert flipped >= 6  # the draws did flip


def test_soft_masks_hold_each_pixels_lesion_share():
    """Area-resampled masks: 0 and 255 away from the border, the covered share on it; their
    mean is the lesion's area fraction and, cut at half, they are the nearest-sampled mask."""
    image, mask = _photo(301, 449, seed=3)
    _, hard = eval_transform(image, mask, 32)
    _, soft = eval_transform(image, mask, 32, soft_mask=True)
    assert soft.dtype == torch.uint8 and soft.shape == hard.shape
    between = ((soft > 0) & (soft < 255)).float().mean()
    assert 0 < between < 0.2  # only border pixels are partly lesion
    area = (np.asarray(mask) > 127).mean()
    assert float(soft.float().mean() / 255) == pytest.approx(area, abs=0.005)
    assert ((soft > 127) == (hard > 0)).float().mean() > 0.98


def test_crops_and_rotations_are_refused_and_not_cacheable():
    params = AugmentParams(size=32, scale_min=0.5, rotate_degrees=0.0)
    aug = draw_augmentation(50, 70, params, generator_for(0, "crop"))
    assert not is_flip_and_colour(aug)
    with pytest.raises(ValueError, match="whole-image"):
        flip_and_colour(torch.zeros(3, 32, 32, dtype=torch.uint8),
                        torch.zeros(1, 32, 32, dtype=torch.uint8), aug)
    assert not train_cacheable(params)
    assert not train_cacheable(AugmentParams(size=32, scale_min=1.0, rotate_degrees=10.0))
    assert train_cacheable(AugmentParams(size=32, scale_min=1.0, rotate_degrees=0.0,
                                         color_jitter=0.2))
    assert fits(100, 64, 2) and not fits(200, 64, 2)  # 4 × 64² B each: 1.6 vs 3.1 MiB


def _samples(n: int, size: int = 16) -> CachedSamples:
    images = [torch.full((size, size, 3), i, dtype=torch.uint8).permute(2, 0, 1)
              for i in range(n)]
    masks = [torch.zeros(1, size, size, dtype=torch.uint8) for _ in range(n)]
    return CachedSamples([f"ISIC_{i:07d}" for i in range(n)], images, masks, [])


def test_cached_epoch_is_seeded_covers_every_sample_and_resumes_exactly():
    samples = _samples(12)
    params = AugmentParams(size=16, scale_min=1.0, rotate_degrees=0.0)

    def epoch(epoch: int, rank: int = 0, world: int = 1, start: int = 0, batches: int = 6):
        return list(CachedTrainEpoch(samples, params, 0, epoch, rank, world, 2, batches, start))

    full = epoch(0)
    assert [b["id"] for b in full] == [b["id"] for b in epoch(0)]  # deterministic
    ids = [i for b in full for i in b["id"]]
    assert sorted(ids) == samples.ids  # one epoch: every sample exactly once
    assert ids != [i for b in epoch(1) for i in b["id"]]  # a new order each epoch
    resumed = epoch(0, start=4)
    assert len(resumed) == 2
    for a, b in zip(full[4:], resumed, strict=True):
        assert a["id"] == b["id"] and torch.equal(a["image"], b["image"])
        assert torch.equal(a["mask"], b["mask"])
    # Two ranks take disjoint halves of every step; together they are one rank's epoch.
    r0, r1 = epoch(0, 0, 2, batches=3), epoch(0, 1, 2, batches=3)
    both = [i for a, b in zip(r0, r1, strict=True) for i in a["id"] + b["id"]]
    assert both == ids
    assert full[0]["image"].is_contiguous(memory_format=torch.channels_last)
    # A short last batch wraps around to the epoch's first samples.
    wrapped = list(CachedTrainEpoch(_samples(5), params, 0, 0, 0, 1, 2, 3))
    assert len(wrapped[-1]["id"]) == 2 and wrapped[-1]["id"][1] == wrapped[0]["id"][0]


def test_cached_samples_equal_the_val_stream_and_ignore_worker_count(packed_shards):
    cfg = load_config(overrides=[f"data.shards={packed_shards}", "data.image_size=48",
                                 "data.batch_size=3", "data.num_workers=0"])
    data = plan_data(str(packed_shards))
    one = CachedSamples.from_batches(ValStream(data.train_urls, cfg, 0, 1))
    cfg.data.num_workers = 2
    with Loader(ValStream(data.train_urls, cfg, 0, 1), cfg, torch.device("cpu")) as loader:
        two = CachedSamples.from_batches(loader)
    assert one.ids == two.ids and len(one) == data.train_count
    assert all(torch.equal(a, b) for a, b in zip(one.images, two.images, strict=True))
    assert stack_images(one.images[:2]).is_contiguous(memory_format=torch.channels_last)


def _memory_cfg(packed_shards, *overrides: str):
    cfg = load_config(overrides=[f"data.shards={packed_shards}", "data.image_size=32",
                                 "data.num_workers=0", "data.rotate_degrees=0",
                                 "data.color_jitter=0", "data.tint=0", *overrides])
    return cfg, plan_data(str(packed_shards))


def test_plan_memory_follows_the_augmentation_the_budget_and_the_switch(packed_shards):
    cfg, data = _memory_cfg(packed_shards, "data.scale_min=1.0")
    memory = plan_memory(cfg, data)
    assert memory.train is not None and len(memory.train) == data.train_count
    assert memory.val.enabled and "decoded once" in memory.describe()
    cfg, data = _memory_cfg(packed_shards, "data.scale_min=0.5")
    memory = plan_memory(cfg, data)
    assert memory.train is None and memory.val.enabled
    assert "crops or rotates" in memory.describe()
    cfg, data = _memory_cfg(packed_shards, "data.scale_min=1.0", "data.cache_max_mb=0")
    memory = plan_memory(cfg, data)
    assert memory.train is None and not memory.val.enabled
    assert "data.cache_max_mb=0" in memory.describe()
    cfg, data = _memory_cfg(packed_shards, "data.scale_min=1.0", "data.cache=false")
    memory = plan_memory(cfg, data)
    assert memory.train is None and not memory.val.enabled


@pytest.mark.slow
def test_training_from_memory_says_so_and_matches_its_validation(packed_shards, tmp_path):
    """A short run decodes its train set once and keeps the val batches: the start-up line
    says so, and every validation scores what a streamed validation scores."""
    out = tmp_path / "run"
    r = run_train([f"data.shards={packed_shards}", *TINY, "optim.max_steps=6",
                   "optim.steps_per_epoch=2", f"train.output_dir={out}",
                   "train.tune_postprocess=false"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train images decoded once into memory" in r.stderr
    assert "val batches kept after the first validation" in r.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3  # one validation per epoch, the last two from kept batches
    streamed = evaluate_checkpoint(out / "last.pt")
    assert streamed["dice"] == pytest.approx(lines[-1]["dice"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["true", "false"], ids=["from-memory", "streamed"])
def test_soft_mask_training_runs_both_ways(packed_shards, tmp_path, cache):
    """data.soft_masks=true through the cached and the streamed (cropping) pipelines: the run
    finishes (a non-finite loss would stop it: train.max_bad_steps) and validates."""
    out = tmp_path / "run"
    r = run_train([f"data.shards={packed_shards}", *TINY, "optim.max_steps=4",
                   "optim.steps_per_epoch=2", "data.soft_masks=true", f"data.cache={cache}",
                   "data.scale_min=0.6", "train.tune_postprocess=false",
                   f"train.output_dir={out}"] + (["data.scale_min=1.0"] if cache == "true"
                                                 else []))
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("decoded once" in r.stderr) == (cache == "true")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines and all(0 <= x["dice"] <= 1 for x in lines)
