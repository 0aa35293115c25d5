"""Shared data fixtures: tiny synthetic ISIC data sets and a packed shard folder.

Session-scoped fixtures are shared by every test: treat them as read-only (copy them, or use
`make_isic`, when a test needs to change files). All images have sides of 64-160 px, so the
whole set is written and packed in about a second.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lesionseg.checkpoint import save_weights
from lesionseg.config import PackConfig, load_config
from lesionseg.data.images import load_image
from lesionseg.data.shards import pack
from lesionseg.data.synthetic import write_isic_dataset
from lesionseg.data.transforms import eval_transform, stack_images, to_float_images
from lesionseg.model import MobileNetEncoderDecoder

TINY = {"min_side": 64, "max_side": 160}  # image sizes of every fixture data set
ISIC_TRAIN, ISIC_TEST = 16, 4  # cases in `isic_root` / `isic_zips` (ids ISIC_0000000 … 19)


@pytest.fixture(scope="session")
def isic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only ISIC root with the four official folders: 16 training + 4 test cases."""
    return write_isic_dataset(tmp_path_factory.mktemp("isic_root"), ISIC_TRAIN, ISIC_TEST,
                              seed=0, **TINY)


@pytest.fixture(scope="session")
def isic_zips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only folder holding the four official ISIC 2016 zips (same cases as isic_root)."""
    return write_isic_dataset(tmp_path_factory.mktemp("isic_zips"), ISIC_TRAIN, ISIC_TEST,
                              seed=0, zips=True, **TINY)


@pytest.fixture(scope="session")
def packed_shards(tmp_path_factory: pytest.TempPathFactory, isic_root: Path) -> Path:
    """Read-only packed folder of isic_root: train/val/test shards of <= 4 samples, images
    stored at <= 128 px, val fraction 0.25 (ids split by hash, seed 0), plus manifest.json."""
    out = tmp_path_factory.mktemp("packed") / "shards"
    cfg = PackConfig(val_fraction=0.25, max_side=128, shard_max_samples=4, workers=1)
    pack([isic_root], out, cfg, progress=False)
    return out


@pytest.fixture
def make_isic(tmp_path: Path) -> Callable[..., Path]:
    """Factory for a private, writable ISIC data set: make_isic(n_train=4, n_test=0, **kw)
    (kw as for write_isic_dataset: seed, min_side, max_side, zips, and name for the folder)."""

    def make(n_train: int = 4, n_test: int = 0, name: str = "isic", **kw) -> Path:
        return write_isic_dataset(tmp_path / name, n_train, n_test, **{**TINY, **kw})

    return make


TINY_SIZE = 64  # image_size of `tiny_checkpoint`
TINY_POSTPROCESS = {"threshold": 0.45, "steps": ["main"], "name": "main"}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Read-only: 5 synthetic ISIC cases (48-160 px) and a random 64-px checkpoint holding a
    stored post-processing choice (TINY_POSTPROCESS), its head bias shifted so that its masks
    are neither empty nor full (equal masks must mean something). Keys: ckpt, images, truth."""
    root = tmp_path_factory.mktemp("tiny_ckpt")
    isic = write_isic_dataset(root / "isic", 5, 0, seed=5, min_side=48, max_side=160)
    images = isic / "ISBI2016_ISIC_Part1_Training_Data"
    torch.manual_seed(1)
    model = MobileNetEncoderDecoder().eval()
    batch = to_float_images(stack_images([
        eval_transform(load_image(p.read_bytes())[0], None, TINY_SIZE)[0]
        for p in sorted(images.glob("*.jpg"))]))
    with torch.no_grad():  # a wide logit spread, centred on the stored threshold
        model.decoder.head.weight *= 20
        logits = model(batch)
        model.decoder.head.bias -= logits.median() - torch.logit(torch.tensor(0.45))
    cfg = load_config(None, ["model.encoder_weights=null", f"data.image_size={TINY_SIZE}"])
    ckpt = save_weights(root / "run" / "best.pt", model.state_dict(), cfg, step=3, epoch=1,
                        val={"dice": 0.5, "jaccard": 0.4}, postprocess=dict(TINY_POSTPROCESS))
    return {"ckpt": ckpt, "images": images,
            "truth": isic / "ISBI2016_ISIC_Part1_Training_GroundTruth"}
