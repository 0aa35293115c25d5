"""Part `pinned_memory`: host-to-device copies of one uint8 batch from pageable and pinned
memory (CUDA only)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from lesionseg.bench.measure import rounded
from lesionseg.gpucheck.common import device_of, timed_calls
from lesionseg.gpucheck.plan import CheckPlan


def check_pinned_memory(plan: CheckPlan, workdir: Path, deadline: float) -> dict[str, Any]:
    """Host-to-device copy of one uint8 batch, pageable vs pinned, non_blocking=True."""
    import torch

    device = device_of(plan)
    batch = torch.randint(0, 256, (plan.batch_size, 3, plan.image_size, plan.image_size),
                          dtype=torch.uint8)
    sources = {"pageable": batch, "pinned": batch.pin_memory()}
    result: dict[str, Any] = {"bytes": batch.numel(), "shape": list(batch.shape)}
    for name, src in sources.items():
        times = timed_calls(lambda src=src: src.to(device, non_blocking=True), plan.warmup,
                            plan.copies, device)
        median = statistics.median(times)
        result[name] = {"copy_s": rounded(median), "gb_per_s": rounded(batch.numel() / median / 1e9)}
    result["pinned_speedup"] = rounded(result["pageable"]["copy_s"] / result["pinned"]["copy_s"])
    return result
