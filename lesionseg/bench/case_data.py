"""Case `data`: the training input pipeline (packed shards → decoded, augmented batches) in
images/s per worker, against a plain folder loader doing the same augmentation."""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lesionseg.bench.datasets import (
    bench_config,
    full_size_source,
    megapixels,
    packed,
    source_pairs,
)
from lesionseg.bench.measure import interleaved, rounded, stats, timed
from lesionseg.bench.plan import OTHER_STORE_SIDE, BenchPlan
from lesionseg.data.images import load_image, load_mask
from lesionseg.data.shard_format import (
    decode_sample,
    iter_raw,
    raw_image_size,
    read_manifest,
    split_urls,
)
from lesionseg.data.transforms import (
    AugmentParams,
    apply_augmentation,
    draw_augmentation,
    generator_for,
    stack_images,
    train_transform,
)
from lesionseg.train.data import plan_data
from lesionseg.train.loader import Loader
from lesionseg.train.streams import TrainStream

log = logging.getLogger(__name__)

class FolderLoader:
    """The baseline: a plain loader over an image folder, one case at a time, full PIL decode
    with the project's one image loader, then the SAME training transform as the pipeline."""

    def __init__(self, pairs: list[tuple[Path, Path]], batch_size: int, data_cfg: Any) -> None:
        self.pairs, self.batch_size = pairs, batch_size
        self.augment = AugmentParams.from_config(data_cfg)
        self.position = 0

    def next_batch(self) -> dict[str, Any]:
        """Decode and augment the next batch_size cases (cycling over the folder)."""
        images, masks = [], []
        for _ in range(self.batch_size):
            image_path, mask_path = self.pairs[self.position % len(self.pairs)]
            image, size = load_image(image_path.read_bytes(), str(image_path))  # full decode
            mask = load_mask(mask_path.read_bytes(), str(mask_path), expected_size=size)
            g = generator_for(0, 0, 0, self.position, image_path.stem)
            x, y = train_transform(image, mask, self.augment, g)
            images.append(x)
            masks.append(y)
            self.position += 1
        return {"image": stack_images(images), "mask": torch.stack(masks)}


def shard_loader(shards: Path, cfg: Any, workers: int) -> Any:
    """The real training input pipeline: TrainStream over the train shards in the training
    job's Loader (workers=0: in this process), endless for benchmarking. Use it as a context
    manager (it stops its workers on exit) and iterate it for batches."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=workers))
    data = plan_data(str(shards))
    dataset = TrainStream(data.train_urls, cfg, epoch=0, rank=0, world=1, batches=10**9)
    return Loader(dataset, cfg, torch.device("cpu"))


def data_stage_costs(pairs: list[tuple[Path, Path]], shards: Path,
                     cfg: Any) -> dict[str, Any]:
    """Milliseconds per image (one thread) of each stage, for both paths: decode (shard
    sample at the JPEG scale its drawn crop needs vs the full-size files) and the same
    training transform."""
    augment = AugmentParams.from_config(cfg.data)
    raws = list(iter_raw(split_urls(shards, "train")))
    files = [(p.read_bytes(), m.read_bytes(), str(p), str(m)) for p, m in pairs]
    spent = dict.fromkeys(("shard_decode", "shard_transform", "folder_decode",
                           "folder_transform"), 0.0)
    for i, raw in enumerate(raws):
        t0 = time.perf_counter()
        aug = draw_augmentation(*raw_image_size(raw), augment, generator_for(0, i))
        sample = decode_sample(raw, draft_size=aug.decode_size())
        t1 = time.perf_counter()
        apply_augmentation(sample.image, sample.mask, aug)
        spent["shard_decode"] += t1 - t0
        spent["shard_transform"] += time.perf_counter() - t1
    for i, (image_bytes, mask_bytes, image_name, mask_name) in enumerate(files):
        t0 = time.perf_counter()
        image, size = load_image(image_bytes, image_name)
        mask = load_mask(mask_bytes, mask_name, expected_size=size)
        t1 = time.perf_counter()
        train_transform(image, mask, augment, generator_for(0, i))
        spent["folder_decode"] += t1 - t0
        spent["folder_transform"] += time.perf_counter() - t1
    counts = {"shard": len(raws), "folder": len(files)}
    return {f"{k}_ms": rounded(1000 * v / counts[k.split("_")[0]]) for k, v in spent.items()}


def bench_data(plan: BenchPlan, workdir: Path) -> dict[str, Any]:
    """Shard pipeline vs folder loader, images/s with one worker (one process, one thread)."""
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    source = full_size_source(workdir, plan)
    pairs = source_pairs(source)
    shards, pack_s = packed(source, workdir / "shards-full")
    manifest = read_manifest(shards)
    cfg = bench_config([f"data.image_size={plan.image_size}", f"data.batch_size={plan.batch_size}"])
    folder = FolderLoader(pairs, plan.batch_size, cfg.data)
    images = plan.data_batches * plan.batch_size
    # The same pipeline on shards stored larger: how much the stored size (pack.max_side)
    # decides, for a choice between image detail and decode time.
    other_side = OTHER_STORE_SIDE
    other, _ = packed(source, workdir / f"shards-full-{other_side}", max_side=other_side)
    with shard_loader(shards, cfg, workers=0) as loader, \
            shard_loader(other, cfg, workers=0) as other_loader:
        pipeline, other_pipeline = iter(loader), iter(other_loader)
        log.info("data: first shard batches (fill the %d-sample shuffle buffers)",
                 cfg.data.shuffle_buffer)
        next(pipeline)
        next(other_pipeline)

        def rate(fn: Callable[[], Any]) -> float:
            return images / timed(lambda: [fn() for _ in range(plan.data_batches)])

        runs = interleaved({"folder": lambda: rate(folder.next_batch),
                            "shards": lambda: rate(lambda: next(pipeline)),
                            "shards_other": lambda: rate(lambda: next(other_pipeline))},
                           plan.warmup, plan.repeats)
    shard_s, folder_s = stats(runs["shards"]), stats(runs["folder"])
    stages = data_stage_costs(pairs, shards, cfg)
    source_bytes = sum(p.stat().st_size + m.stat().st_size for p, m in pairs)
    mps = megapixels([p for p, _ in pairs])
    speedup = shard_s["median"] / folder_s["median"]
    return {
        "threads": 1, "image_size": plan.image_size, "batch_size": plan.batch_size,
        "images": len(pairs), "source_megapixels_mean": rounded(statistics.fmean(mps)),
        "source_megapixels_max": rounded(max(mps)),
        "source_bytes_per_case": round(source_bytes / len(pairs)),
        "shard_bytes_per_sample": round(manifest["total_bytes"] / manifest["total_samples"]),
        "pack_max_side": manifest.get("options", {}).get("max_side"),
        "pack_seconds": rounded(pack_s) if pack_s else None,
        "pack_cases_per_s": rounded(len(pairs) / pack_s) if pack_s else None,
        "pack_workers": cfg.pack.workers,
        "shards_images_per_s": shard_s, "folder_images_per_s": folder_s,
        "stages_ms_per_image": stages,
        f"shards_max_side_{other_side}_images_per_s": stats(runs["shards_other"]),
        f"speedup_at_max_side_{other_side}": rounded(statistics.median(runs["shards_other"])
                                                / folder_s["median"]),
        "ratios": {"data_speedup_vs_folder": rounded(speedup)},
    }
