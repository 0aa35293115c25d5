"""Starting the processes a command was asked for. Accelerate 1.15's `accelerate launch --cpu
--num_processes N` (and `accelerate launch --num_processes N` on a machine without a GPU)
starts ONE process and tells it nothing about N; training and inference
notice (from the launcher's command line) and run themselves as N gloo ranks on this machine,
as `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu …` would, watched by that first
process: one exit status (2 user error, 75 stopped, …), stop signals passed on once, no rank
left running when another failed, no torchrun tracebacks."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lesionseg.errors import EXIT_FAILED, EXIT_OK, EXIT_RESUME, EXIT_USAGE

log = logging.getLogger(__name__)

RELAUNCH_ENV = "LESIONSEG_RELAUNCHED"  # set on the torch.distributed.run we start ourselves
NO_RELAUNCH_ENV = "LESIONSEG_NO_RELAUNCH"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
RANK_GRACE_S = 30.0  # after one rank failed, how long the others may take to end on their own


def requested_processes(env: Mapping[str, str], parent_argv: list[str]) -> int:
    """N when this process is the single one an `accelerate launch … --num_processes N` started
    through Accelerate's simple launcher (1 otherwise: real ranks, or another launcher). That
    launcher tells its process nothing about N, so the parent's command line is where N can be
    read."""
    dist_env = ("WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", RELAUNCH_ENV)
    if any(env.get(k) for k in dist_env):
        return 1
    if not any("accelerate" in a for a in parent_argv[:2]) or "launch" not in parent_argv:
        return 1
    for i, arg in enumerate(parent_argv):
        for flag in ("--num_processes", "--num-processes"):
            value = None
            if arg.startswith(flag + "="):
                value = arg[len(flag) + 1:]
            elif arg == flag and i + 1 < len(parent_argv):
                value = parent_argv[i + 1]
            if value is not None and value.isdigit():
                return int(value)
    return 1


def requested_cpu_processes(env: Mapping[str, str], parent_argv: list[str], gpus: int = 0) -> int:
    """N when this process is the single one `accelerate launch --cpu --num_processes N`
    started, or `accelerate launch --num_processes N` on a machine without a GPU (`gpus` = 0:
    Accelerate then starts one process too); 1 otherwise. With a GPU and no --cpu the one
    process is Accelerate's choice (one GPU and no --multi_gpu), warned about, not changed."""
    return requested_processes(env, parent_argv) if _use_cpu(env) or gpus == 0 else 1


def _use_cpu(env: Mapping[str, str]) -> bool:
    """Whether Accelerate was told to run on the CPU (`--cpu`: ACCELERATE_USE_CPU)."""
    return env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1")


