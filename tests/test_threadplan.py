"""The inference job's thread plan: stages sized together from the cores, user counts kept."""

from __future__ import annotations

import concurrent.futures as cf
import math
import os
import sys
import threading

import pytest

from lesionseg.threadplan import (
    MAX_DECODE_THREADS,
    STAGE_NICE,
    lower_priority,
    plan_threads,
    usable_cores,
)

PROC = os.path.exists("/proc/stat")  # the phased plan needs it to watch other processes


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 8, 16, 64])
def test_cpu_plan_sizes_the_stages_for_every_core(cores: int) -> None:
    plan = plan_threads(cores, on_gpu=False)
    # Phased (decode threads, Linux, 2+ cores): the forward takes every core in its turn and
    # one finishing thread per core; else (1 core, worker processes) half the cores.
    phased = PROC and cores >= 2 and plan.worker_type == "thread"
    assert plan.phased == phased and plan.shared_threads == max(1, cores // 2)
    assert plan.torch_threads == (cores if phased else max(1, cores // 2))
    # The stages are sized for all the cores: about 70 % decode, 30 % finishing.
    assert plan.decode_workers == max(1, math.ceil(0.7 * cores))
    assert plan.finish_threads == (cores if phased else max(1, math.ceil(0.3 * cores)))
    assert plan.chosen == ("torch threads", "decode workers", "finishing threads")


@pytest.mark.skipif(not PROC, reason="the phased plan watches /proc/stat (Linux)")
def test_cpu_plan_on_two_cores() -> None:
    plan = plan_threads(2, on_gpu=False)
    assert (plan.torch_threads, plan.decode_workers, plan.finish_threads) == (2, 2, 2)
    assert plan.phased and plan.shared_threads == 1
    assert ("2 torch thread(s) in turns with the stages (1 beside them when other processes "
            "use these cores), 2 decode thread(s), 2 finishing thread(s) on 2 core(s)") in \
        plan.describe()
    d = plan.as_dict()
    assert (d["worker_type"], d["phased"], d["shared_threads"]) == ("thread", True, 1)


def test_no_phases_with_worker_processes_a_torch_count_set_or_a_gpu() -> None:
    for plan in (plan_threads(2, on_gpu=False, worker_type="process"),
                 plan_threads(2, on_gpu=False, num_threads=1), plan_threads(4, on_gpu=True)):
        assert not plan.phased
    assert plan_threads(2, on_gpu=False, worker_type="process").torch_threads == 1


def test_decode_workers_are_threads_on_a_small_cpu_else_processes() -> None:
    """Threads on a CPU up to MAX_DECODE_THREADS decode workers (no fork, no pickling); worker
    processes past it (the GIL) and on a GPU host (pinned whole batches); the user's choice
    is kept."""
    assert plan_threads(8, on_gpu=False).worker_type == "thread"  # 6 decode workers
    many = plan_threads(16, on_gpu=False)
    assert many.decode_workers > MAX_DECODE_THREADS and many.worker_type == "process"
    assert "decode worker process(es)" in many.describe()
    assert plan_threads(8, on_gpu=True).worker_type == "process"
    assert plan_threads(2, on_gpu=False, worker_type="process").worker_type == "process"
    assert plan_threads(16, on_gpu=True, worker_type="thread").worker_type == "thread"


def test_counts_the_user_set_are_kept() -> None:
    plan = plan_threads(16, on_gpu=False, num_threads=4)
    assert plan.torch_threads == 4 and (plan.decode_workers, plan.finish_threads) == (12, 5)
    assert plan.chosen == ("decode workers", "finishing threads")
    plan = plan_threads(16, on_gpu=False, num_threads=2, num_workers=0, post_threads=3)
    assert (plan.torch_threads, plan.decode_workers, plan.finish_threads) == (2, 0, 3)
    assert plan.chosen == () and "all set by hand" in plan.describe()


def test_lower_priority_raises_this_threads_nice_value_only() -> None:
    def probe() -> tuple[int, int]:
        before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        lower_priority()
        return before, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread nice values are Linux's")
    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with cf.ThreadPoolExecutor(1) as pool:
        before, after = pool.submit(probe).result()
    assert after == max(before, STAGE_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before


def test_gpu_plan_gives_the_cores_to_decode_and_finish() -> None:
    plan = plan_threads(16, on_gpu=True, torch_default=16)
    assert plan.decode_workers == 8 and plan.finish_threads == 4
    assert plan_threads(2, on_gpu=True, torch_default=2).decode_workers == 1


def test_usable_cores_is_positive() -> None:
    assert usable_cores() >= 1
