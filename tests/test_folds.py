"""Fold assignment (lesionseg.data.folds) and the data.folds / data.fold settings."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lesionseg.config import ConfigError, load_config
from lesionseg.data.folds import FoldError, assign_folds, fold_checkpoints, fold_split, parse_fold

IDS = [f"ISIC_{i:07d}" for i in range(103)]


def test_assignment_is_deterministic_and_independent_of_order() -> None:
    shuffled = list(IDS)
    random.Random(3).shuffle(shuffled)
    assert assign_folds(IDS, 5, seed=7) == assign_folds(shuffled, 5, seed=7)
    # A fixed answer: the same on every machine and Python (sha256, not hash()).
    assert [assign_folds(IDS, 5, seed=0)[i] for i in IDS[:10]] == [0, 0, 3, 2, 2, 2, 1, 3, 1, 2]
    assert assign_folds(IDS, 5, seed=0) != assign_folds(IDS, 5, seed=1)


@pytest.mark.parametrize("folds", [2, 3, 5, 10])
def test_folds_are_disjoint_cover_every_id_once_and_balanced(folds: int) -> None:
    held_out = [fold_split(IDS, folds, f, seed=0)[1] for f in range(folds)]
    assert sum(len(h) for h in held_out) == len(IDS)
    assert frozenset().union(*held_out) == frozenset(IDS)  # every id once: sizes add up
    assert max(map(len, held_out)) - min(map(len, held_out)) <= 1
    for f in range(folds):
        train, val = fold_split(IDS, folds, f, seed=0)
        assert not train & val and train | val == frozenset(IDS)


def test_fold_numbers_and_bad_settings_are_one_line_errors() -> None:
    assert parse_fold("all", 3) == [0, 1, 2] and parse_fold("2", 3) == [2]
    with pytest.raises(ValueError):
        parse_fold("3", 3)
    with pytest.raises(ValueError):
        assign_folds(IDS, 1)
    cfg = load_config(None, ["data.folds=5", "data.fold=4"])
    assert (cfg.data.folds, cfg.data.fold) == (5, "4")
    for overrides, words in ((["data.folds=1"], "data.folds"),
                             (["data.folds=5", "data.fold=5"], "0..4"),
                             (["data.folds=3", "data.fold=one"], "data.fold"),
                             (["data.fold=1"], "needs data.folds")):
        with pytest.raises(ConfigError, match=words) as e:
            load_config(None, overrides)
        assert "\n" not in str(e.value)


def test_fold_checkpoints_finds_every_fold_or_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FoldError, match="no fold-I/best.pt"):
        fold_checkpoints(tmp_path)
    (tmp_path / "best.pt").write_bytes(b"x")
    with pytest.raises(FoldError, match="did you mean .*best.pt"):
        fold_checkpoints(tmp_path)
    for i in (0, 2):
        (tmp_path / f"fold-{i}").mkdir()
        (tmp_path / f"fold-{i}" / "best.pt").write_bytes(b"x")
        (tmp_path / f"fold-{i}" / "config.yaml").write_text("data:\n  folds: 3\n  fold: '0'\n")
    with pytest.raises(FoldError, match=r"2 of its 3 folds .*fold\(s\) 1 missing"):
        fold_checkpoints(tmp_path)
    (tmp_path / "fold-1").mkdir()
    (tmp_path / "fold-1" / "best.pt").write_bytes(b"x")
    assert fold_checkpoints(tmp_path) == [tmp_path / f"fold-{i}" / "best.pt" for i in range(3)]
