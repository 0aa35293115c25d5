"""DataLoader worker set-up shared by training and inference: how workers are started, and a
worker dies with its parent.

Start method (`worker_context`): forking a process that already runs threads (W&B, tqdm's
monitor, queue feeders, gloo) can leave the child holding a lock no thread will release: a
training worker hung for good in `PyOS_AfterFork_Child` (CPython gh-112275, Python < 3.12).
forkserver forks workers from a small single-threaded server started once per process
(before any worker is needed, with the modules workers need already imported), so no worker
inherits a locked interpreter and starting one costs a fork, not an import of torch.

A worker whose parent was killed with SIGKILL is not told: it kept decoding (or blocked on a
full queue) with ~430 MB for minutes, reparented to pid 1; PyTorch's own watchdog only looks
between items. On Linux the kernel sends the worker SIGKILL when the process that forked it
dies (prctl PR_SET_PDEATHSIG); elsewhere nothing changes. A forkserver worker's parent is the
server, so it also waits on a pidfd of the process that started it (`_exit_when_done`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import multiprocessing
import os
import select
import signal
import sys
import threading
from collections.abc import Iterator
from multiprocessing import forkserver
from multiprocessing.context import BaseContext

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
START_METHODS = ("forkserver", "spawn", "fork")
# Imported once by the fork server, so that a worker forked from it starts in milliseconds.
FORKSERVER_PRELOAD = ["torch", "lesionseg.train.streams", "lesionseg.infer.decode"]
# The signals that ask a run to stop; the fork server and the workers leave them to the
# process that runs the job (Slurm and accelerate's launcher signal every process).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def _stop_signals_ignored() -> Iterator[None]:
    """Start a child that ignores the stop signals (SIG_IGN survives fork and exec), without
    losing one that arrives meanwhile (blocked, so delivered when the handlers are back)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def kill_session(pid: int) -> None:
    """SIGKILL every process of the session or group `pid` leads (gone already: nothing)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def end_process_group(proc: multiprocessing.process.BaseProcess) -> None:
    """Kill a child process that leads its own group (or session) with everything it started,
    and wait for it; the child itself too if it was stopped before it made its group."""
    if proc.pid is None:
        return
    kill_session(proc.pid)
    if proc.is_alive():
        proc.kill()
    proc.join()


def default_worker_context() -> BaseContext:
    """`worker_context` of the fork server where the platform has one, else spawn: worker
    processes never forked from a process that may already run threads."""
    methods = multiprocessing.get_all_start_methods()
    return worker_context("forkserver" if "forkserver" in methods else "spawn")


def worker_context(method: str = "forkserver") -> BaseContext:
    """The multiprocessing context DataLoader workers start with (`data.worker_start`). For
    forkserver, the server is started now (once per process): call this early, before the
    first loader, so its imports overlap the rest of the start-up."""
    if method == "forkserver":
        forkserver.set_forkserver_preload(FORKSERVER_PRELOAD)
        with _stop_signals_ignored():
            forkserver.ensure_running()
    return multiprocessing.get_context(method)


def unblock_stop_signals() -> None:
    """In a worker started from the fork server: take the stop signals the server blocked."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def exit_with_parent(parent_pid: int) -> None:
    """In a freshly started worker: be killed when the parent dies (Linux), and exit at once
    if the process that started it already has (the signal is only armed from now on). The
    parent is that process, or the fork server that exits with it."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == parent_pid:
        return
    # Started from the fork server: the kernel's signal follows the server, which lives as
    # long as any of its workers holds its "alive" pipe, and PyTorch's watchdog watches the
    # server too. A thread that waits for the process that started this worker ends it.
    try:
        fd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        os._exit(1)
    threading.Thread(target=_exit_when_done, args=(fd,), daemon=True,
                     name="exit-with-parent").start()


def _exit_when_done(pidfd: int) -> None:
    select.select([pidfd], [], [])  # readable once that process has ended
    os._exit(1)


class WorkerInit:
    """A picklable `worker_init_fn`: `exit_with_parent`, then an optional further set-up."""

    def __init__(self, then=None) -> None:
        self.parent_pid, self.then = os.getpid(), then

    def __call__(self, worker_id: int) -> None:
        exit_with_parent(self.parent_pid)
        unblock_stop_signals()
        if self.then is not None:
            self.then(worker_id)
