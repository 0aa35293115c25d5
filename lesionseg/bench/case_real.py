"""The accuracy benchmark's real case: the three trainers on real ISIC 2016 images.

`jobs/bench.py accuracy --real DIR` takes a folder in the ISIC 2016 Part 1 layout (the four
official folders, e.g. the real pairs in the project's shared data), packs it with every
default of `jobs/pack.py`, and trains ours (the jobs), the plain script and smp's U-Net in it at
equal epochs (30 at 128², random encoders), for every training seed. Each trainer's test masks
are scored by the official ISIC scorer: the macro Dice and Jaccard, and, per image, the
worst-decile mean Dice and the count of images below Dice 0.5 — the catastrophic masks a mean
hides. With `--real-fullsize DIR` (photographs without masks), the model ours trained at 128² is
applied to them and a contact sheet of its outlines is written for a person to look at.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lesionseg.bench.trainers import (
    mask_counts,
    packed_source,
    plain_model,
    round4,
    run_job,
    run_ours,
    run_plain,
    seed_mean,
)
from lesionseg.data.synthetic import OFFICIAL_NAMES
from lesionseg.errors import UserError
from lesionseg.files import atomic_write_text
from lesionseg.metrics import scores
from lesionseg.peers import build_peer

log = logging.getLogger(__name__)

REAL_SIZE, REAL_EPOCHS = 128, 30  # the protocol of the real case: every trainer alike
WORST_FRACTION = 0.1  # the worst tenth of the test images by Dice
FAILED_BELOW = 0.5  # an image scored below this Dice is counted as a failure
SHEET_SIDE = 256  # side of one tile of the contact sheet
SHEET_COLUMNS = 7
RESULT = "result.json"  # a finished trainer run's scores, reused by a rerun in the same workdir


def check_real_source(root: Path) -> Path:
    """`root` must hold the four official ISIC 2016 Part 1 folders; else a UserError naming
    the first one missing."""
    for name in OFFICIAL_NAMES.values():
        if not (root / name).is_dir():
            raise UserError(f"--real {root}: no folder {name} (give a folder in the ISIC 2016 "
                            "Part 1 layout: the four official folders)")
    return root


def per_image_dice(truth: Path, masks: Path) -> dict[str, float]:
    """Dice of every truth mask's prediction in `masks` (same file names), as the official
    scorer computes it per image (both binarised at > 128; empty vs empty is 1)."""
    counts = mask_counts(truth, masks)
    dice = scores(torch.tensor(list(counts.values()), dtype=torch.long).reshape(-1, 4))["dice"]
    return {case_id: float(d) for case_id, d in zip(counts, dice.tolist(), strict=True)}


def tail_scores(dice: dict[str, float]) -> dict[str, Any]:
    """The worst-decile mean Dice, the count below FAILED_BELOW and the ten worst ids."""
    ranked = sorted(dice.items(), key=lambda kv: kv[1])
    k = max(1, math.ceil(WORST_FRACTION * len(ranked)))
    return {"worst10_dice": round4(sum(v for _, v in ranked[:k]) / k),
            "below_half": sum(1 for _, v in ranked if v < FAILED_BELOW),
            "worst": [{"id": i, "dice": round4(v)} for i, v in ranked[:10]]}


def run_real(source: Path, workdir: Path, seeds: tuple[int, ...], with_peer: bool,
             fullsize: Path | None = None, size: int = REAL_SIZE,
             epochs: int = REAL_EPOCHS) -> dict[str, Any]:
    """The real case: for each seed ours, plain (and smp) at equal epochs on `source`, scored
    with tails; the mean over seeds per trainer; then the full-size check with the first
    seed's model. `size` and `epochs` are the protocol's (tests shrink them)."""
    check_real_source(source)
    shards = packed_source(source, workdir / "real-shards")
    truth = source / OFFICIAL_NAMES[("test", "mask")]
    builders: dict[str, Callable[[], torch.nn.Module]] = {"plain": plain_model}
    if with_peer:
        builders["smp"] = build_peer
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], **{n: [] for n in builders}}
    for seed in seeds:
        seed_dir = workdir / f"real-seed-{seed}"
        protocol = {"image_size": size, "epochs": epochs, "encoder": "random", "seed": seed}
        runs["ours"].append(_reused_or_run(
            seed_dir / "ours", protocol, lambda d, s=seed: run_ours(
                source, shards, d, size, epochs, s), truth, "infer/masks", reuse=False))
        for name, build in builders.items():
            runs[name].append(_reused_or_run(
                seed_dir / name, protocol, lambda d, n=name, b=build, s=seed: run_plain(
                    n, b, source, size, epochs, s, d / "masks"), truth, "masks"))
    rows = {name: _with_tails(seed_mean(r), r) for name, r in runs.items()}
    result: dict[str, Any] = {
        "source": str(source), "image_size": size, "epochs": epochs,
        "seeds": list(seeds), "test_images": len(list(truth.glob("*_Segmentation.png"))),
        "trainers": rows, "margins": paired_margins(runs),
        "note": "real ISIC 2016 test split scored by the official scorer (macro means); "
                "worst10_dice = mean Dice of the worst tenth of the test images, below_half = "
                "images under Dice 0.5; every trainer 30 epochs at 128², random encoder; each "
                "row the mean over the seeds; train_images: the plain script and smp train on "
                "every training pair, ours on the train split and holds val out (val_images) "
                "for its quality fit"}
    if fullsize is not None:
        result["fullsize"] = fullsize_check(workdir / f"real-seed-{seeds[0]}" / "ours" / "run"
                                            / "best.pt", fullsize, workdir / "real-fullsize")
    return result


def paired_margins(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, list[float]]]:
    """Ours minus each peer, seed by seed (the same seed's runs paired): Dice and worst-tenth
    Dice per seed. A mean margin is believable only when the seeds agree on its sign and
    their spread is small against it: one run of the defaults varies by about 0.2 Dice and
    1.5 points of the worst tenth (docs/BENCHMARKS.md, seventeenth stop)."""
    ours = runs["ours"]
    return {name: {"dice": [round4(o["dice"] - p["dice"]) for o, p in zip(ours, peer, strict=True)],
                   "worst10_dice": [round4(o["worst10_dice"] - p["worst10_dice"])
                                    for o, p in zip(ours, peer, strict=True)]}
            for name, peer in runs.items() if name != "ours"}


def _reused_or_run(folder: Path, protocol: dict[str, Any], run: Callable[[Path], dict[str, Any]],
                   truth: Path, masks: str, reuse: bool = True) -> dict[str, Any]:
    """One trainer's run in `folder`, scored with its tails. A peer's finished run of the same
    protocol in a reused --workdir (its result.json) is taken as it is, not trained again: the
    plain script's code is fixed. Ours (`reuse=False`) always trains: its recipe is what
    changes between benchmark runs."""
    done = folder / RESULT
    if reuse and done.is_file():
        row = json.loads(done.read_text())
        if row.get("protocol") == protocol:
            log.info("accuracy (real): %s reused from %s", row["trainer"], done)
            return row
    log.info("accuracy (real): training in %s (%s)", folder, protocol)
    folder.mkdir(parents=True, exist_ok=True)
    row = run(folder) | {"seed": protocol["seed"], "protocol": protocol}
    row |= tail_scores(per_image_dice(truth, folder / masks))
    atomic_write_text(done, json.dumps(row, indent=1))
    return row


def _with_tails(row: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A seed-mean row with the tail figures averaged too, and each seed's beside them (with
    its own worst images); the row's `worst` is the first seed's."""
    row = dict(row)
    for key in ("worst10_dice", "below_half"):
        row[key] = round4(sum(r[key] for r in runs) / len(runs))
    for entry, run in zip(row.get("per_seed", []), runs, strict=False):
        entry.update(worst10_dice=run["worst10_dice"], below_half=run["below_half"],
                     worst=run["worst"])
    row["worst"] = runs[0]["worst"]
    return row


def fullsize_check(checkpoint: Path, images: Path, out: Path) -> dict[str, Any]:
    """The 128² model on full-size photographs without truth: `jobs/infer.py` writes masks and
    overlays; the overlays are tiled into `contact-sheet.png` for a person to look at."""
    if not images.is_dir():
        raise UserError(f"--real-fullsize {images}: not a folder")
    out.mkdir(parents=True, exist_ok=True)
    run = out / "infer"
    run_job("infer.py", ["--checkpoint", str(checkpoint), "--input", str(images), "--out",
                      str(run), "--save-overlays", "--no-report"], out / "infer.log")
    overlays = sorted((run / "overlays").glob("*_overlay.jpg"))
    sheet = contact_sheet(overlays, out / "contact-sheet.png")
    masks = sorted((run / "masks").glob("*.png"))
    fractions = [float((np.asarray(Image.open(m)) > 128).mean()) for m in masks]
    return {"images": len(masks), "contact_sheet": str(sheet),
            "empty_masks": sum(1 for f in fractions if f == 0),
            "mask_fraction_median": round4(float(np.median(fractions))) if fractions else None}


def contact_sheet(files: list[Path], out: Path) -> Path:
    """Tile images (each fitted into SHEET_SIDE², its file id under it) into one PNG."""
    if not files:
        raise UserError(f"{out.parent}: no overlays to put on a contact sheet")
    rows = math.ceil(len(files) / SHEET_COLUMNS)
    sheet = Image.new("RGB", (SHEET_COLUMNS * SHEET_SIDE, rows * SHEET_SIDE), "white")
    for k, path in enumerate(files):
        with Image.open(path) as img:
            tile = img.convert("RGB")
            tile.thumbnail((SHEET_SIDE - 4, SHEET_SIDE - 4))
        x, y = (k % SHEET_COLUMNS) * SHEET_SIDE, (k // SHEET_COLUMNS) * SHEET_SIDE
        sheet.paste(tile, (x + 2, y + 2))
    sheet.save(out, optimize=True)
    return out
