"""The forward pass and the CPU stages take turns on the cores (a CPU job with decode threads).

On a CPU the forward runs fastest on every core (bench infer case, 16 images at 384², bf16:
0.14 s per batch of 8 on both cores, 0.31-0.35 s on one). But an OpenMP layer waits for its
slowest thread, so any other busy thread on those cores stalls it. So when the plan makes the
job *phased* (`ThreadPlan.phased`), the forward takes all the cores and the decode and
finishing threads wait while it runs (`wait`); they run, on all cores, between forwards.
Other processes on the same cores cannot be told to wait: before each forward the job looks
at how much CPU they used since the last look (`/proc/stat` of its CPUs less its own CPU
time), and once they used more than `OTHER_LOAD_MAX` cores on average the job goes *shared*
for the rest of the run: the forward keeps `ThreadPlan.shared_threads` threads (half the
cores) and the stages run beside it, as the plan is without phases.

Measured on the 2-core development machine, loop seconds (medians, interleaved rounds):
quiet host, phased 0.82 vs half the cores for the forward 0.95; beside one busy process,
all cores for the forward 1.65-1.88 vs half 1.15-1.33 (hence the fall-back).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import threading
import time
from collections.abc import Iterator

import torch

from lesionseg.threadplan import PROC_STAT

log = logging.getLogger(__name__)

OTHER_LOAD_MAX = 0.25  # cores other processes may use on average before the job goes shared
MIN_WINDOW_S = 0.05  # shortest interval a look averages over (/proc/stat counts in 10 ms ticks)


def busy_seconds(cpus: set[int], stat: str = PROC_STAT) -> float | None:
    """CPU seconds the given CPUs have spent busy (not idle, not waiting for I/O) since boot,
    from /proc/stat; None where there is no such file or it cannot be read."""
    try:
        with open(stat) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    ticks = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(v) for v in rest.split()]
            ticks += sum(values[:8]) - values[3] - values[4]  # all but idle and iowait
    return ticks / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds this process has used (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class ForwardPhases:
    """Turns between the forward (`forward()`) and the stages (`wait()`), and the fall-back
    to sharing the cores when other processes use them. Inactive (`phased=False`): `wait` is
    a no-op and `forward` only times nothing."""

    def __init__(self, phased: bool, shared_threads: int, stat: str = PROC_STAT) -> None:
        self.phased, self.shared_threads, self.stat = phased, shared_threads, stat
        self._turn = threading.Event()  # set: the stages may run
        self._turn.set()
        self.others_cores: float | None = None  # other processes' use when the job went shared
        self.cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
        self._mark = self._sample() if phased else None

    @property
    def mode(self) -> str:
        """"phased", "shared" (went shared, `others_cores` says why) or "fixed" (no phases)."""
        if self.phased:
            return "phased"
        return "shared" if self.others_cores is not None else "fixed"

    def wait(self) -> None:
        """A stage thread, before its next image: wait while the forward runs."""
        self._turn.wait()

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Around one forward pass: the stages wait while it runs (phased)."""
        if self.phased:
            self._look()
        if not self.phased:
            yield
            return
        self._turn.clear()
        try:
            yield
        finally:
            self._turn.set()

    def _sample(self) -> tuple[float, float, float] | None:
        busy = busy_seconds(self.cpus, self.stat)
        return None if busy is None else (time.perf_counter(), busy, own_seconds())

    def _look(self) -> None:
        """Go shared if other processes used more than OTHER_LOAD_MAX cores since the last
        look (a look over less than MIN_WINDOW_S waits for the next)."""
        now = self._sample()
        if now is None or self._mark is None:
            return
        seconds = now[0] - self._mark[0]
        if seconds < MIN_WINDOW_S:
            return
        others = max(0.0, (now[1] - self._mark[1]) - (now[2] - self._mark[2])) / seconds
        self._mark = now
        if others > OTHER_LOAD_MAX:
            self.phased, self.others_cores = False, round(others, 2)
            torch.set_num_threads(self.shared_threads)
            self._turn.set()
            log.info("other processes use %.2f cores of this job's: the forward shares them "
                     "from now on (%d torch thread(s), the stages beside it)", others,
                     self.shared_threads)
