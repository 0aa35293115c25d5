"""Batch inference: masks, per-image ISIC metrics, a summary and a report for whole folders,
archives and shard folders, split across processes (`accelerate launch`) and jobs (Slurm).

Pipeline per process: `sources.collect` → this (part, rank)'s items minus those already done →
decode threads (or DataLoader worker processes) read and decode (JPEG draft) and resize with
the eval transform → batched forward (inference mode, channels_last, autocast, optional flip
TTA; on a CPU in turns with the stages, lesionseg/infer/phases.py) → a thread pool upsamples
each probability map to the original size once, thresholds, writes the mask PNG, scores it
against the truth, and the main thread appends one row per image to its part file.

Restartable: a mask is written (temporary name + rename) before its row, rows are appended
one fsynced line at a time, and a rerun skips every id that already has a row. When a part's
processes finish they leave done markers; whoever sees every part done merges the part files
into metrics.csv, errors.csv, summary.json and report.html (`--merge DIR` does it by hand).

Here: the run (`run_inference`, `process_items`) and the threshold it applies; below it in
lesionseg/infer/: split (the work split), decode, loader, phases, predict, finish (one image's
outputs), journal, merge; the command line: lesionseg/commands/infer.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lesionseg.config import Config, InferConfig, load_config, to_dict
from lesionseg.data.images import (
    write_mask,
)
from lesionseg.data.sources import Inventory, Item, assign, collect, read_order
from lesionseg.files import atomic_write_text, check_output_dir, sha256_file
from lesionseg.infer import InferenceError
from lesionseg.infer.decode import ItemDataset, collate, decode_item, read_truth
from lesionseg.infer.finish import finish_in_turn, finish_item
from lesionseg.infer.journal import (
    PARTS,
    RowLog,
    check_signature,
    done_ids,
    part_lock,
    parts_done,
    read_rows,
)
from lesionseg.infer.loader import make_loader
from lesionseg.infer.merge import ERROR_COLUMNS, METRIC_COLUMNS, merge, with_scores, write_csv
from lesionseg.infer.outputs import (
    PRED_RGB,
    THUMB_SIDE,
    TRUTH_RGB,
    OutputSpec,
    above_threshold,
    full_size_mask,
    render_overlay,
    write_previews,
)
from lesionseg.infer.phases import ForwardPhases
from lesionseg.infer.predict import (
    TTA_FLIPS,
    Ensemble,
    Predictor,
    cpu_has_bf16,
    ensemble_members,
    load_ensemble,
    load_exported,
    load_predictor,
    precision_name,
    precision_reason,
    tta_average,
)
from lesionseg.infer.split import distributed_state, job_part, local_processes, run_device
from lesionseg.metrics import degenerate_checkpoint
from lesionseg.postprocess import DEFAULT_THRESHOLD, Postprocess
from lesionseg.quality import QualityModel
from lesionseg.threadplan import lower_priority, plan_threads, usable_cores

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the run


def run_inference(checkpoint: str | Path | Sequence[str | Path], inputs: list[str | Path],
                  out: str | Path, cfg: Config | None = None, *, masks: list[str | Path] = (),
                  num_shards: int = 1, shard_index: int = 0,
                  retry_failed: bool = False) -> dict[str, Any] | None:
    """Process this job part's share of `inputs` in this process; returns the merged summary
    when this process finished the last part (else None). `checkpoint`: one model file, or
    several and/or cross-validation run folders for an ensemble (`ensemble_members`).
    `retry_failed` redoes the images whose earlier row is an error."""
    cfg = cfg or load_config(None, [])
    check_output_dir(out, "--out")
    threads = torch.get_num_threads()
    try:
        return _run(checkpoint, inputs, Path(out), cfg, list(masks), num_shards, shard_index,
                    retry_failed)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _run(checkpoint: str | Path | Sequence[str | Path], inputs: list[str | Path], out: Path,
         cfg: Config,
         masks: list[str | Path], num_shards: int, shard_index: int,
         retry_failed: bool = False) -> dict[str, Any] | None:
    """Enumerate, pick this (part, rank)'s unfinished items, process them, mark the part done
    and merge if it was the last one."""
    icfg = cfg.infer
    state = distributed_state(icfg.device)
    device = run_device(icfg.device, state)
    if not state.is_main_process:
        logging.getLogger("lesionseg").setLevel(logging.WARNING)
    # Threads first: the runtime (torch or onnxruntime) takes its count when it is opened.
    threads = plan_threads(usable_cores() // local_processes(state), device.type == "cuda",
                           icfg.num_threads, icfg.num_workers, icfg.post_threads,
                           torch_default=torch.get_num_threads(), worker_type=icfg.worker_type)
    torch.set_num_threads(threads.torch_threads)
    icfg = replace(icfg, num_threads=threads.torch_threads, num_workers=threads.decode_workers,
                   post_threads=threads.finish_threads, worker_type=threads.worker_type)
    cfg = replace(cfg, infer=icfg)
    log.info("threads: %s", threads.describe())
    # Inputs, truth and models are checked before anything is written under --out: a
    # mistyped path leaves --out as it was (absent, or free for the corrected command).
    inventory = collect(inputs, masks, tuple(icfg.splits))
    members = ensemble_members(checkpoint)
    # Hashed in a thread while the models load (hashing a mapped file holds no GIL).
    with cf.ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher:
        hashing = hasher.map(sha256_file, members)
        predictor, ckpt_cfg, meta, image_size = load_ensemble(members, icfg, device)
        digests = list(hashing)
    post, post_source = applied_postprocess(icfg, meta)
    icfg = replace(icfg, threshold=post.threshold, postprocess=post.name)
    cfg = replace(cfg, infer=icfg)
    if predictor.runtime is not None:
        device = predictor.device
    runtime = {"device": device.type if state.num_processes > 1 else str(device),
               "precision": predictor.precision,
               "precision_reason": precision_reason(icfg.mixed_precision, predictor),
               "backend": predictor.backend, "processes": state.num_processes}
    log.info("inference on %s, %s precision (%s), backend %s, "
             "%d process(es), %s, %d px, threshold %g, post-processing %s (%s)%s",
             runtime["device"], runtime["precision"], runtime["precision_reason"],
             runtime["backend"],
             state.num_processes, f"ensemble of {len(members)} models" if len(members) > 1
             else "one model", image_size, post.threshold, post.name, post_source,
             (", flip TTA" if icfg.tta else "")
             + (f", {predictor.refine.describe()}" if predictor.refine else ""))
    run_cfg = _run_config(ckpt_cfg, cfg, image_size)
    signature = {
        "num_shards": num_shards, "inputs": [str(Path(p).resolve()) for p in inputs],
        "masks": [str(Path(p).resolve()) for p in masks],
        # An ensemble's: every member's, in order (resuming or joining needs the same models).
        "checkpoint_sha256": digests[0] if len(digests) == 1 else digests,
        "image_size": image_size,
        "threshold": icfg.threshold, "postprocess": icfg.postprocess, "tta": icfg.tta,
        # the second pass's zoom cap (lesionseg.infer.refine), 0 = none
        "refine": round(predictor.refine.max_zoom, 4) if predictor.refine else 0,
        "empty_fallback": icfg.empty_fallback,
        "splits": list(icfg.splits),
    }
    parts_dir = out / PARTS
    parts_dir.mkdir(parents=True, exist_ok=True)
    check_signature(parts_dir, signature)
    quality = QualityModel.from_meta(meta, icfg.review_below, icfg.review_share)
    runtime["quality"] = quality.describe((len(TTA_FLIPS) if icfg.tta else 1) * len(members),
                                          len(members))
    if predictor.refine:  # the views the spread reads are the pasted ones inside the box
        runtime["quality"]["uncertainty"] += (", of the views after the lesion-centred second "
                                              "pass (inside its box, the crop's)")
    runtime["temperature"] = applied_temperature(meta)
    degenerate = degenerate_checkpoint(meta)
    if degenerate:  # its masks are the empty-mask fallback's guesses, or the whole image
        runtime["warning"] = f"degenerate checkpoint: {degenerate}"
        log.warning("DEGENERATE CHECKPOINT %s: %s (its model card says so too)",
                    ", ".join(str(m) for m in members), degenerate)
    _write_run_files(parts_dir, signature, _checkpoint_record(checkpoint, members, digests, meta),
                     run_cfg, inventory, shard_index, state.process_index, runtime)

    mine = assign(inventory.items, num_shards, shard_index, state.num_processes, state.process_index)
    with part_lock(parts_dir, shard_index, state.process_index):
        finished = done_ids(parts_dir, retry_failed)
        todo = read_order([it for it in mine if it.id not in finished])
        log.info("part %d/%d, process %d/%d: %d images (%d of %d already done); %d inputs skipped "
                 "as not images%s, %d input errors", shard_index, num_shards, state.process_index,
                 state.num_processes, len(todo), len(mine) - len(todo), len(mine),
                 sum(inventory.skipped.values()), _skipped_hint(inventory), len(inventory.errors))

        spec = OutputSpec(out, post, icfg.save_probs, icfg.save_overlays, icfg.report,
                          quality, runtime["temperature"])
        row_log = RowLog(parts_dir / f"rows-p{shard_index:04d}-r{state.process_index:03d}.jsonl")
        try:
            # Phases need torch's threads: a runtime (onnxruntime) keeps the count it opened with.
            stats = process_items(todo, predictor, image_size, icfg, spec, row_log,
                                  show_progress=state.is_local_main_process,
                                  phased=threads.phased and predictor.runtime is None,
                                  shared_threads=threads.shared_threads)
        finally:
            row_log.close()
        stats.update(part=shard_index, rank=state.process_index, world_size=state.num_processes,
                     assigned=len(mine), threads=threads.as_dict())
        atomic_write_text(parts_dir / f"done-p{shard_index:04d}-r{state.process_index:03d}-of-"
                          f"{state.num_processes:03d}.json", json.dumps(stats, indent=1))
    # Every process of this part is done before anyone looks: then the main process alone
    # says what is left and merges (a rank finishing first would report its siblings missing).
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    complete, missing = parts_done(parts_dir, num_shards)
    if not complete:
        log.info("part %d of %d done; part(s) %s of this --num-shards %d job not finished yet "
                 "(the last part to finish merges, or run --merge %s when they are)",
                 shard_index, num_shards, ", ".join(map(str, missing)), num_shards, out)
        return None
    return merge(out)


def _run_config(ckpt_cfg: Config, cfg: Config, image_size: int) -> Config:
    """The checkpoint's config with this run's infer (image_size resolved) and tracking
    sections."""
    return replace(ckpt_cfg, infer=replace(cfg.infer, image_size=image_size),
                   tracking=cfg.tracking)


def applied_postprocess(icfg: InferConfig, meta: dict[str, Any]) -> tuple[Postprocess, str]:
    """The threshold and post-processing this run applies, and where they come from: what
    the command line (or config) says, else the checkpoint's validation choice
    (`meta["postprocess"]`, written at the end of training), else 0.5 and none."""
    chosen = Postprocess.from_meta(meta)
    # tuning stores its untuned defaults, with the reason, when val was too small to choose on
    origin = ("the checkpoint's validation" if meta.get("postprocess", {}).get("tuned", True)
              else "the checkpoint's untuned defaults (too few val images to choose on)")
    threshold = icfg.threshold
    sources = []
    if threshold is None:
        threshold = chosen.threshold if chosen else DEFAULT_THRESHOLD
        sources.append(f"threshold from {origin}" if chosen else "threshold default")
    else:
        sources.append("threshold given")
    if icfg.postprocess == "auto":
        steps = chosen.steps if chosen else ()
        sources.append(f"post-processing from {origin}" if chosen else
                       "post-processing default (the checkpoint holds no choice)")
    else:
        steps = Postprocess.parse(icfg.postprocess).steps
        sources.append("post-processing given")
    return Postprocess(float(threshold), steps, icfg.empty_fallback), "; ".join(sources)


def applied_temperature(meta: dict[str, Any]) -> float:
    """The temperature the checkpoint's val calibration keeps (lesionseg.quality), else 1."""
    cal = meta.get("calibration") or {}
    return float(cal["temperature"]) if cal.get("applied") else 1.0


