"""The run: each case in a fresh spawned process (its peak RSS its own), the results
gathered into the bench.json document."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from lesionseg.bench.measure import load_average, machine_info, peak_memory
from lesionseg.bench.plan import CASES, SCHEMA, BenchError, BenchPlan
from lesionseg.bench.table import ACCURACY_KEYS, RATIOS, target_table
from lesionseg.cli import setup_logging
from lesionseg.errors import UserError
from lesionseg.files import atomic_write_text
from lesionseg.workers import end_process_group

log = logging.getLogger(__name__)

CASE_MODULES = {case: f"lesionseg.bench.case_{case}" for case in CASES}

def run_bench(plan: BenchPlan, cases: tuple[str, ...], workdir: Path, threads: int = 0,
              quick: bool = False) -> dict[str, Any]:
    """Run each case in its own spawned process; returns the bench.json document."""
    started = time.perf_counter()
    doc: dict[str, Any] = {"schema": SCHEMA,
                           "created": datetime.datetime.now().astimezone().isoformat(
                               timespec="seconds"),
                           "quick": quick, "plan": dataclasses.asdict(plan),
                           "machine": machine_info(threads)}
    doc.update(dict.fromkeys(RATIOS))
    doc.update(dict.fromkeys(ACCURACY_KEYS))
    doc["cases"] = {}
    for case in cases:
        log.info("bench %s: starting (own process)", case)
        t0 = time.perf_counter()
        result = run_case_isolated(case, plan, workdir, threads)
        result["case_seconds"] = round(time.perf_counter() - t0, 1)
        doc["cases"][case] = result
        for name, value in result.get("ratios", {}).items():
            doc[name] = value
        for name, value in result.get("top_level", {}).items():
            doc[name] = value
        log.info("bench %s: done in %.0f s", case, result["case_seconds"])
    doc["targets"] = target_table(doc)
    doc["machine"]["load_average_end"] = load_average()
    doc["total_seconds"] = round(time.perf_counter() - started, 1)
    return doc


def run_case_isolated(case: str, plan: BenchPlan, workdir: Path, threads: int) -> dict[str, Any]:
    """Run one case in a fresh spawned process (own peak RSS, no state shared with others)."""
    result_file = workdir / f"result-{case}.json"
    result_file.unlink(missing_ok=True)
    # The jobs' own processes (DataLoader, pack and inference workers) start with the
    # platform's default method; a spawned child would otherwise inherit "spawn" for them.
    default_method = multiprocessing.get_start_method()
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_case_main, args=(CASE_MODULES[case], case, plan, str(workdir), threads,
                                                str(result_file), default_method),
                       name=f"bench-{case}")
    proc.start()
    try:
        with _sigterm_raises():
            proc.join()
    finally:
        # The case leads its own process group: whatever it started (pack pools, fork
        # servers, loader workers) ends with it, also when this wait is interrupted (Ctrl-C,
        # a test's timeout) — an orphan would hold the caller's output open for good.
        end_process_group(proc)
    if proc.exitcode != 0 or not result_file.is_file():
        raise BenchError(f"bench case {case!r} failed (exit status {proc.exitcode}); its error "
                         "is printed above")
    return json.loads(result_file.read_text())


@contextlib.contextmanager
def _sigterm_raises() -> Any:
    """While waiting for a case: SIGTERM (kill, a scheduler) ends the wait with SystemExit,
    so the case's group is ended too instead of running on as an orphan."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _case_main(module: str, case: str, plan: BenchPlan, workdir: str, threads: int, result_file: str,
               start_method: str) -> None:
    """Entry point of a case process: lead a process group, set threads, run the case, add
    peak RSS, write JSON."""
    os.setpgid(0, 0)
    multiprocessing.set_start_method(start_method, force=True)
    setup_logging()
    if threads > 0:
        torch.set_num_threads(threads)
    # Only this case's module is imported in its process, so its peak RSS is its own.
    runner = getattr(importlib.import_module(module), f"bench_{case}")
    try:
        result = runner(plan, Path(workdir))
    except UserError as e:
        log.error("bench %s: %s", case, e)
        sys.exit(2)
    result["memory"] = peak_memory()
    atomic_write_text(result_file, json.dumps(result, indent=1))
