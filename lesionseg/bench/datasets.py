"""The data sets the cases measure on, generated under --workdir once and reused: full-size
synthetic sources, the race's demo-sized set, shards packed from them."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from lesionseg.bench.plan import RACE_SEED, SOURCE_SEED, SPEED_CASE_EPOCHS, BenchPlan
from lesionseg.config import load_config
from lesionseg.data.shard_format import MANIFEST
from lesionseg.data.shards import pack
from lesionseg.data.synthetic import OFFICIAL_NAMES, write_isic_dataset
from lesionseg.recipe import resolve

log = logging.getLogger(__name__)

def full_size_source(workdir: Path, plan: BenchPlan) -> Path:
    """The full-size synthetic ISIC source (plan.images training cases, with masks), cached."""
    spec = {"n": plan.images, "seed": SOURCE_SEED, "min_side": plan.min_side,
            "max_side": plan.max_side}
    return _cached_source(workdir / "source-full", spec, lambda root: write_isic_dataset(
        root, plan.images, seed=SOURCE_SEED, min_side=plan.min_side, max_side=plan.max_side,
        progress=True))


def race_source(workdir: Path, plan: BenchPlan) -> Path:
    """The demo-sized synthetic source of the training race, cached."""
    lo, hi = plan.race_sides
    spec = {"n": plan.race_cases, "seed": RACE_SEED, "min_side": lo, "max_side": hi}
    return _cached_source(workdir / "source-race", spec, lambda root: write_isic_dataset(
        root, plan.race_cases, seed=RACE_SEED, min_side=lo, max_side=hi, progress=True))


def _cached_source(root: Path, spec: dict[str, Any], write: Callable[[Path], Any]) -> Path:
    """Write the data set unless `root` already holds one made with the same spec."""
    marker = root / "bench-source.json"
    with contextlib.suppress(OSError, ValueError):
        if json.loads(marker.read_text()) == spec:
            return root
    shutil.rmtree(root, ignore_errors=True)
    log.info("writing %d synthetic cases (longest side %d-%d) to %s", spec["n"],
             spec["min_side"], spec["max_side"], root)
    write(root)
    marker.write_text(json.dumps(spec))
    return root


def packed(source: Path, out: Path, **pack_overrides: Any) -> tuple[Path, float | None]:
    """Pack `source` with the default pack config (plus overrides) unless `out` holds it;
    returns the folder and the packing seconds (None when reused)."""
    cfg = bench_config([f"pack.{k}={v}" for k, v in pack_overrides.items()])
    stamp = out / "bench-pack.json"
    spec = {"source": str(source), "pack": dataclasses.asdict(cfg.pack),
            "source_spec": json.loads((source / "bench-source.json").read_text())}
    with contextlib.suppress(OSError, ValueError):
        if json.loads(stamp.read_text()) == spec and (out / MANIFEST).is_file():
            return out, None
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    pack([source], out, cfg.pack, progress=True)
    seconds = time.perf_counter() - t0
    stamp.write_text(json.dumps(spec))
    return out, seconds


def bench_config(overrides: list[str]) -> Any:
    """A Config from the defaults plus overrides (encoder random: no download here), its
    automatic recipe resolved for a long schedule: the strong augmentation, the costliest one,
    is what the speed cases measure. The speed cases infer over every split of their
    training-layout source (`infer.splits`): they time images, they score nothing."""
    cfg = load_config(None, ["model.encoder_weights=null", "tracking.backend=none",
                             "infer.splits=[train,test]", *overrides])
    resolve(cfg, total_steps=SPEED_CASE_EPOCHS, steps_per_epoch=1)
    return cfg


def source_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(image, mask) paths of the training cases of an ISIC-layout folder, sorted by id."""
    images = sorted((root / OFFICIAL_NAMES[("train", "image")]).glob("*.jpg"))
    masks = root / OFFICIAL_NAMES[("train", "mask")]
    return [(p, masks / f"{p.stem}_Segmentation.png") for p in images]


def megapixels(paths: list[Path]) -> list[float]:
    sizes = []
    for p in paths:
        with Image.open(p) as img:
            sizes.append(img.width * img.height / 1e6)
    return sizes
