"""The DataLoader of the train and val streams: workers started from the fork server
(`data.worker_start`, lesionseg.workers says why), that survive a stop signal sent to the
whole process group, die with their parent, never leave the process waiting longer than
`data.worker_timeout_s` for a batch, and are shut down by `close()` (killed if they do not
answer: a stopped worker would otherwise hold the process at exit)."""

from __future__ import annotations

import atexit
import os
import signal
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from lesionseg.config import Config
from lesionseg.errors import first_line
from lesionseg.workers import WorkerInit, worker_context


class _WorkerSignals:
    """DataLoader `worker_init_fn`: workers ignore SIGINT and SIGUSR1, and SIGTERM until released.

    A stop signal sent to the whole process group (Slurm does) must not kill the workers: the
    main process decides when to stop, and a dead worker would make PyTorch raise in the
    main process at a random point (its SIGCHLD handler). But workers that ignore SIGTERM for
    good could not be terminated at shutdown, so `release` (set when their loader is closed
    and at interpreter exit) makes SIGTERM end them again.
    """

    def __init__(self, release: Any) -> None:
        self.release = release

    def __call__(self, _worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, _signum: int, _frame: Any) -> None:
        if self.release.is_set():
            os._exit(0)


_OPEN_LOADERS: weakref.WeakSet = weakref.WeakSet()
POLL_S = 2.0  # the slices a wait for a batch is made of (dead workers are noticed between)


@atexit.register
def _release_all_workers() -> None:
    """At exit, before multiprocessing terminates the workers, let SIGTERM end them."""
    for loader in list(_OPEN_LOADERS):
        loader.release_workers()


class Loader:
    """A DataLoader over an already-batched iterable (batch_size=None) whose workers are shut
    down by `close()` (use it as a context manager), also when an error is on its way up."""

    def __init__(self, dataset: IterableDataset, cfg: Config, device: torch.device) -> None:
        workers = cfg.data.num_workers
        context = worker_context(cfg.data.worker_start) if workers else None
        self._release = context.Event() if context is not None else None
        self.timeout = cfg.data.worker_timeout_s
        self.loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                                 pin_memory=cfg.data.pin_memory and device.type == "cuda",
                                 worker_init_fn=WorkerInit(_WorkerSignals(self._release))
                                 if workers else None, multiprocessing_context=context,
                                 timeout=POLL_S if workers else 0,
                                 prefetch_factor=2 if workers else None, persistent_workers=False)
        self._iterator: Any = None
        _OPEN_LOADERS.add(self)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._iterator = iter(self.loader)
        if not self.loader.num_workers:
            return self._iterator
        return self._polled(self._iterator)

    def _polled(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The batches, waiting for each in POLL_S slices: between two, PyTorch checks that
        every worker is alive (it gets no SIGCHLD for a forkserver worker, which is not its
        child); after data.worker_timeout_s in all, the wait is an error."""
        while True:
            waited = 0.0
            while True:
                try:
                    batch = next(batches)
                    break
                except StopIteration:
                    return
                except RuntimeError as e:
                    if "DataLoader timed out" not in str(e):
                        raise
                    waited += POLL_S
                    if self.timeout and waited >= self.timeout:
                        raise RuntimeError(f"DataLoader timed out after {self.timeout:g} "
                                           "seconds") from None
            yield batch

    def release_workers(self) -> None:
        if self._release is not None:
            self._release.set()

    def close(self) -> None:
        """Stop the workers now (PyTorch would only do it when the iterator is collected)."""
        self.release_workers()
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        for worker in getattr(iterator, "_workers", []):  # stopped (SIGSTOP) or stuck ones
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)
        _OPEN_LOADERS.discard(self)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


WORKER_FAILURE = "a data worker"  # how worker_failure's lines begin


def is_worker_failure(message: str | None) -> bool:
    return bool(message) and WORKER_FAILURE in message


def worker_failure(e: BaseException) -> str | None:
    """One line when `e` says a data worker died or stopped answering (not the data's fault:
    a crash, an out-of-memory kill, a stopped process); None for any other error."""
    text = str(e)
    if "DataLoader timed out after" in text:
        return (f"{WORKER_FAILURE} sent no batch in {text.split('after ')[1].split(' ')[0]} s "
                "(stopped or stuck; data.worker_timeout_s)")
    if "DataLoader worker" in text and ("exited unexpectedly" in text
                                        or "killed by signal" in text):
        return f"{WORKER_FAILURE} died ({first_line(e).rstrip('. ')})"
    return None


def worker_error(e: BaseException) -> str:
    """One line from an exception that may carry a DataLoader worker's whole traceback."""
    failure = worker_failure(e)
    if failure is not None:
        return failure
    text = str(e)
    if "Original Traceback" in text:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else text
        head, sep, tail = last.partition(": ")
        return tail if sep and "." in head and " " not in head else last
    return first_line(e)
