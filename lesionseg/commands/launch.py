"""Starting the processes a command was asked for. Accelerate 1.15's `accelerate launch --cpu
--num_processes N` starts ONE process and tells it nothing about N; training and inference
notice (from the launcher's command line) and re-execute themselves as N gloo ranks under
torch.distributed.run, as `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu …` would."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

RELAUNCH_ENV = "LESIONSEG_RELAUNCHED"  # set on the torch.distributed.run we start ourselves
NO_RELAUNCH_ENV = "LESIONSEG_NO_RELAUNCH"


def requested_cpu_processes(env: Mapping[str, str], parent_argv: list[str]) -> int:
    """N when this process is the single one `accelerate launch --cpu --num_processes N`
    started (1 otherwise). Accelerate's simple launcher starts ONE process for that command
    and tells it nothing about N, so the parent's command line is where N can be read."""
    dist_env = ("WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", RELAUNCH_ENV)
    if any(env.get(k) for k in dist_env):
        return 1
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1"):
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


def _parent_argv() -> list[str]:
    """The parent process's command line (Linux /proc; empty elsewhere)."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def maybe_relaunch_cpu_ranks() -> None:
    """Turn `accelerate launch --cpu --num_processes N` (N > 1), which starts one process, into
    N real gloo ranks by re-executing under torch.distributed.run (set LESIONSEG_NO_RELAUNCH=1
    to only warn)."""
    n = requested_cpu_processes(os.environ, _parent_argv())
    if n <= 1:
        return
    if os.environ.get(NO_RELAUNCH_ENV) == "1":
        log.warning("`accelerate launch --cpu --num_processes %d` started ONE process; this run "
                    "uses 1 process. For %d CPU ranks use: ACCELERATE_USE_CPU=true accelerate "
                    "launch --multi_gpu --num_processes %d --num_machines 1 …", n, n, n)
        return
    log.warning("`accelerate launch --cpu --num_processes %d` starts only one process; "
                "relaunching as %d CPU (gloo) ranks with torch.distributed.run", n, n)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", **{RELAUNCH_ENV: "1"})
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={n}", sys.argv[0], *sys.argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
