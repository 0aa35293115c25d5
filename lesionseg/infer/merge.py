"""Merging part files into metrics.csv, errors.csv, summary.json and report.html."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from lesionseg.files import atomic_write_text
from lesionseg.infer import InferenceError
from lesionseg.infer.journal import (
    MASKS,
    OVERLAYS,
    PARTS,
    PROBS,
    THUMBS,
    parts_done,
    read_rows,
)
from lesionseg.metrics import METRIC_NAMES, scores, summarize
from lesionseg.quality import review_summary
from lesionseg.report import write_report
from lesionseg.tracking import log_inference

log = logging.getLogger(__name__)

# metrics.csv columns: DESIGN.md's contract first, then counts and bookkeeping; one row per
# image that got a mask (with truth or not), so it maps every input to its mask.
METRIC_COLUMNS = ("id", "height", "width", "dice", "iou", "accuracy", "sensitivity",
                  "specificity", "threshold_jaccard", "tp", "fp", "fn", "tn", "status", "reason",
                  "input", "mask", "split", "pred_area", "pred_fraction", "uncertainty",
                  "expected_dice", "needs_review")
ERROR_COLUMNS = ("input", "id", "reason")


def _collect_rows(parts_dir: Path) -> list[dict[str, Any]]:
    """All part rows, one per id (an 'ok' row wins over others), sorted by id."""
    best: dict[str, dict[str, Any]] = {}
    rank = {"ok": 0, "failed": 1, "no_truth": 2, "error": 3}
    for path in sorted(parts_dir.glob("rows-*.jsonl")):
        for row in read_rows(path):
            old = best.get(row["id"])
            if old is None or rank.get(row["status"], 9) < rank.get(old["status"], 9):
                best[row["id"]] = row
    return [best[k] for k in sorted(best)]


def with_scores(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Add the six ISIC scores (from lesionseg.metrics) to every 'ok' row; return the counts."""
    scored = [r for r in rows if r["status"] == "ok"]
    counts = torch.tensor([[r["tp"], r["fp"], r["fn"], r["tn"]] for r in scored],
                          dtype=torch.int64).reshape(-1, 4)
    if scored:
        per_image = {k: v.tolist() for k, v in scores(counts).items()}
        for i, row in enumerate(scored):
            for name in METRIC_NAMES:
                row[name] = per_image[name][i]
            row["iou"] = row["jaccard"]
    return rows, counts


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


def merge(out: str | Path, report: bool | None = None) -> dict[str, Any]:
    """Combine every part under `out` into metrics.csv, errors.csv, summary.json (and
    report.html): rows deduplicated by id and sorted. Safe to run again at any time."""
    out = Path(out)
    parts_dir = out / PARTS
    if not (parts_dir / "run.json").is_file():
        raise InferenceError(f"{out}: no inference run here (missing {PARTS}/run.json)")
    run = json.loads((parts_dir / "run.json").read_text())
    num_shards = run["signature"]["num_shards"]
    complete, missing = parts_done(parts_dir, num_shards)
    if not complete:
        log.warning("%s: part(s) %s not finished; merging what is there", out,
                    ", ".join(map(str, missing)))
    if complete:
        _remove_stale_temps(out)
    rows, counts = with_scores(_collect_rows(parts_dir))
    inventory = _merged_inventory(parts_dir)
    metric_rows = [{**r, "mask": f"{MASKS}/{r['id']}_Segmentation.png",
                    "pred_fraction": _fraction(r.get("pred_area"), r)} for r in rows
                   if r["status"] in ("ok", "failed", "no_truth")]
    error_rows = inventory["errors"] + [
        {"input": r["input"], "id": r["id"], "reason": r["reason"]}
        for r in rows if r["status"] in ("error", "failed")]
    error_rows.sort(key=lambda e: (e["id"], e["input"]))
    write_csv(out / "metrics.csv", METRIC_COLUMNS, metric_rows)
    write_csv(out / "errors.csv", ERROR_COLUMNS, error_rows)
    summary = _summary(run, rows, counts, inventory, error_rows, parts_dir, complete, missing)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    if report if report is not None else run["config"]["infer"]["report"]:
        write_report(out / "report.html", summary, metric_rows, out / THUMBS)
    if complete and run["config"]["infer"].get("log_wandb"):
        log_inference(out, summary, metric_rows, out / THUMBS, run["config"].get("tracking", {}),
                      images=run["config"]["infer"].get("report_images", 60))
    log.info("merged %d images into %s: %d scored, %s, %d errors", len(rows), out,
             int(counts.shape[0]), means_line(summary), len(error_rows))
    return summary


def _fraction(area: int | None, row: dict[str, Any]) -> float | None:
    """Predicted lesion area as a fraction of the image (None for rows of an older version)."""
    if area is None or not row.get("height") or not row.get("width"):
        return None
    return round(area / (row["height"] * row["width"]), 6)


def _remove_stale_temps(out: Path) -> None:
    """Delete temporary files a killed writer left (`.<name>.*.tmp`): the ISIC scorer would
    pair them by the id in their names. Only once every part is done, so no writer is live."""
    for folder in (MASKS, PROBS, OVERLAYS, THUMBS):
        for tmp in (out / folder).glob(".*.tmp"):
            log.warning("removing %s, left by a killed writer", tmp)
            tmp.unlink(missing_ok=True)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) and not math.isnan(value) else "n/a"


