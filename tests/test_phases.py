"""The forward and the CPU stages taking turns (lesionseg/infer/phases.py)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

from lesionseg.infer import phases as phases_mod
from lesionseg.infer.phases import ForwardPhases, busy_seconds

HZ = os.sysconf("SC_CLK_TCK")


def write_stat(path: Path, busy_ticks: dict[int, int]) -> None:
    """A /proc/stat with the given busy ticks per CPU (user), idle and iowait apart."""
    lines = ["cpu  1 2 3 4 5 6 7 8 0 0"]
    lines += [f"cpu{c} {t} 0 0 999 50 0 0 0 0 0" for c, t in busy_ticks.items()]
    lines += ["intr 1 2 3", "ctxt 5"]
    path.write_text("\n".join(lines) + "\n")


def test_busy_seconds_counts_only_the_given_cpus_and_not_idle_or_iowait(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    write_stat(stat, {0: 100, 1: 300, 2: 7000})
    assert busy_seconds({0, 1}, str(stat)) == 400 / HZ
    assert busy_seconds({0, 1}, str(tmp_path / "missing")) is None


def test_stages_wait_while_the_forward_runs(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    write_stat(stat, {c: 0 for c in range(64)})
    phases = ForwardPhases(True, 1, str(stat))
    order: list[str] = []
    with phases.forward():
        stage = threading.Thread(target=lambda: (phases.wait(), order.append("stage")))
        stage.start()
        time.sleep(0.05)
        order.append("forward done")
    stage.join(5)
    assert order == ["forward done", "stage"] and phases.mode == "phased"


def test_busy_other_processes_make_the_job_share_the_cores(tmp_path: Path,
                                                           monkeypatch) -> None:
    """Other processes using more than OTHER_LOAD_MAX cores since the last look: the forward
    drops to the shared thread count for the rest of the run, and the stages stop waiting."""
    stat = tmp_path / "stat"
    cpus = sorted(os.sched_getaffinity(0))
    write_stat(stat, {c: 0 for c in cpus})
    monkeypatch.setattr(phases_mod, "own_seconds", lambda: 0.0)
    threads = torch.get_num_threads()
    try:
        phases = ForwardPhases(True, 1, str(stat))
        with phases.forward():  # a look over less than MIN_WINDOW_S: nothing decided yet
            pass
        assert phases.mode == "phased"
        time.sleep(0.1)
        write_stat(stat, {c: 0 for c in cpus[1:]} | {cpus[0]: HZ * 10})  # a core busy, not us
        with phases.forward():
            assert torch.get_num_threads() == 1
            phases.wait()  # shared: the stages run beside the forward
        assert phases.mode == "shared" and phases.others_cores > phases_mod.OTHER_LOAD_MAX
    finally:
        torch.set_num_threads(threads)


def test_inactive_phases_never_wait() -> None:
    phases = ForwardPhases(False, 1)
    with phases.forward():
        phases.wait()
    assert phases.mode == "fixed"
