"""Measuring: peak memory, medians of interleaved repeats, timings, the machine."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torchvision
from tqdm import tqdm

from lesionseg.data.cv import cv2


def peak_memory() -> dict[str, Any]:
    """Peak RSS of this process (VmHWM) and of its largest finished child (RUSAGE_CHILDREN)."""
    self_kb = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                self_kb = int(line.split()[1])
    if self_kb is None:  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
        self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"peak_rss_mb": round(self_kb / 1024, 1),
            "children_peak_rss_mb": round(children_kb / 1024, 1) if children_kb else None,
            "source": "case process: /proc/self/status VmHWM; children: the largest single "
                      "child's peak, getrusage(RUSAGE_CHILDREN).ru_maxrss"}


def stats(values: list[float]) -> dict[str, Any]:
    """Median, mean, min, max and the raw values (rounded) of a list of measurements."""
    return {"median": rounded(statistics.median(values)), "mean": rounded(statistics.fmean(values)),
            "min": rounded(min(values)), "max": rounded(max(values)), "n": len(values),
            "values": [rounded(v) for v in values]}


def rounded(x: float) -> float:
    """Round to 4 significant digits (plenty for timings on a noisy machine)."""
    return float(f"{x:.4g}") if x and math.isfinite(x) else x


def interleaved(variants: dict[str, Callable[[], float]], warmup: int,
                repeats: int) -> dict[str, list[float]]:
    """Call every variant once per round (A B C, A B C, …): `warmup` untimed rounds, then
    `repeats` rounds whose returned figures (seconds or a rate) are collected per variant."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in variants}
    for _ in tqdm(range(repeats), desc="rounds", unit="round", leave=False):
        for name, fn in variants.items():
            out[name].append(fn())
    return out


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of `fn` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def machine_info(threads: int) -> dict[str, Any]:
    """CPU, cores, memory, library versions, threads and device of this run. The libraries
    the training stream runs through (OpenCV, NumPy, Pillow) and torch's CPU kernels
    (`cpu_capability`) are named too: the same code and seed trained on another machine or
    library build is another run (docs/BENCHMARKS.md, seventeenth stop)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024**2, 1)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb,
            "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "opencv": cv2.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": threads or torch.get_num_threads(), "device": device,
            "load_average_start": load_average()}


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError):
        return [round(v, 2) for v in os.getloadavg()]
    return None
