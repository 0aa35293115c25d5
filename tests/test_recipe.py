"""The self-configuring recipe: what it picks from the encoder and the schedule, and that a
value the user set is never touched."""

from __future__ import annotations

import pytest

from lesionseg.config import ConfigError, load_config
from lesionseg.recipe import AUGMENTATION_LEVELS, resolve


def test_random_encoder_short_schedule_learns_fast_with_light_augmentation() -> None:
    cfg = load_config(None, ["model.encoder_weights=null"])
    recipe = resolve(cfg, total_steps=156, steps_per_epoch=13)  # 12 epochs
    o, d = cfg.optim, cfg.data
    assert (o.lr, o.encoder_lr_mult, o.warmup_steps) == (3e-3, 1.0, 8)
    assert (d.scale_min, d.rotate_degrees, d.color_jitter, d.tint) == (1.0, 0.0, 0.0, 0.0)
    line = recipe.describe()
    assert "optim.encoder_lr_mult=1.0 (random encoder" in line
    assert "light augmentation for 12 epochs" in line and "5% of 156 steps" in line


def test_pretrained_encoder_long_schedule_fine_tunes_with_more_augmentation() -> None:
    cfg = load_config(None, [])  # encoder_weights=imagenet by default (nothing is loaded here)
    resolve(cfg, total_steps=113 * 40, steps_per_epoch=113)  # ISIC 2016: 40 epochs of 113
    o, d = cfg.optim, cfg.data
    assert (o.lr, o.encoder_lr_mult) == (1e-3, 0.1)
    assert o.warmup_steps == 100  # 5%, capped
    assert (d.scale_min, d.rotate_degrees, d.color_jitter, d.tint) == (0.5, 15.0, 0.25, 0.2)
    long = load_config(None, ["model.encoder_weights=/some/file.pth"])
    recipe = resolve(long, total_steps=100 * 80, steps_per_epoch=100)
    assert long.data.rotate_degrees == AUGMENTATION_LEVELS[-1][3]
    assert "file encoder" in recipe.describe()


def test_keys_the_user_set_are_kept_and_not_reported() -> None:
    cfg = load_config(None, ["model.encoder_weights=null", "optim.lr=0.01",
                             "data.rotate_degrees=5", "optim.warmup_steps=0"])
    recipe = resolve(cfg, total_steps=10, steps_per_epoch=1)
    assert (cfg.optim.lr, cfg.data.rotate_degrees, cfg.optim.warmup_steps) == (0.01, 5, 0)
    assert not {"optim.lr", "data.rotate_degrees", "optim.warmup_steps"} & set(recipe.choices)
    assert "optim.encoder_lr_mult" in recipe.choices
    every = load_config(None, ["optim.lr=0.01", "optim.encoder_lr_mult=0.5",
                               "optim.warmup_steps=3", "data.scale_min=0.5",
                               "data.rotate_degrees=0", "data.color_jitter=0",
                               "data.tint=0"])
    assert resolve(every, 10, 1).describe() == "every recipe key set explicitly"


def test_frozen_encoder_gets_no_encoder_rate_and_tiny_runs_warm_up_less() -> None:
    cfg = load_config(None, ["model.encoder_weights=null", "model.freeze_encoder=true"])
    resolve(cfg, total_steps=3, steps_per_epoch=1)
    assert cfg.optim.encoder_lr_mult == 0.0
    assert cfg.optim.warmup_steps == 2  # never the whole run


def test_auto_keys_accept_null_and_still_check_ranges() -> None:
    assert load_config(None, ["optim.lr=null"]).optim.lr is None
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, ["optim.lr=0"])
    with pytest.raises(ConfigError, match="data.scale_min"):
        load_config(None, ["data.scale_min=1.5"])
