"""How many threads each stage of the inference job gets, sized together from the cores.

The job has three stages that run at once: decode workers (processes: read, reduced-scale
JPEG decode, resize, the truth PNG), the forward pass (torch's intra-op threads in the main
process) and finishing threads (upsample, threshold, encode the mask PNG, score). On a CPU all
three share the same cores. Sized one by one (torch takes every core, two decode workers,
`min(4, CPUs)` finishing threads) they oversubscribe the cores, and the forward suffers most:
an OpenMP layer waits for its slowest thread, and a thread that lost its core stalls them all.
On 2 cores that made the job's forward 1.86× the bare forward (the README's inference table).

So on a CPU the plan gives the forward a share of the cores and the CPU stages the rest, and
never more busy threads than cores; on a GPU the forward needs few cores and the rest decode
and finish. Any count the user sets (`infer.num_threads`, `infer.num_workers`,
`infer.post_threads`) is kept as given; the start-up log line says what was chosen and why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# The decode stage's share of the CPU stages' work (the bench's infer case: a decode worker
# 29 ms, a finishing thread 12.7 ms per full-size image at 384², one thread each).
DECODE_SHARE = 0.7
GPU_MAX_WORKERS, GPU_MAX_FINISH = 8, 4


@dataclass(frozen=True)
class ThreadPlan:
    """Threads of each stage for one inference process."""

    cores: int
    torch_threads: int  # intra-op threads of the forward pass
    decode_workers: int  # DataLoader worker processes (0: decode in the main process)
    finish_threads: int  # threads that upsample, threshold, write and score
    chosen: tuple[str, ...]  # the counts the plan chose (the others were set by the user)
    why: str

    def describe(self) -> str:
        """One line for the start-up log and the summary."""
        chosen = f"; chosen: {', '.join(self.chosen)}" if self.chosen else "; all set by hand"
        return (f"{self.torch_threads} torch thread(s), {self.decode_workers} decode "
                f"worker(s), {self.finish_threads} finishing thread(s) on {self.cores} "
                f"core(s) ({self.why}{chosen})")

    def as_dict(self) -> dict[str, object]:
        return {"cores": self.cores, "torch_threads": self.torch_threads,
                "decode_workers": self.decode_workers, "finish_threads": self.finish_threads,
                "chosen": list(self.chosen), "why": self.why}


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def plan_threads(cores: int, on_gpu: bool, num_threads: int = 0, num_workers: int | None = None,
                 post_threads: int = 0, torch_default: int | None = None,
                 batches: int | None = None) -> ThreadPlan:
    """The plan for `cores` cores. `num_threads`/`post_threads` 0 and `num_workers` None
    mean "choose". `torch_default`: torch's own thread count (kept on a GPU, where the forward
    barely uses the CPU). `batches`: how many batches the job has (no more workers than that).
    """
    cores = max(1, cores)
    chosen: list[str] = []
    if on_gpu:
        why = "the forward runs on the GPU: the cores decode and finish"
        torch_threads = num_threads or max(1, min(torch_default or cores, cores))
        workers = (num_workers if num_workers is not None
                   else max(1, min(GPU_MAX_WORKERS, round(cores * DECODE_SHARE))))
        finish = post_threads or max(1, min(GPU_MAX_FINISH, cores - workers))
    else:
        why = "the forward and the CPU stages share the cores: half each, never more busy threads than cores"
        torch_threads = num_threads or max(1, cores // 2)
        rest = max(1, cores - torch_threads)
        workers = num_workers if num_workers is not None else max(1, round(rest * DECODE_SHARE))
        finish = post_threads or max(1, rest - workers)
    if batches is not None:
        workers = min(workers, max(1, batches)) if workers else 0
    if not num_threads:
        chosen.append("torch threads")
    if num_workers is None:
        chosen.append("decode workers")
    if not post_threads:
        chosen.append("finishing threads")
    return ThreadPlan(cores, torch_threads, workers, finish, tuple(chosen), why)
