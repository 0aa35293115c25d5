"""lesionseg.states: training states that are damaged, half-deleted or written by someone
else are never loaded blindly, and nothing in them runs on resume.

One tiny run (2 steps, a state after each) is shared; each test resumes a copy of it with
`python jobs/train.py` as a user does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lesionseg import states
from lesionseg.errors import EXIT_USAGE
from lesionseg.files import current_umask

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.image_size=64", "data.batch_size=2", "data.num_workers=0",
        "model.encoder_weights=null", "tracking.backend=none", "train.num_threads=1",
        "optim.warmup_steps=1", "train.save_every_steps=1", "train.keep_states=3",
        "train.val_every_steps=2"]


def run_train(shards: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), f"data.shards={shards}",
                           *TINY, f"train.output_dir={out}", *extra],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_states(packed_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder holding states/step-0000001 and step-0000002 (read-only: copy it)."""
    out = tmp_path_factory.mktemp("states") / "run"
    r = run_train(packed_shards, out, "optim.max_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in states.state_dirs(out)] == ["step-0000001", "step-0000002"]
    return out


class Payload:
    """Pickles to a call of os.mkdir(marker): proof that a file was unpickled freely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_a_saved_state_has_json_progress_a_marker_and_no_custom_pickle(two_states: Path) -> None:
    folder = two_states / "states" / "step-0000002"
    names = {p.name for p in folder.iterdir()}
    assert {"progress.json", "scheduler.json", "complete.json", "model.safetensors"} <= names
    assert not [n for n in names if n.startswith("custom_checkpoint")]
    assert json.loads((folder / "progress.json").read_text())["step"] == 2
    marker = json.loads((folder / "complete.json").read_text())
    assert set(marker["files"]) == names - {"complete.json"}
    assert states.state_problem(folder) is None


def test_every_file_of_a_run_follows_the_umask(two_states: Path) -> None:
    """States included: safetensors alone writes model.safetensors 0600."""
    want = 0o666 & ~current_umask()
    modes = {str(p.relative_to(two_states)): oct(p.stat().st_mode & 0o777)
             for p in two_states.rglob("*") if p.is_file()}
    assert "states/step-0000002/model.safetensors" in modes
    assert {k: m for k, m in modes.items() if m != oct(want)} == {}


def test_planted_pickle_payload_never_runs_on_resume(two_states: Path, packed_shards: Path,
                                                      tmp_path: Path) -> None:
    """A `__reduce__` payload as the newest state's custom checkpoint (where Accelerate would
    unpickle with weights_only=False): the state is refused with a warning naming the file,
    the run resumes from the older one, and the payload never ran."""
    run = _copy(two_states, tmp_path)
    marker = tmp_path / "payload-ran"
    torch.save(Payload(marker), run / "states" / "step-0000002" / "custom_checkpoint_1.pkl")
    r = run_train(packed_shards, run, "optim.max_steps=3")
    assert not marker.exists(), "the planted pickle was executed"
    assert r.returncode == 0, r.stderr[-3000:]
    assert "custom_checkpoint_1.pkl" in r.stderr and "resumed from" in r.stderr
    assert "step-0000001" in r.stderr.split("resumed from", 1)[1].splitlines()[0]
    assert (run / "states" / "damaged-step-0000002").is_dir()


@pytest.mark.parametrize("victim", ["optimizer.bin", "random_states_0.pkl"])
def test_foreign_state_with_a_payload_is_refused_in_one_line(two_states: Path, packed_shards: Path,
                                                             tmp_path: Path, victim: str) -> None:
    """train.resume=FOLDER pointing at a state someone else wrote, marker and all: a pickle
    that weights_only=True refuses stops the run (one line, status 2) before anything loads."""
    run = _copy(two_states, tmp_path)
    folder = run / "states" / "step-0000002"
    marker = tmp_path / "payload-ran"
    torch.save({"state": Payload(marker)}, folder / victim)
    states.write_marker(folder, 2)  # a consistent-looking foreign state
    r = run_train(packed_shards, tmp_path / "new", "optim.max_steps=3", f"train.resume={folder}")
    assert not marker.exists(), "the planted pickle was executed"
    assert r.returncode == EXIT_USAGE, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert victim in last and "weights_only" in last and "Traceback" not in r.stderr


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.bin", "scheduler.json"])
def test_damaged_newest_state_falls_back_to_the_previous_one(two_states: Path, packed_shards: Path,
                                                            tmp_path: Path, victim: str) -> None:
    """A truncated file in the newest state: resume warns naming it, moves the state aside and
    continues from the older one (it used to exit 1 with a SafetensorError traceback)."""
    run = _copy(two_states, tmp_path)
    path = run / "states" / "step-0000002" / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    r = run_train(packed_shards, run, "optim.max_steps=3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{victim}: " in r.stderr and "truncated" in r.stderr
    assert "step-0000001" in r.stderr.split("resumed from", 1)[1].splitlines()[0]
    assert [p.name for p in states.state_dirs(run)] == ["step-0000001", "step-0000002",
                                                        "step-0000003"]


def test_half_deleted_and_unmarked_states_are_not_chosen(two_states: Path, tmp_path: Path) -> None:
    """A state missing a listed file (a prune killed midway) or without its marker is skipped;
    with no intact state at all the error names the newest problem."""
    run = _copy(two_states, tmp_path)
    half = run / "states" / ".tmp-removed-step-0000000"  # a prune killed midway
    half.mkdir()
    (half / "progress.json").write_text("{}")
    (run / "states" / "step-0000002" / "optimizer.bin").unlink()
    problem = states.state_problem(run / "states" / "step-0000002")
    assert problem and "optimizer.bin: missing" in problem
    assert states._choose("auto", run) == run / "states" / "step-0000001"
    assert not half.exists()
    (run / "states" / "step-0000001" / "complete.json").unlink()
    assert (run / "states" / "step-0000001").is_dir()
    with pytest.raises(states.StateError, match="no intact training state.*complete.json"):
        states._choose("auto", run)
