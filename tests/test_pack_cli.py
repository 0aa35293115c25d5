"""The pack job as a user runs it (`python jobs/pack.py`), and the verify command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lesionseg.cli import main
from lesionseg.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_pack_job_subprocess(isic_zips: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards" / "isic"
    zips = sorted(isic_zips.glob("*.zip"))
    cmd = [sys.executable, "jobs/pack.py", *[a for z in zips for a in ("--source", str(z))],
           "--out", str(out), "--max-side", "96", "--workers", "2", "--val-fraction", "0.2",
           "--no-progress", "pack.shard_max_samples=3", "pack.jpeg_quality=90"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "packed 20 cases (train" in proc.stdout and "test 4)" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["max_side"] == 96 and manifest["options"]["jpeg_quality"] == 90
    assert manifest["options"]["val_fraction"] == 0.2
    assert all(s["samples"] <= 3 for s in manifest["shards"])
    assert load_config(out / "config.yaml").pack.shard_max_samples == 3


def test_verify_command(packed_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["verify", str(packed_shards), "--decode"]) == 0
    assert capsys.readouterr().out.startswith("OK ")
    folder = tmp_path / "copy"
    folder.mkdir()
    for p in packed_shards.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    shard = folder / "test-000000.tar"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "test-000000.tar: sha256 differs" in out


def test_pack_errors_are_one_line(isic_root: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    rc = main(["pack", "--source", str(isic_root), "--out", str(tmp_path / "o"), "--max-side", "8"])
    assert rc == 2 and "config key 'pack.max_side'" in capsys.readouterr().err
    rc = main(["pack", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing: source does not exist" in err and len(err.strip().splitlines()) == 1
    assert main(["verify", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_a_second_pack_into_a_folder_being_packed_is_refused(isic_root: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """Two packs into one --out: the later one deleted the earlier one's .partial shard (which
    then crashed) and the two mixed their shards. Now the folder is locked while a pack
    writes; the second gets one line and status 2, and touches nothing."""
    from lesionseg.data import shards

    out = tmp_path / "out"
    out.mkdir()
    partial = out / ".train-000000.tar.partial"
    with shards._pack_lock(out):  # a pack in progress (in another process, for flock)
        partial.write_bytes(b"being written")
        rc = main(["pack", "--source", str(isic_root), "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "another pack is writing into" in err[0]
        assert partial.read_bytes() == b"being written"
        assert not (out / "manifest.json").exists()
    partial.unlink()
    assert main(["pack", "--source", str(isic_root), "--out", str(out), "--no-progress",
                 "--max-side", "64"]) == 0  # the lock went with its holder
    assert main(["pack", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


class _FullDisk:
    """A shard file on a disk that fills up after `room` bytes: writes fail with ENOSPC, and
    so does close (as a buffered file's final flush does)."""

    def __init__(self, path: Path, room: int) -> None:
        import builtins

        self.file = builtins.open(path, "wb")  # noqa: SIM115 (closed by close())
        self.room, self.failed = room, False

    def write(self, data: bytes) -> int:
        import errno

        self.room -= len(data)
        if self.room < 0:
            self.failed = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def tell(self) -> int:
        return self.file.tell()

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()

    def close(self) -> None:
        import errno

        self.file.close()
        if self.failed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failure", ["full", "read-only"])
def test_pack_on_a_full_disk_or_read_only_folder_is_one_line(isic_root: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture,
                                                            failure: str) -> None:
    """ENOSPC while writing a shard, or EROFS on the folder: one line and status 2 (they were
    tracebacks), and no `.partial` file left behind (ShardWriter.abort raised on close)."""
    import builtins
    import errno

    from lesionseg.data import shards

    real_open = builtins.open

    def fake_open(path, mode="r", *args, **kwargs):
        if failure == "read-only" and any(m in mode for m in "wax"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        if failure == "full" and str(path).endswith(".partial"):
            return _FullDisk(Path(path), room=20_000)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(shards, "open", fake_open, raising=False)
    out = tmp_path / "out"
    out.mkdir()
    rc = main(["pack", "--source", str(isic_root), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    expect = "No space left on device" if failure == "full" else "Read-only file system"
    assert len(err) == 1 and expect in err[0] and "rerun" in err[0], err
    assert not list(out.glob(".*.partial")) and not (out / "manifest.json").exists()
