"""The inference job's thread plan: stages sized together from the cores, user counts kept."""

from __future__ import annotations

import pytest

from lesionseg.threadplan import plan_threads, usable_cores


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 8, 16, 64])
def test_cpu_plan_splits_the_cores_between_forward_and_stages(cores: int) -> None:
    plan = plan_threads(cores, on_gpu=False)
    assert plan.torch_threads == max(1, cores // 2)
    assert plan.decode_workers >= 1 and plan.finish_threads >= 1
    # The CPU stages get the cores the forward leaves, never fewer than one each.
    assert plan.decode_workers + plan.finish_threads == max(2, cores - plan.torch_threads)
    assert plan.chosen == ("torch threads", "decode workers", "finishing threads")


def test_cpu_plan_on_two_cores_is_one_thread_per_stage() -> None:
    plan = plan_threads(2, on_gpu=False)
    assert (plan.torch_threads, plan.decode_workers, plan.finish_threads) == (1, 1, 1)
    assert "1 torch thread(s), 1 decode worker(s), 1 finishing thread(s) on 2 core(s)" in \
        plan.describe()


def test_counts_the_user_set_are_kept_and_the_rest_fill_the_cores() -> None:
    plan = plan_threads(16, on_gpu=False, num_threads=4)
    assert plan.torch_threads == 4 and plan.decode_workers + plan.finish_threads == 12
    assert plan.chosen == ("decode workers", "finishing threads")
    plan = plan_threads(16, on_gpu=False, num_threads=2, num_workers=0, post_threads=3)
    assert (plan.torch_threads, plan.decode_workers, plan.finish_threads) == (2, 0, 3)
    assert plan.chosen == () and "all set by hand" in plan.describe()


def test_gpu_plan_gives_the_cores_to_decode_and_finish() -> None:
    plan = plan_threads(16, on_gpu=True, torch_default=16)
    assert plan.decode_workers == 8 and plan.finish_threads == 4
    assert plan_threads(2, on_gpu=True, torch_default=2).decode_workers == 1


def test_usable_cores_is_positive() -> None:
    assert usable_cores() >= 1