def _checkpoint_record(given: str | Path | Sequence[str | Path], members: list[Path],
                       digests: list[str], meta: dict) -> dict[str, Any]:
    """run.json's (and summary.json's) "checkpoint": path, sha256 and metadata of the model,
    or for an ensemble what was given, and every member's path and sha256."""
    if len(members) == 1:
        return {"path": str(members[0].resolve()), "sha256": digests[0], "meta": _plain(meta)}
    given = [given] if isinstance(given, (str, Path)) else list(given)
    return {"path": ", ".join(str(Path(g).resolve()) for g in given), "sha256": None,
            "meta": _plain(meta),
            "members": [{"path": str(p.resolve()), "sha256": d}
                        for p, d in zip(members, digests, strict=True)]}


def _write_run_files(parts_dir: Path, signature: dict, checkpoint: dict[str, Any],
                     run_cfg: Config, inventory: Inventory, part: int, rank: int,
                     runtime: dict[str, Any]) -> None:
    """run.json (settings, checkpoint, config) and this part's inventory (input errors and
    skip counts, the same for every part; the merge takes the union)."""
    if rank == 0:
        run = {"signature": signature, "checkpoint": checkpoint,
               "runtime": runtime, "config": to_dict(run_cfg)}
        atomic_write_text(parts_dir / "run.json", json.dumps(run, indent=1))
        inv = {"errors": inventory.errors, "skipped": dict(inventory.skipped),
               "skipped_examples": inventory.skipped_examples,
               "splits_read": inventory.splits_read, "left_out": inventory.left_out,
               "images": len(inventory.items) + len(inventory.errors),
               "masks_found": inventory.masks_found, "masks_unused": inventory.masks_unused}
        atomic_write_text(parts_dir / f"inventory-p{part:04d}.json", json.dumps(inv, indent=1))


