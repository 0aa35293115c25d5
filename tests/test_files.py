"""Atomic writes end with the mode an ordinary write would have had (umask respected)."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lesionseg.files import atomic_write_bytes, atomic_write_text, current_umask, sha256_file


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
def test_new_files_get_0666_minus_the_umask(tmp_path: Path, umask, mask: int) -> None:
    umask(mask)
    assert current_umask() == mask
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what an ordinary write gives
    written = atomic_write_text(tmp_path / "sub" / "atomic.txt", "x")
    assert _mode(written) == _mode(plain) == 0o666 & ~mask
    assert not list(written.parent.glob(".*.tmp"))


def test_an_existing_file_keeps_its_mode(tmp_path: Path, umask) -> None:
    umask(0o022)
    path = tmp_path / "kept.bin"
    path.write_bytes(b"old")
    path.chmod(0o640)
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and _mode(path) == 0o640


def test_checkpoint_config_and_mask_are_readable_by_others(tmp_path: Path, umask) -> None:
    """The files colleagues read on a shared cluster: best.pt, config.yaml, a mask PNG."""
    import numpy as np
    import torch

    from lesionseg.checkpoint import save_weights
    from lesionseg.config import load_config, save_config
    from lesionseg.data.images import write_mask

    umask(0o022)
    cfg = load_config(None, [])
    paths = [save_weights(tmp_path / "best.pt", {"w": torch.zeros(2)}, cfg),
             save_config(cfg, tmp_path / "config.yaml"),
             write_mask(tmp_path / "masks" / "a_Segmentation.png", np.zeros((4, 4), np.uint8))]
    assert {p.name: _mode(p) for p in paths} == {p.name: 0o644 for p in paths}


def test_check_output_dir_refuses_files_and_paths_below_them(tmp_path: Path) -> None:
    from lesionseg.errors import UserError
    from lesionseg.files import check_output_dir

    existing = tmp_path / "f.txt"
    existing.write_text("x")
    assert check_output_dir(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()
    for path in (existing, existing / "sub" / "deeper"):
        with pytest.raises(UserError, match=r"^--out=.*existing file"):
            check_output_dir(path, "--out")


def test_sha256_of_a_file_mapped_or_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sha256_file hashes the mapped file; an empty file (which cannot be mapped) and a file
    system without mmap are read in chunks, with the same digest."""
    data = bytes(range(256)) * 5000
    full, empty = tmp_path / "full.bin", tmp_path / "empty.bin"
    full.write_bytes(data)
    empty.write_bytes(b"")
    assert sha256_file(full) == hashlib.sha256(data).hexdigest()
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()

    def no_mmap(*args: object, **kwargs: object) -> None:
        raise OSError("mmap not supported")

    monkeypatch.setattr("lesionseg.files.mmap.mmap", no_mmap)
    assert sha256_file(full, chunk=4096) == hashlib.sha256(data).hexdigest()
