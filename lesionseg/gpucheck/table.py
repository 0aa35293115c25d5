"""The results read back: the top-level figures against their targets (`summarize`) and
the printed table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lesionseg.bench.measure import rounded
from lesionseg.bench.table import aligned, format_value
from lesionseg.gpucheck.plan import TARGETS


def summarize(doc: dict[str, Any]) -> None:
    """Top-level figures a reader looks for first: the inference ratios against their targets
    (judged on CUDA only), compile's gain over the eager step, the failed parts."""
    parts = doc["parts"]
    infer = parts.get("inference", {})
    targets = {}
    for name, (op, target, what) in TARGETS.items():
        value = infer.get(name)
        met = None
        if value is not None and doc["device"] == "cuda":
            met = value >= target if op == ">=" else value <= target
        doc[name] = value
        targets[name] = {"value": value, "target": f"{op} {target:g}", "met": met,
                         "what": what + ("" if doc["device"] == "cuda"
                                         else " (not judged on the CPU)")}
    doc["targets"] = targets
    eager = parts.get("train_step", {}).get("variants", {}).get("bf16 channels_last", {})
    compiled = parts.get("compile", {})
    doc["compile_speedup_vs_eager"] = (
        rounded(eager["step_s"] / compiled["step_s"])
        if eager.get("step_s") and compiled.get("step_s") else None)
    doc["failed_parts"] = [p for p, r in parts.items() if r["status"] in ("failed", "timeout")]


def table_rows(doc: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(part, measurement, value, notes) rows of the printed table."""
    rows: list[tuple[str, str, str, str]] = []
    for part, r in doc["parts"].items():
        if r["status"] != "ok":
            why = r.get("reason") or r.get("error") or ""
            rows.append((part, r["status"].upper(), "", why.splitlines()[0][:90] if why else ""))
            continue
        rows += PART_ROWS[part](r)
    return rows


def _environment_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [("environment", "device", str(r["device_name"]),
             f"capability {r['capability']}, {r['gpu_count']} GPU(s), {format_value(r['memory_gb'])} GB, "
             f"bf16 {r['bf16_supported']}"),
            ("environment", "torch / torchvision / accelerate",
             f"{r['torch']} / {r['torchvision']} / {r['accelerate']}",
             f"CUDA {r['cuda_runtime']}, cuDNN {r['cudnn']}")]


def _train_step_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [("train_step", f"{name}, batch {r['batch_size']} at {r['image_size']}², s",
             format_value(v["step_s"]), f"{format_value(v['images_per_s'])} img/s, peak "
             f"{format_value(v['peak_memory_mb'])} MB, loss finite {v['loss_finite']}")
            for name, v in r["variants"].items()]


def _compile_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [("compile", "torch.compile bf16 channels_last step, s", format_value(r["step_s"]),
             f"{format_value(r['images_per_s'])} img/s; first step (compiling) "
             f"{format_value(r['first_step_s'])} s")]


def _pinned_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [("pinned_memory", f"host→device {name}, GB/s", format_value(r[name]["gb_per_s"]),
             f"{r['bytes'] / 2**20:.1f} MB uint8 batch, non_blocking")
            for name in ("pageable", "pinned")]


def _inference_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = []
    for precision, p in r["precisions"].items():
        rows += [("inference", f"{precision}: batch job / naive / forward, img/s",
                  f"{format_value(p['job_images_per_s'])} / {format_value(p['naive_images_per_s'])} / "
                  f"{format_value(p['forward_images_per_s'])}",
                  f"{r['images']} full-size images, batch {r['batch_size']}"),
                 ("inference", f"{precision}: speedup vs naive / over pure forward",
                  f"{format_value(p['infer_speedup_vs_naive'])} / {format_value(p['infer_over_pure_forward'])}",
                  "targets >= 3 / <= 1.3 (GPU)")]
    threads = r.get("threads") or {}
    rows.append(("inference", "thread plan (torch / decode workers / finishing)",
                 f"{threads.get('torch_threads')} / {threads.get('decode_workers')} / "
                 f"{threads.get('finish_threads')}", f"{threads.get('cores')} cores"))
    return rows


def _train_run_row(part: str, name: str, run: dict[str, Any]) -> tuple[str, str, str, str]:
    return (part, f"{name}: final val Dice", format_value(run["final_val_dice"]),
            f"wall {format_value(run['wall_s'])} s, step {format_value(run['step_time_s'])} s, loss finite "
            f"{run['loss_finite']}, exit {run['exit_status']}")


def _train_job_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [_train_run_row("train_job", name, run) for name, run in r["runs"].items()]


def _ddp_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return [_train_run_row("ddp", f"{r['processes']} ranks bf16", r)]


PART_ROWS: dict[str, Callable[[dict[str, Any]], list[tuple[str, str, str, str]]]] = {
    "environment": _environment_rows, "train_step": _train_step_rows,
    "pinned_memory": _pinned_rows, "inference": _inference_rows,
    "train_job": _train_job_rows, "ddp": _ddp_rows, "compile": _compile_rows}


def format_table(doc: dict[str, Any]) -> str:
    """The printed table, then the targets and the failed parts."""
    lines = [f"lesionseg gpucheck{' (quick)' if doc.get('quick') else ''} on {doc['device']}, "
             f"{doc.get('total_seconds')} s", ""]
    lines += aligned([("part", "measurement", "value", "notes"), *table_rows(doc)])
    lines += ["", "targets:"]
    for name, t in doc["targets"].items():
        verdict = {True: "met", False: "MISSED", None: "not judged"}[t["met"]]
        lines.append(f"  {name:26s} {format_value(t['value']):>8s}  target {t['target']:7s} {verdict}")
    lines.append(f"  compile_speedup_vs_eager   {format_value(doc['compile_speedup_vs_eager']):>8s}")
    if doc["failed_parts"]:
        lines.append(f"\nparts failed or timed out: {', '.join(doc['failed_parts'])}")
    return "\n".join(lines)
