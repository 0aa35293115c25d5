"""What the parts share: the device, synchronized timers, peak memory, medians. torch is
imported in the functions: the parts' own processes pay for it, the parent never does."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from lesionseg.bench.measure import rounded
from lesionseg.gpucheck.plan import CheckPlan


def rounded_median(values: list[float]) -> float | None:
    return rounded(statistics.median(values)) if values else None


def device_of(plan: CheckPlan) -> Any:
    import torch

    return torch.device(plan.device)


def sync(device: Any) -> None:
    """Wait for queued CUDA work (the timers must not stop before the GPU does)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: Any) -> float | None:
    """Peak CUDA memory allocated since the last reset, MB (None on the CPU)."""
    import torch

    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def timed_calls(fn: Callable[[], Any], warmup: int, n: int, device: Any) -> list[float]:
    """Seconds of each of `n` calls after `warmup` untimed ones, synchronized on CUDA."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times
