"""Stopping on a signal: SIGINT (Ctrl-C), SIGTERM or SIGUSR1 asks to stop; ranks agree at the
next optimizer-step boundary (one tiny all-reduce per step, which also carries "my data
failed", so no rank is ever left waiting in a collective), save a state and exit with status
75 (`EXIT_RESUME`: rerun or requeue the same command). A second Ctrl-C ends the process at
once (SIGINT's default action). A rank that cannot reach the step boundary because it waits
in a collective for a rank that stopped answering (Python runs a signal handler only when the
main thread is back in the interpreter) is ended by a watch thread once it has made no
progress (`beat`: every step and validation batch) for `train.stop_grace_s` after the signal:
one line saying what it waited for, status 75, the last saved state kept. A rank that is
still working (a long validation) is left to reach its stop. Before the loop
(`lesionseg.errors.stop_during_startup`, installed by the command line first thing) a stop
signal ends start-up with `Stopped` (status 75, nothing to save yet). DataLoader workers and
their fork server ignore all three (lesionseg.train.loader, lesionseg.workers)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from lesionseg.errors import EXIT_RESUME, RankError, first_line

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
_WAITING: list[str] = []  # what this rank waits for in a collective now (innermost last)
_LAST_BEAT = [0.0]  # time.monotonic() of this rank's last progress (`beat`)


def beat() -> None:
    """Mark progress (a step, a validation batch): a stop's watch leaves a working rank be."""
    _LAST_BEAT[0] = time.monotonic()


class StopFlag:
    """Set by SIGINT/SIGTERM/SIGUSR1; the loop stops at the next optimizer-step boundary."""

    def __init__(self, grace_s: float = 0.0, who: str = "") -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}
        self.grace_s, self.who = grace_s, who
        self._done = threading.Event()
        self._wake: tuple[int, int] | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if self.grace_s > 0:
            self._watch_stuck_stops()

    def _watch_stuck_stops(self) -> None:
        """Start the watch thread: Python's C-level handler writes each signal's number to a
        wakeup pipe at once, whatever the main thread is blocked in. Skipped when something
        else already uses the process's wakeup fd."""
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:
            previous = None
        if previous != -1:
            if previous is not None:
                signal.set_wakeup_fd(previous)
            os.close(r)
            os.close(w)
            return
        self._wake = (r, w)
        threading.Thread(target=self._watch, args=(r,), daemon=True, name="stop-watch").start()

    def _watch(self, r: int) -> None:
        stops = {int(s) for s in STOP_SIGNALS}
        try:
            while not self._done.is_set():
                data = os.read(r, 64)
                if not data:
                    return
                signum = next((b for b in data if b in stops), None)
                if signum is None:
                    continue
                signalled = time.monotonic()
                while not self._done.wait(min(1.0, self.grace_s)):
                    if time.monotonic() - max(signalled, _LAST_BEAT[0]) < self.grace_s:
                        continue  # still making progress towards its stop
                    what = _WAITING[-1] if _WAITING else "the current step"
                    sys.stderr.write(  # on a line of its own, below any progress bar
                        f"\n{self.who or 'training'}: stopped by {signal.Signals(signum).name}, "
                        f"but still waiting for {what} with no progress {self.grace_s:g} s "
                        "later (another rank stopped answering); exiting without saving "
                        "(status 75): a rerun resumes from the last saved state\n")
                    sys.stderr.flush()
                    os._exit(EXIT_RESUME)
                return
        finally:
            os.close(r)

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
        if self._wake is not None:
            r, w = self._wake
            self._wake = None
            self._done.set()
            signal.set_wakeup_fd(-1)
            with contextlib.suppress(OSError):
                os.write(w, b"\0")  # wakes the watch, which sees it is done
            os.close(w)

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
    _WAITING.append(what)
    try:
        yield
    except torch.distributed.DistError as e:
        raise RankError(f"rank {accelerator.process_index} of {accelerator.num_processes}: "
                        f"gave up waiting for the other ranks ({what}): another rank died or "
                        f"stopped answering ({first_line(e).split('] ')[-1]}); its own error, "
                        "if any, is above") from None
    finally:
        _WAITING.pop()
