"""DataLoader worker set-up shared by training and inference: a worker dies with its parent.

A worker whose parent was killed with SIGKILL is not told: it kept decoding (or blocked on a
full queue) with ~430 MB for minutes, reparented to pid 1; PyTorch's own watchdog only looks
between items. On Linux the kernel sends the worker SIGKILL when the process that forked it
dies (prctl PR_SET_PDEATHSIG); elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def exit_with_parent(parent_pid: int) -> None:
    """In a freshly started worker: be killed when the parent dies (Linux), and exit at once
    if it already has (the signal is only armed from now on)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


class WorkerInit:
    """A picklable `worker_init_fn`: `exit_with_parent`, then an optional further set-up."""

    def __init__(self, then=None) -> None:
        self.parent_pid, self.then = os.getpid(), then

    def __call__(self, worker_id: int) -> None:
        exit_with_parent(self.parent_pid)
        if self.then is not None:
            self.then(worker_id)
