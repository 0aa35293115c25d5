"""Stopping on a signal: SIGINT (Ctrl-C), SIGTERM or SIGUSR1 asks to stop; ranks agree at the
next optimizer-step boundary (one tiny all-reduce per step, which also carries "my data
failed", so no rank is ever left waiting in a collective), save a state and exit with status
75 (`EXIT_RESUME`: rerun or requeue the same command). A second Ctrl-C ends the process at
once (SIGINT's default action). Before the loop (`lesionseg.errors.stop_during_startup`,
installed by the command line first thing) a stop signal ends start-up with `Stopped`
(status 75, nothing to save yet). DataLoader workers and their fork
server ignore all three (lesionseg.train.loader, lesionseg.workers)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch

from lesionseg.errors import RankError, first_line

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Set by SIGINT/SIGTERM/SIGUSR1; the loop stops at the next optimizer-step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is None:
            logging.getLogger(__name__).warning(
                "%s: stopping at the next step (the state is saved); Ctrl-C again to quit at "
                "once without saving", signal.Signals(signum).name)
        self.signal = signum
        if signum == signal.SIGINT:  # the next Ctrl-C: the default action, at once
            signal.signal(signal.SIGINT, signal.SIG_DFL)

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


@contextlib.contextmanager
def waiting_for(accelerator: Any, what: str) -> Iterator[None]:
    """A collective that fails inside (another rank died, or train.collective_timeout_s passed)
    becomes one line naming this rank and what it waited for."""
    try:
        yield
    except torch.distributed.DistError as e:
        raise RankError(f"rank {accelerator.process_index} of {accelerator.num_processes}: "
                        f"gave up waiting for the other ranks ({what}): another rank died or "
                        f"stopped answering ({first_line(e).split('] ')[-1]}); its own error, "
                        "if any, is above") from None
