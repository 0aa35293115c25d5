"""Config tree: defaults <- YAML <- overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lesionseg.config import (
    Config,
    ConfigError,
    from_dict,
    load_config,
    save_config,
    to_dict,
    was_set,
)


def test_defaults_are_valid() -> None:
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.pack.val_fraction == 0.1 and cfg.pack.max_side == 512
    # Whole-image crops at the default image_size are never upsampled from the stored size.
    assert cfg.pack.max_side * 3 >= cfg.data.image_size * 4


@pytest.mark.parametrize("overrides, key", [
    (["pack.bogus=1"], "pack.bogus"),
    (["bogus.x=1"], "bogus"),
])
def test_unknown_key_is_named(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides, key", [
    (["optim.lr=abc"], "optim.lr"),
    (["pack.workers=2.5"], "pack.workers"),
    (["data.image_size=big"], "data.image_size"),
])
def test_wrong_type_names_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides, key", [
    (["optim.lr=-1"], "optim.lr"),
    (["data.image_size=0"], "data.image_size"),
    (["pack.val_fraction=1.0"], "pack.val_fraction"),
    (["pack.val_fraction=-0.1"], "pack.val_fraction"),
    (["pack.max_side=16"], "pack.max_side"),
    (["pack.jpeg_quality=101"], "pack.jpeg_quality"),
    (["pack.workers=0"], "pack.workers"),
    (["pack.on_error=ignore"], "pack.on_error"),
    (["loss.bce_weight=0", "loss.dice_weight=0", "loss.iou_weight=0"], "loss.bce_weight"),
    (["train.mixed_precision=fp8"], "train.mixed_precision"),
])
def test_bad_value_names_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=f"config key '{key}'.*not valid"):
        load_config(None, overrides)


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["optim.lr"])


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("pack:\n  max_side: 512\n  workers: 3\noptim:\n  lr: 0.01\n")
    cfg = load_config(path, ["pack.workers=1"])
    assert cfg.pack.max_side == 512  # from the file
    assert cfg.pack.workers == 1  # override wins over the file
    assert cfg.optim.lr == 0.01
    assert was_set("pack.max_side", path, []) and was_set("pack.workers", None, ["pack.workers=1"])
    assert not was_set("pack.jpeg_quality", path, ["pack.workers=1"])


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("pack:\n  maxside: 512\n")
    with pytest.raises(ConfigError, match=r"bad_key\.yaml.*unknown config key 'pack.maxside'"):
        load_config(bad_key)
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("pack: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml.*not valid YAML"):
        load_config(not_yaml)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match=r"scalar\.yaml"):
        load_config(scalar)


def test_save_and_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["pack.max_side=256", "data.shards=shards/x"])
    saved = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(saved) == cfg
    assert from_dict(to_dict(cfg)) == cfg
    # keys a newer version added are ignored when reading an old checkpoint's dict
    data = to_dict(cfg)
    data["pack"]["future_option"] = 1
    data["future_section"] = {"x": 1}
    assert from_dict(data) == cfg


def test_a_bare_no_is_the_choice_no_not_a_boolean(tmp_path) -> None:
    """YAML parses `no` as false; for the mixed-precision choices it means "no"."""
    cfg = load_config(None, ["train.mixed_precision=no", "infer.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no" and cfg.infer.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\ninfer:\n  mixed_precision: off\n")
    cfg = load_config(path)
    assert cfg.train.mixed_precision == "no" and cfg.infer.mixed_precision == "no"
    with pytest.raises(ConfigError, match="data.on_error"):
        load_config(None, ["data.on_error=no"])  # no "no" among its choices: still an error


def test_output_dir_defaults_to_the_shard_folder_name():
    """train.output_dir was runs/demo for real data too: the demo's closing hint trained ISIC
    into the demo's run folder (and resumed or refused its state)."""
    assert load_config(None, []).train.output_dir == "runs/demo"
    assert load_config(None, ["data.shards=shards/isic2016/"]).train.output_dir == "runs/isic2016"
    assert load_config(None, ["data.shards=/data/own", "train.output_dir=runs/x"]
                       ).train.output_dir == "runs/x"
