"""The DataLoader of the train and val streams: workers that survive a stop signal sent to
the whole process group, die with their parent, and are shut down by `close()`."""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from lesionseg.config import Config
from lesionseg.errors import first_line
from lesionseg.workers import WorkerInit


class _WorkerSignals:
    """DataLoader `worker_init_fn`: workers ignore SIGUSR1, and SIGTERM until released.

    A stop signal sent to the whole process group (Slurm does) must not kill the workers: the
    main process decides when to stop, and a dead worker would make PyTorch raise in the
    main process at a random point (its SIGCHLD handler). But workers that ignore SIGTERM for
    good could not be terminated at shutdown, so `release` (set when their loader is closed
    and at interpreter exit) makes SIGTERM end them again.
    """

    def __init__(self, release: Any) -> None:
        self.release = release

    def __call__(self, _worker_id: int) -> None:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, _signum: int, _frame: Any) -> None:
        if self.release.is_set():
            os._exit(0)


_OPEN_LOADERS: weakref.WeakSet = weakref.WeakSet()


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
        self._release = multiprocessing.Event() if workers else None
        self.loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                                 pin_memory=cfg.data.pin_memory and device.type == "cuda",
                                 worker_init_fn=WorkerInit(_WorkerSignals(self._release))
                                 if workers else None,
                                 prefetch_factor=2 if workers else None, persistent_workers=False)
        self._iterator: Any = None
        _OPEN_LOADERS.add(self)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._iterator = iter(self.loader)
        return self._iterator

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
        _OPEN_LOADERS.discard(self)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def worker_error(e: BaseException) -> str:
    """One line from an exception that may carry a DataLoader worker's whole traceback."""
    text = str(e)
    if "Original Traceback" in text:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else text
        head, sep, tail = last.partition(": ")
        return tail if sep and "." in head and " " not in head else last
    return first_line(e)