def _merged_inventory(parts_dir: Path) -> dict[str, Any]:
    """Input errors and skip counts (every part found the same; union of their files)."""
    errors: dict[tuple[str, str], dict[str, str]] = {}
    merged: dict[str, Any] = {"skipped": {}, "skipped_examples": {}, "images": 0,
                              "masks_found": 0, "masks_unused": 0, "splits_read": {},
                              "left_out": {}}
    for path in sorted(parts_dir.glob("inventory-p*.json")):
        inv = json.loads(path.read_text())
        for e in inv["errors"]:
            errors[(e["input"], e["id"])] = e
        for key in ("skipped", "skipped_examples", "images", "masks_found", "masks_unused",
                    "splits_read", "left_out"):
            merged[key] = inv.get(key, merged[key])
    merged["errors"] = list(errors.values())
    return merged


def _means(counts: torch.Tensor) -> dict[str, Any]:
    """The six macro means (+ iou and images) of (N, 4) counts; None where nothing scored."""
    means = summarize(counts)
    means["iou"] = means["jaccard"]
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in means.items()}


def split_means(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Macro means of the scored rows of each split (rows without a split are left out)."""
    by_split: dict[str, list[list[int]]] = {}
    for r in rows:
        if r["status"] == "ok" and r.get("split"):
            by_split.setdefault(r["split"], []).append([r["tp"], r["fp"], r["fn"], r["tn"]])
    return {s: _means(torch.tensor(c, dtype=torch.int64).reshape(-1, 4))
            for s, c in sorted(by_split.items())}


def means_line(summary: dict[str, Any]) -> str:
    """'mean Dice 0.81', or per split and the pool named when several splits were scored."""
    by_split = summary.get("means_by_split") or {}
    if len(by_split) <= 1:
        split = f" ({next(iter(by_split))} split)" if by_split else ""
        return f"mean Dice {_fmt(summary['means'].get('dice'))}{split}"
    each = ", ".join(f"{s} {_fmt(m.get('dice'))} ({m.get('images')} images)"
                     for s, m in by_split.items())
    return (f"mean Dice per split: {each}; the pooled mean {_fmt(summary['means'].get('dice'))} "
            "mixes splits: report each split's own")


def _summary(run: dict, rows: list[dict], counts: torch.Tensor, inventory: dict,
             error_rows: list[dict], parts_dir: Path, complete: bool, missing: list[int]) -> dict:
    """summary.json: macro means (over every split scored, and per split), counts, failures,
    checkpoint, config, throughput."""
    means = _means(counts)
    by_split = split_means(rows)
    status = {s: sum(1 for r in rows if r["status"] == s) for s in ("ok", "failed", "no_truth", "error")}
    timing = [json.loads(p.read_text()) for p in sorted(parts_dir.glob("done-*.json"))]
    return {
        "complete": complete, "missing_parts": missing, "num_shards": run["signature"]["num_shards"],
        "images_found": inventory["images"],
        "masks_written": status["ok"] + status["failed"] + status["no_truth"],
        "scored": status["ok"], "metrics_failed": status["failed"], "without_truth": status["no_truth"],
        "errors": len(error_rows), "skipped_files": inventory["skipped"],
        "skipped_examples": inventory["skipped_examples"],
        "splits_read": inventory["splits_read"], "left_out_by_split": inventory["left_out"],
        "inputs": run["signature"]["inputs"], "masks": run["signature"]["masks"],
        "truth_masks_found": inventory["masks_found"], "truth_masks_unused": inventory["masks_unused"],
        "means": means, "means_by_split": by_split,
        # The top-level means pool these splits: a note says so when there are several.
        "means_splits": sorted(by_split),
        **({"means_note": f"means pool the {' and '.join(sorted(by_split))} splits; "
                          "means_by_split has each"} if len(by_split) > 1 else {}),
        "failures": [{"id": e["id"], "input": e["input"], "reason": e["reason"]} for e in error_rows],
        "threshold": run["signature"].get("threshold"),
        "postprocess": run["signature"].get("postprocess", "none"),
        "tta": run["signature"].get("tta", False),
        "refine": run["signature"].get("refine", 0),
        "device": run.get("runtime", {}).get("device"),
        "backend": run.get("runtime", {}).get("backend", "torch"),
        "precision": run.get("runtime", {}).get("precision"),
        "precision_reason": run.get("runtime", {}).get("precision_reason"),
        "review": review_summary(rows, run.get("runtime", {}).get("quality")),
        "temperature": run.get("runtime", {}).get("temperature", 1.0),
        # set when the checkpoint's own val figures say it learnt nothing (metrics.degenerate)
        **({"warning": run["runtime"]["warning"]} if run.get("runtime", {}).get("warning")
           else {}),
        "checkpoint": run["checkpoint"], "config": run["config"],
        "throughput": {"images_per_s": round(sum(t.get("images_per_s") or 0 for t in timing), 3),
                       "note": "sum over processes of images/s in their last session",
                       "processes": timing},
    }
