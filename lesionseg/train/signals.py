"""Stopping on a signal: SIGTERM or SIGUSR1 asks to stop; ranks agree at the next
optimizer-step boundary (one tiny all-reduce per step, which also carries "my data failed",
so no rank is ever left waiting in a collective), save a state and exit with status 75
(`EXIT_RESUME`: rerun or requeue the same command). DataLoader workers ignore both signals
(lesionseg.train.loader)."""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch


class StopFlag:
    """Set by SIGTERM/SIGUSR1; the loop stops at the next optimizer-step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def is_set(self) -> bool:
        return self.signal is not None


def agree(accelerator: Any, *flags: bool) -> list[bool]:
    """Whether any rank has each flag set (one tiny all-reduce; free with one process)."""
    if accelerator.num_processes == 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=accelerator.device)
    t = accelerator.reduce(t, reduction="sum")
    return [bool(v > 0) for v in t.tolist()]
