"""The run: every part in order, each in its own spawned, time-boxed process and session;
the JSON rewritten after each part."""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import logging
import multiprocessing
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from lesionseg.cli import setup_logging
from lesionseg.files import atomic_write_text
from lesionseg.gpucheck.plan import CUDA_ONLY, KILL_GRACE_S, PARTS, SCHEMA, CheckPlan
from lesionseg.gpucheck.table import summarize
from lesionseg.workers import end_process_group

log = logging.getLogger("lesionseg.gpucheck")

# Each part's module and function, imported by name in the part's own process: the parent never
# imports what a part measures, and a part's imports count against its own time limit.
PART_FUNCTIONS: dict[str, tuple[str, str]] = {
    "environment": ("environment", "check_environment"),
    "train_step": ("train_step", "check_train_step"),
    "pinned_memory": ("pinned", "check_pinned_memory"),
    "inference": ("inference", "check_inference"),
    "train_job": ("train_job", "check_train_job"),
    "ddp": ("train_job", "check_ddp"),
    "compile": ("train_step", "check_compile")}


def run_checks(plan: CheckPlan, workdir: Path, out: Path, quick: bool = False) -> dict[str, Any]:
    """Every part in order, each in its own time-boxed process; the JSON is written to `out`
    after each. Returns the document."""

    started = time.monotonic()
    deadline = started + plan.budget_s
    doc: dict[str, Any] = {
        "schema": SCHEMA, "quick": quick, "device": plan.device,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]], "plan": dataclasses.asdict(plan),
        "parts": {}}
    for part in PARTS:
        left = deadline - time.monotonic()
        skip = not_applicable(part, plan)
        if skip:
            doc["parts"][part] = {"status": "skipped", "reason": skip}
        elif left < 2 * KILL_GRACE_S:
            doc["parts"][part] = {"status": "skipped", "reason": "out of time (--budget)"}
        else:
            limit = min(plan.timeout(part), left)
            log.info("gpucheck %s: starting (at most %.0f s)", part, limit)
            doc["parts"][part] = run_part(part, plan, workdir, limit)
            log.info("gpucheck %s: %s in %.0f s", part, doc["parts"][part]["status"],
                     doc["parts"][part].get("seconds", 0))
        summarize(doc)
        doc["total_seconds"] = round(time.monotonic() - started, 1)
        atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
    return doc


def not_applicable(part: str, plan: CheckPlan) -> str | None:
    """Why a part does not run on this host (None: it runs)."""
    import torch

    if plan.device != "cuda" and part in CUDA_ONLY:
        return CUDA_ONLY[part]
    if part == "ddp" and torch.cuda.device_count() < 2:
        return f"{torch.cuda.device_count()} GPU (NCCL refuses two ranks on one GPU)"
    return None


def run_part(part: str, plan: CheckPlan, workdir: Path, limit_s: float) -> dict[str, Any]:
    """Run one part in a fresh spawned process that leads its own session; past `limit_s` the
    whole session (DataLoader workers, training subprocesses, compile workers) is killed."""
    result_file = workdir / f"part-{part}.json"
    result_file.unlink(missing_ok=True)
    deadline = time.monotonic() + limit_s  # CLOCK_MONOTONIC is system-wide on Linux
    default_method = multiprocessing.get_start_method()
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_part_main, name=f"gpucheck-{part}",
                       args=(part, plan, str(workdir), deadline, str(result_file),
                             default_method))
    t0 = time.monotonic()
    proc.start()
    timed_out = True
    try:
        proc.join(limit_s)
        timed_out = proc.is_alive()
    finally:
        if proc.is_alive():
            end_process_group(proc)
    seconds = round(time.monotonic() - t0, 1)
    if result_file.is_file():
        return {**json.loads(result_file.read_text()), "seconds": seconds}
    if timed_out:
        return {"status": "timeout", "seconds": seconds,
                "error": f"killed after {limit_s:.0f} s (the part's time limit)"}
    return {"status": "failed", "seconds": seconds,
            "error": f"the part's process ended with exit status {proc.exitcode} and no result"}


def _part_main(part: str, plan: CheckPlan, workdir: str, deadline: float, result_file: str,
               start_method: str) -> None:
    """Entry point of a part's process: own session, logging, run, write the result JSON."""
    os.setsid()
    # The jobs' own worker processes start with the platform's default method, as for a user.
    multiprocessing.set_start_method(start_method, force=True)

    setup_logging()
    try:
        module, name = PART_FUNCTIONS[part]
        check = getattr(importlib.import_module(f"lesionseg.gpucheck.{module}"), name)
        result = {"status": "ok", **check(plan, Path(workdir), deadline)}
    except Exception as e:  # noqa: BLE001 (recorded in the JSON; the next part runs)
        log.error("gpucheck %s failed: %s: %s", part, type(e).__name__, e)
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()[-3000:]}
    atomic_write_text(result_file, json.dumps(result, indent=1, default=str))
