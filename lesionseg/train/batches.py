"""An epoch's micro-batches for one rank: one object that owns the epoch's stream and loader
(shards streamed through DataLoader workers, or the decoded train set in memory), gives a
step's micro-batches, and stops its workers when the epoch is over."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from lesionseg.config import Config
from lesionseg.errors import UserError
from lesionseg.train import LOGGER
from lesionseg.train.cache import Memory
from lesionseg.train.data import DataPlan
from lesionseg.train.loader import Loader, worker_error, worker_failure
from lesionseg.train.streams import TrainStream

log = logging.getLogger(LOGGER)


class EpochBatches:
    """Micro-batches `start` … `length - 1` of epoch `epoch` on this rank. Use it as a context
    manager: leaving it (at the epoch's end, on a stop or an error) stops its workers."""

    def __init__(self, cfg: Config, data: DataPlan, memory: Memory, accelerator: Any,
                 epoch: int, length: int, start: int) -> None:
        self.length = length  # micro-batches in this epoch
        if memory.train is not None:
            self.loader: Any = memory.train_epoch(cfg, accelerator, epoch, length, start)
        else:
            stream = TrainStream(data.train_urls, cfg, epoch, accelerator.process_index,
                                 accelerator.num_processes, length, start, ids=data.train_ids)
            self.loader = Loader(stream, cfg, accelerator.device)
        try:
            self._batches = iter(self.loader)
        except BaseException:
            self.loader.close()
            raise

    def take(self, n: int) -> tuple[list[dict[str, Any]], str | None]:
        """A step's n micro-batches, or the error (one line) that stopped reading them."""
        return fetch_batches(self._batches, n)

    def close(self) -> None:
        self.loader.close()

    def __enter__(self) -> EpochBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fetch_batches(it: Iterator[dict[str, Any]], n: int) -> tuple[list[dict[str, Any]], str | None]:
    """The next n micro-batches, or the error (one line) that stopped reading them."""
    batches = []
    try:
        for _ in range(n):
            batches.append(next(it))
    except StopIteration:
        return batches, "the training pipeline ended early (internal error)"
    except Exception as e:  # any worker error; reported to every rank by the caller
        if not isinstance(e, UserError) and worker_failure(e) is None:
            log.exception("reading training data failed")
        return batches, worker_error(e)
    return batches, None
