"""Decode workers → batches: a thread pool of this process, or DataLoader worker processes;
single images stacked here in order, failures kept alongside the good images."""

from __future__ import annotations

import concurrent.futures as cf
import math
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader

from lesionseg.config import InferConfig
from lesionseg.data.sources import Item
from lesionseg.infer.decode import ItemDataset, collate
from lesionseg.infer.refine import Refine
from lesionseg.threadplan import lower_priority
from lesionseg.workers import WorkerInit, default_worker_context


def make_loader(items: list[Item], image_size: int, icfg: InferConfig, preview_side: int,
                pin_memory: bool, before_item: Callable[[], None] | None = None,
                refine: Refine | None = None) -> Iterator[dict[str, Any]]:
    """Batches of `icfg.batch_size` decoded items, in order (with `refine`, each with the
    finer copies the second pass crops from: `decode.collate`).

    `infer.worker_type` thread (as planned on a CPU): a pool of decode threads in this process
    decodes single images, at most two batches ahead, each after `before_item()` (the forward's
    turn, `ForwardPhases.wait`). process: DataLoader workers; with pinned memory (CUDA) a worker
    decodes a whole batch, pinned as it arrives, else each decodes single images stacked here:
    the first batch is then ready when every worker has decoded its share of it, not when one
    worker has decoded all of it (on 2 cores with 2 batches in all, that wait is a large part
    of the job's time). On a CPU worker processes run at the stages' lower priority
    (`lower_priority`); decode threads at normal priority (lesionseg/threadplan.py says why)."""
    dataset = ItemDataset(items, image_size, preview_side, refine)
    if icfg.worker_type == "thread" or not icfg.num_workers:
        workers = min(icfg.num_workers or 0, len(items))
        samples = (decoded_in_threads(dataset, workers, 2 * icfg.batch_size, before_item)
                   if workers else (dataset[i] for i in range(len(dataset))))
        batches = batched(samples, icfg.batch_size)
        return (_pinned(b) for b in batches) if pin_memory else batches
    if pin_memory:
        workers = min(icfg.num_workers, max(1, math.ceil(len(items) / icfg.batch_size)))
        return iter(DataLoader(dataset, batch_size=icfg.batch_size, shuffle=False,
                               num_workers=workers, collate_fn=collate, pin_memory=True,
                               persistent_workers=False, prefetch_factor=2,
                               worker_init_fn=WorkerInit(),
                               multiprocessing_context=default_worker_context()))
    workers = min(icfg.num_workers, len(items))
    # Two batches in flight, as with whole batches per worker.
    prefetch = max(2, math.ceil(2 * icfg.batch_size / workers))
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                        collate_fn=_one_sample, persistent_workers=False,
                        prefetch_factor=prefetch, worker_init_fn=WorkerInit(lower_priority),
                        multiprocessing_context=default_worker_context())
    return batched(iter(loader), icfg.batch_size)


def decoded_in_threads(dataset: Any, threads: int, ahead: int,
                       before_item: Callable[[], None] | None = None) -> Iterator[dict[str, Any]]:
    """The dataset's samples in order, decoded by a pool of `threads` threads, at most `ahead`
    in flight (memory stays bounded however far the consumer lags)."""

    def decode(index: int) -> dict[str, Any]:
        if before_item is not None:
            before_item()
        return dataset[index]

    pool = cf.ThreadPoolExecutor(threads, thread_name_prefix="decode")
    try:
        futures: dict[int, cf.Future] = {}
        for i in range(len(dataset)):
            for j in range(i + len(futures), min(len(dataset), i + ahead)):
                futures[j] = pool.submit(decode, j)
            yield futures.pop(i).result()
    finally:  # also when the consumer stops early (an error, a full disk): no decode left running
        pool.shutdown(wait=True, cancel_futures=True)


def batched(samples: Iterator[dict[str, Any]], batch_size: int) -> Iterator[dict[str, Any]]:
    """Group single samples, in order, into `collate`d batches of `batch_size` (the last may
    be smaller)."""
    chunk: list[dict[str, Any]] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == batch_size:
            yield collate(chunk)
            chunk = []
    if chunk:
        yield collate(chunk)


def _pinned(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with its images in pinned memory (a faster, asynchronous copy to the GPU)."""
    if batch["images"] is not None:
        batch["images"] = batch["images"].pin_memory()
    return batch


def _one_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """The loader's per-sample 'collate': the sample as the worker made it."""
    return sample
