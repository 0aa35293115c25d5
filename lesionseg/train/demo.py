"""The demo: with data.shards=null the train job builds a small synthetic data set once
(lesionseg.data.synthetic, packed into shards) and trains on it with small settings."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from lesionseg.config import Config, was_set
from lesionseg.data.shard_format import MANIFEST
from lesionseg.data.shards import pack
from lesionseg.data.synthetic import write_isic_dataset
from lesionseg.train import LOGGER

log = logging.getLogger(LOGGER)

# Demo defaults, applied when data.shards is null and the user did not set the key.
DEMO_DEFAULTS: dict[str, Any] = {
    "model.encoder_weights": None,  # offline machine: no ImageNet weights
    "data.image_size": 128,
    "data.batch_size": 8,
    "optim.epochs": 8,
    "train.val_every_steps": 0,
    "train.log_every_steps": 10,
}
DEMO_SOURCE_SIDES = (160, 480)  # min/max longest side of the demo's synthetic images
DEMO_PACK_MAX_SIDE = 320  # demo images are stored at most this large


def apply_demo_defaults(cfg: Config, config_file: str | None, overrides: list[str]) -> None:
    """Demo settings for every key in DEMO_DEFAULTS that the user did not set."""
    for key, value in DEMO_DEFAULTS.items():
        if not was_set(key, config_file, overrides):
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)


def build_demo_data(accelerator: Any, cfg: Config) -> str:
    """Build the synthetic demo set once (main process; the others wait) and return its folder.
    Reused while its manifest exists with the configured number of cases."""
    out = Path(cfg.data.demo_dir)
    source = Path(f"{cfg.data.demo_dir}-source")
    if accelerator.is_main_process:
        manifest = out / MANIFEST
        current = None
        if manifest.is_file():
            with contextlib.suppress(ValueError, OSError):
                current = json.loads(manifest.read_text()).get("total_samples")
        if current != cfg.data.demo_cases:
            log.info("building the demo data set: %d synthetic cases in %s, packed to %s",
                     cfg.data.demo_cases, source, out)
            shutil.rmtree(source, ignore_errors=True)
            write_isic_dataset(source, cfg.data.demo_cases, seed=0,
                               min_side=DEMO_SOURCE_SIDES[0], max_side=DEMO_SOURCE_SIDES[1],
                               progress=True)
            pack_cfg = cfg.pack
            pack_cfg.max_side = min(pack_cfg.max_side or DEMO_PACK_MAX_SIDE, DEMO_PACK_MAX_SIDE)
            pack_cfg.shard_max_samples = min(pack_cfg.shard_max_samples,
                                             max(8, cfg.data.demo_cases // 4))
            pack_cfg.val_fraction = pack_cfg.val_fraction or 0.1
            pack([source], out, pack_cfg, progress=True)
    accelerator.wait_for_everyone()
    return str(out)