def _parent_argv() -> list[str]:
    """The parent process's command line (Linux /proc; empty elsewhere)."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def maybe_relaunch_cpu_ranks(stop_grace_s: float = 0.0) -> int | None:
    """Turn `accelerate launch --cpu --num_processes N` (N > 1), or `--num_processes N` without
    --cpu on a machine without a GPU, which start one process, into N real gloo ranks started
    and watched by this process (`run_cpu_ranks`); returns their exit status, or None when
    this process is to run the job itself (set
    LESIONSEG_NO_RELAUNCH=1 to only warn). Called after the config was checked: a user error
    is one line from one process, before any rank starts."""
    import torch

    parent, gpus = _parent_argv(), torch.cuda.device_count()
    asked = requested_processes(os.environ, parent)
    n = requested_cpu_processes(os.environ, parent, gpus)
    if asked > 1 and n <= 1:
        log.warning("`accelerate launch --num_processes %d` without --multi_gpu started ONE "
                    "process on this machine's %d GPU; this run uses 1 process. For %d GPU "
                    "ranks: accelerate launch --multi_gpu --num_processes %d …", asked, gpus,
                    asked, asked)
    if n <= 1:
        return None
    how = "--cpu " if _use_cpu(os.environ) else ""
    where = "" if how else " (no GPU here)"
    if os.environ.get(NO_RELAUNCH_ENV) == "1":
        log.warning("`accelerate launch %s--num_processes %d` started ONE process%s; this run "
                    "uses 1 process. For %d CPU ranks use: ACCELERATE_USE_CPU=true accelerate "
                    "launch --multi_gpu --num_processes %d --num_machines 1 …", how, n, where,
                    n, n)
        return None
    log.warning("`accelerate launch %s--num_processes %d` starts only one process%s; "
                "relaunching as %d CPU (gloo) ranks", how, n, where, n)
    return run_cpu_ranks(n, [sys.executable, sys.argv[0], *sys.argv[1:]],
                         stop_grace_s=stop_grace_s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(n: int, port: int) -> dict[str, str]:
    """What torch.distributed's env:// rendezvous and Accelerate read, for ranks on this
    machine (RANK and LOCAL_RANK are added per rank)."""
    env = dict(os.environ, ACCELERATE_USE_CPU="true", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
               GROUP_RANK="0", NODE_RANK="0", **{RELAUNCH_ENV: "1"})
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    return env


def run_cpu_ranks(n: int, argv: list[str], grace_s: float = RANK_GRACE_S,
                  stop_grace_s: float = 0.0) -> int:
    """Run `argv` as N gloo ranks on this machine and return one exit status for all: 0 when
    every rank succeeded, 2 when one stopped on a user error, 75 when they stopped on a
    signal (a state saved), else the first failing rank's status (1 for a signal).

    Stop signals sent to this process are passed on to every rank, once each (the ranks run
    in their own process groups, so a Ctrl-C at the terminal reaches them only through here;
    a second Ctrl-C ends them at once). When a rank fails, the others get `grace_s` seconds
    to end on their own (they notice in their next collective) before they are killed, so
    no rank is ever left running. After a stop signal, a rank still running `stop_grace_s` +
    `grace_s` seconds later (stopped, or stuck where its own watch cannot help; 0: no
    limit) is killed, with one line. A rank that died of a signal, which could not say so
    itself, gets one line here."""
    env = rank_environment(n, _free_port())
    sys.stdout.flush()
    sys.stderr.flush()
    ranks = [subprocess.Popen(argv, env=dict(env, RANK=str(i), LOCAL_RANK=str(i)),
                              process_group=0) for i in range(n)]
    interrupts = 0
    stop_deadline: float | None = None
    stopped_by_us: set[int] = set()  # ranks killed after a stop: they count as stopped

    def forward(signum: int, _frame: Any) -> None:
        nonlocal interrupts, stop_deadline
        interrupts += signum == signal.SIGINT
        if stop_grace_s > 0 and stop_deadline is None:
            stop_deadline = time.monotonic() + stop_grace_s + grace_s
        for p in ranks:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        first_failure, deadline = None, None
        while any(p.poll() is None for p in ranks):
            if first_failure is None:
                first_failure = next((i for i, p in enumerate(ranks)
                                      if p.returncode not in (None, 0, EXIT_RESUME)), None)
                if first_failure is not None:
                    deadline = time.monotonic() + grace_s
                    _say_killed(first_failure, ranks[first_failure].returncode)
            if deadline is not None and time.monotonic() > deadline:
                _kill_left(ranks, f"{grace_s:.0f} s after rank {first_failure} failed")
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                stopped_by_us.update(_kill_left(
                    ranks, f"{stop_grace_s + grace_s:.0f} s after the stop signal (stopped or "
                    "stuck)"))
            time.sleep(0.1)
    finally:
        for p in ranks:  # only if this process itself is on its way out with an error
            if p.poll() is None:
                p.kill()
                p.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [EXIT_RESUME if i in stopped_by_us else p.returncode for i, p in enumerate(ranks)]
    if interrupts >= 2:
        return 130
    return combined_status(codes)


def _kill_left(ranks: list[subprocess.Popen], when: str) -> list[int]:
    """Kill the ranks still running, with one line saying `when`; returns their indexes."""
    left = [i for i, p in enumerate(ranks) if p.poll() is None]
    if left:
        log.error("rank(s) %s still running %s: killed", ", ".join(map(str, left)), when)
    for i in left:
        ranks[i].kill()
        ranks[i].wait()
    return left


def _say_killed(rank: int, code: int) -> None:
    """One line for a rank that a signal ended (it could not print its own)."""
    if code < 0:
        log.error("rank %d was killed by %s", rank, signal.Signals(-code).name)


def combined_status(codes: list[int]) -> int:
    """One exit status for the ranks' statuses (negative: killed by that signal)."""
    if all(c == 0 for c in codes):
        return EXIT_OK
    if EXIT_USAGE in codes:
        return EXIT_USAGE
    if all(c in (0, EXIT_RESUME) for c in codes):
        return EXIT_RESUME
    failed = next(c for c in codes if c not in (0, EXIT_RESUME))
    return failed if failed > 0 else EXIT_FAILED
