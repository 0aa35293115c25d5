"""K-fold cross-validation folds over a shard folder's train and val cases.

A case's fold follows from a hash of (seed, id) alone, the same on every machine, rank, worker
count and rerun: the ids are ranked by sha256("<seed>/<id>") and dealt round-robin, so every
fold holds ⌊n/K⌋ or ⌈n/K⌉ cases (a plain hash modulo K leaves folds of uneven size and, on a
small set, empty ones). The official test split is never part of a fold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from lesionseg.config import load_config
from lesionseg.errors import UserError

FOLD_DIR_PREFIX = "fold-"  # fold I of a run lives in <train.output_dir>/fold-I/


def _rank_key(case_id: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}/{case_id}".encode()).digest()


def assign_folds(ids: Iterable[str], folds: int, seed: int = 0) -> dict[str, int]:
    """id → fold (0 … folds-1) for every id: ranked by the hash of (seed, id), dealt
    round-robin, so that the folds differ in size by at most one."""
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    unique = sorted(set(ids))
    ranked = sorted(unique, key=lambda i: (_rank_key(i, seed), i))
    return {case_id: position % folds for position, case_id in enumerate(ranked)}


def fold_split(ids: Iterable[str], folds: int, fold: int,
               seed: int = 0) -> tuple[frozenset[str], frozenset[str]]:
    """(training ids, held-out ids) of fold `fold`: the fold itself is held out."""
    assignment = assign_folds(ids, folds, seed)
    held_out = frozenset(i for i, f in assignment.items() if f == fold)
    return frozenset(assignment) - held_out, held_out


def fold_dir(root: str | Path, fold: int) -> Path:
    """The run folder of fold `fold` under the cross-validation run folder `root`."""
    return Path(root) / f"{FOLD_DIR_PREFIX}{fold}"


class FoldError(UserError):
    """A folder that holds no cross-validation folds."""


def fold_checkpoints(root: str | Path) -> list[Path]:
    """Every `fold-I/best.pt` under a cross-validation run folder, by fold number; a folder
    without any is a FoldError saying what it holds instead."""
    root = Path(root)
    folds = sorted((int(p.name[len(FOLD_DIR_PREFIX):]), p / "best.pt")
                   for p in root.glob(f"{FOLD_DIR_PREFIX}*")
                   if p.name[len(FOLD_DIR_PREFIX):].isdigit() and (p / "best.pt").is_file())
    if not folds:
        hint = (f"; did you mean {root / 'best.pt'}?" if (root / "best.pt").is_file()
                else "")
        raise FoldError(f"{root}: is a folder, not a checkpoint file, and holds no "
                        f"{FOLD_DIR_PREFIX}I/best.pt (not a cross-validation run folder, or none "
                        f"of its folds has finished){hint}")
    expected = load_config(folds[0][1].parent / "config.yaml").data.folds \
        if (folds[0][1].parent / "config.yaml").is_file() else 0
    missing = sorted(set(range(expected)) - {i for i, _ in folds})
    if missing:
        raise FoldError(f"{root}: {len(folds)} of its {expected} folds have a best.pt (fold(s) "
                        f"{', '.join(map(str, missing))} missing); finish them, or name the fold "
                        "files themselves")
    return [path for _, path in folds]


def parse_fold(value: str, folds: int) -> list[int]:
    """The folds `data.fold` asks for: "all" → every fold, "I" → [I]; ValueError otherwise."""
    if value == "all":
        return list(range(folds))
    if not value.isdigit() or int(value) >= folds:
        raise ValueError(f"choose all or a fold number 0..{folds - 1}")
    return [int(value)]
