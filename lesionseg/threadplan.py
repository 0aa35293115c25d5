"""How many threads each stage of the inference job gets, sized together from the cores.

The job has three stages that run at once: decode workers (read, reduced-scale JPEG decode,
resize, the truth PNG), the forward pass (torch's intra-op threads in the main process) and
finishing threads (upsample, threshold, encode the mask PNG, score). On a CPU all three share
the same cores. Sized one by one (torch takes every core, two decode workers,
`min(4, CPUs)` finishing threads) the forward suffered most: an OpenMP layer waits for its
slowest thread, and a thread that lost its core stalls them all.

So on a CPU with decode threads (Linux, 2+ cores) the plan is *phased*
(lesionseg/infer/phases.py): the forward takes every core in its turn while the decode and
finishing threads wait, and falls back to half the cores beside them once other processes
use these cores. Otherwise the forward gets half the cores (`cores // 2` torch threads). The
stages are sized for all the cores, split by their share of the per-image work (decode
~70 %): `ceil(cores × 0.7)` decode workers and `ceil(cores × 0.3)` finishing threads (phased:
one per core, as they run between forwards). Up to
`MAX_DECODE_THREADS` the decode workers are threads of the job's own process (see there why),
at normal priority. Decode worker *processes* (more workers, or `infer.worker_type=process`)
and, with them, the finishing threads run at a lower priority (`lower_priority`, nice
`STAGE_NICE`), as measured for processes. On a GPU the forward needs few cores and the rest
decode (in processes: pinned whole batches) and finish at normal priority. Any count the user
sets (`infer.num_threads`, `infer.num_workers`, `infer.post_threads`, `infer.worker_type`) is
kept; the start-up log line says what was chosen and why.

Measured on the 2-core development machine (bench infer case: 16 full-size images, 384²,
batch 8, bf16; median loop seconds of interleaved rounds in one process):
- worker processes, torch/decode/finish 1/2/1: 1.24 (1.9-2.2 CPU seconds per job);
  decode threads 1/2/1: 0.84 (1.4-1.5 CPU seconds), the same masks.
- decode threads, nice 10 vs normal priority: 0.945 vs 0.98 on a quiet host, but 1.49 vs
  1.15 beside one other busy process (niced stages lose their core to it): normal priority.
- two torch threads (all cores) beside the stages: 0.79-0.83 on a quiet host, but 1.65-1.84
  beside one busy process and 3-4 s during a test run (the OpenMP stall above), against
  1.15-1.3 with one. Phased (all cores, the stages waiting): 0.76-0.82 quiet (two finishing
  threads; one: 0.82), and beside one busy process it goes shared: 1.18-1.31 (half: 1.21-1.25).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
from dataclasses import dataclass

# The decode stage's share of the CPU stages' work (the bench's infer case: a decode worker
# 29-50 ms, a finishing thread 13-15 ms per full-size image at 384², one thread each).
DECODE_SHARE = 0.7
GPU_MAX_WORKERS, GPU_MAX_FINISH = 8, 4
# Up to this many decode workers, a CPU job decodes in threads of its own process: the decoders
# (Pillow, OpenCV, zlib) release the GIL, and threads need no fork of the loaded process, no
# pickling of each sample through a pipe and no start-up (on the 2-core machine: 1.9-2.2 CPU
# seconds per 16-image job with worker processes, 1.4-1.5 with threads, the same masks). Past
# it, the ~1-2 ms per image each decode holds the GIL would start to serialise them.
MAX_DECODE_THREADS = 8
PROC_STAT = "/proc/stat"  # where the phased plan reads other processes' load (Linux)
STAGE_NICE = 10  # nice value of the CPU stages (decode workers, finishing threads) on a CPU


@dataclass(frozen=True)
class ThreadPlan:
    """Threads of each stage for one inference process."""

    cores: int
    torch_threads: int  # intra-op threads of the forward pass
    decode_workers: int  # decode workers (0: decode in the main thread)
    finish_threads: int  # threads that upsample, threshold, write and score
    worker_type: str  # "thread" (a pool in this process) or "process" (DataLoader workers)
    phased: bool  # the forward takes every core in turns with the stages (infer/phases.py)
    shared_threads: int  # torch threads when the cores are shared (phased: its fall-back)
    chosen: tuple[str, ...]  # the counts the plan chose (the others were set by the user)
    why: str

    def describe(self) -> str:
        """One line for the start-up log and the summary."""
        chosen = f"; chosen: {', '.join(self.chosen)}" if self.chosen else "; all set by hand"
        kind = "thread(s)" if self.worker_type == "thread" else "worker process(es)"
        turns = (f" in turns with the stages ({self.shared_threads} beside them when other "
                 "processes use these cores)" if self.phased else "")
        return (f"{self.torch_threads} torch thread(s){turns}, {self.decode_workers} decode "
                f"{kind}, {self.finish_threads} finishing thread(s) on {self.cores} "
                f"core(s) ({self.why}{chosen})")

    def as_dict(self) -> dict[str, object]:
        return {"cores": self.cores, "torch_threads": self.torch_threads,
                "decode_workers": self.decode_workers, "finish_threads": self.finish_threads,
                "worker_type": self.worker_type, "phased": self.phased,
                "shared_threads": self.shared_threads, "chosen": list(self.chosen),
                "why": self.why}


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def plan_threads(cores: int, on_gpu: bool, num_threads: int = 0, num_workers: int | None = None,
                 post_threads: int = 0, torch_default: int | None = None,
                 worker_type: str = "auto") -> ThreadPlan:
    """The plan for `cores` cores. `num_threads`/`post_threads` 0, `num_workers` None and
    `worker_type` auto mean "choose". `torch_default`: torch's own thread count (kept on a
    GPU, where the forward barely uses the CPU). The loader caps the workers at the images or
    batches it has."""
    cores = max(1, cores)
    chosen: list[str] = []
    if on_gpu:
        why = "the forward runs on the GPU: the cores decode and finish"
        torch_threads = num_threads or max(1, min(torch_default or cores, cores))
        workers = (num_workers if num_workers is not None
                   else max(1, min(GPU_MAX_WORKERS, round(cores * DECODE_SHARE))))
        finish = post_threads or max(1, min(GPU_MAX_FINISH, cores - workers))
    else:
        why = "the forward and the CPU stages share the cores: the forward half of them"
        torch_threads = num_threads or max(1, cores // 2)
        workers = (num_workers if num_workers is not None
                   else max(1, math.ceil(cores * DECODE_SHARE)))
        finish = post_threads or max(1, math.ceil(cores * (1 - DECODE_SHARE)))
    if worker_type == "auto":
        worker_type = "thread" if not on_gpu and workers <= MAX_DECODE_THREADS else "process"
    if not on_gpu and worker_type == "process":
        why += ", the stages at a lower priority"
    shared = torch_threads
    # Phased: decode threads that can wait for their turn, a count we chose, and a way to see
    # other processes' load (/proc/stat) for the fall-back to sharing the cores.
    phased = (not on_gpu and worker_type == "thread" and not num_threads and cores >= 2
              and os.path.exists(PROC_STAT))
    if phased:
        torch_threads = cores
        # The stages run between forwards, where the last batch's finishing has every core
        # to itself (the job's tail): one finishing thread per core (2 cores: 0.76 vs 0.82 s).
        finish = post_threads or cores
        why = ("the forward takes every core in turns with the decode and finishing threads, "
               "which wait while it runs")
    if not num_threads:
        chosen.append("torch threads")
    if num_workers is None:
        chosen.append("decode workers")
    if not post_threads:
        chosen.append("finishing threads")
    return ThreadPlan(cores, torch_threads, workers, finish, worker_type, phased, shared,
                      tuple(chosen), why)


def lower_priority(_worker_id: int | None = None) -> None:
    """Run the calling thread at `STAGE_NICE`: a decode worker or finishing thread then waits
    while the forward pass has work for a core, and runs in every gap it leaves. Linux only,
    where each thread has its own nice value; elsewhere nice is per process, and a finishing
    thread would lower the forward's priority with its own, so nothing changes there. Raising
    one's own nice value needs no privilege; where it fails nothing changes. Usable as a
    DataLoader `worker_init_fn` tail and a thread pool `initializer`."""
    if not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), STAGE_NICE))