def _skipped_hint(inventory: Inventory) -> str:
    """' (e.g. FILE; more in summary.json's skipped_examples)' naming the first skipped file,
    or '' when none was skipped."""
    first = next((files[0] for files in inventory.skipped_examples.values() if files), None)
    return f" (e.g. {first}; more in summary.json's skipped_examples)" if first else ""


def _plain(value: Any) -> Any:
    """JSON-safe copy of checkpoint metadata (numbers, strings, lists, dicts)."""
    return json.loads(json.dumps(value, default=str))


def process_items(items: list[Item], predictor: Predictor | Ensemble, image_size: int,
                  icfg: InferConfig,
                  spec: OutputSpec, row_log: RowLog, show_progress: bool = True,
                  phased: bool = False, shared_threads: int = 1) -> dict[str, Any]:
    """The loop: decode (workers) → forward (here) → finish (threads) → rows (here).
    `phased`: the forward and the stages take turns (lesionseg/infer/phases.py), falling back
    to `shared_threads` torch threads beside the stages when other processes load the cores."""
    start = time.perf_counter()
    counts = {"images": 0, "errors": 0, "forward_s": 0.0}
    if not items:
        return _loop_stats(counts, time.perf_counter() - start)
    preview_side = icfg.overlay_max_side if spec.save_overlays else (THUMB_SIDE if spec.thumbs else 0)
    # Phased (the plan says when): the forward takes every core, the stages wait meanwhile.
    phases = ForwardPhases(phased, shared_threads)
    # Decode worker processes (if any) start here, from the fork server.
    batches = make_loader(items, image_size, icfg, preview_side,
                          pin_memory=predictor.device.type == "cuda", before_item=phases.wait,
                          refine=predictor.refine)
    threads = icfg.post_threads or 1
    max_pending = 2 * threads + icfg.batch_size  # bounds memory: full-size maps live only here
    bar = tqdm(total=len(items), unit="img", disable=not show_progress, desc="infer")
    pending: set[cf.Future] = set()

    def record(row: dict[str, Any]) -> None:
        row_log.append(row)
        counts["errors"] += row["status"] == "error"
        counts["images"] += 1
        bar.update(1)

    def drain(limit: int) -> None:
        """Record every finished image; block until at most `limit` are still pending."""
        while True:
            for fut in [f for f in pending if f.done()]:
                pending.discard(fut)
                record(fut.result())
            if len(pending) <= limit:
                return
            cf.wait(pending, return_when=cf.FIRST_COMPLETED)

    # The bar closes also when a full disk stops the run, so the error is the last line.
    # On a CPU with worker processes the finishing threads, like them, yield to the forward.
    yields = predictor.device.type == "cpu" and icfg.worker_type == "process" and icfg.num_workers
    with cf.ThreadPoolExecutor(threads, thread_name_prefix="finish",
                               initializer=lower_priority if yields else None) as pool, \
            contextlib.closing(bar):
        for batch in batches:
            for failed in batch["failed"]:
                if failed.get("environmental"):
                    raise InferenceError(failed["error"])
                item = items[failed["index"]]
                record({"id": item.id, "input": item.origin, "status": "error",
                        "reason": failed["error"], **({"split": item.split} if item.split else {})})
            if batch["images"] is None:
                continue
            t0 = time.perf_counter()
            with phases.forward():
                probs, views = predictor.predict(batch["images"], batch["fine"])
            counts["forward_s"] += time.perf_counter() - t0
            for sample, prob, member_views in zip(batch["good"], probs, views, strict=True):
                drain(max_pending - 1)
                pending.add(pool.submit(finish_in_turn, phases, items[sample["index"]], sample,
                                        prob, spec, member_views))
        drain(0)
    counts["phases"] = {"mode": phases.mode, "others_cores": phases.others_cores}
    return _loop_stats(counts, time.perf_counter() - start)


def _loop_stats(counts: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {"images": counts["images"], "errors": counts["errors"], "seconds": round(seconds, 3),
            "forward_seconds": round(counts["forward_s"], 3),
            "images_per_s": round(counts["images"] / seconds, 3) if counts["images"] else None,
            **({"phases": counts["phases"]} if "phases" in counts else {})}


# The names other modules and the tests reach through this module (the infer job's API).
__all__ = [
    "ERROR_COLUMNS", "METRIC_COLUMNS", "PRED_RGB", "THUMB_SIDE", "TRUTH_RGB", "TTA_FLIPS",
    "Ensemble", "InferenceError", "ItemDataset", "OutputSpec", "Predictor", "RowLog",
    "above_threshold", "write_previews",
    "applied_postprocess", "applied_temperature", "check_signature", "collate",
    "cpu_has_bf16", "decode_item", "done_ids", "ensemble_members", "finish_item", "full_size_mask", "job_part",
    "load_ensemble", "load_exported", "load_predictor", "merge", "parts_done", "precision_name",
    "read_rows", "read_truth", "render_overlay", "run_inference", "tta_average", "with_scores",
    "write_csv", "write_mask",
]
