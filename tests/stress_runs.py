"""Stress: N consecutive short 2-rank training runs with W&B offline, counting hangs.

Not collected by pytest (run it by hand; it takes about a minute per run on 2 cores):

    python tests/stress_runs.py --runs 30 --lock /tmp/cpu.lock

Each run is `accelerate launch --cpu --num_processes 2 jobs/train.py …` on a small synthetic
shard set (built once under --work), with two DataLoader workers per rank started every
epoch and validation (data.cache=false), after W&B's threads are running: the set-up in which
a worker forked from a threaded process hung (CPython gh-112275). A run still going after
--timeout seconds is a hang: its whole process tree is killed and counted. --repo runs
another checkout's jobs/train.py (e.g. an older commit, for a before/after). --lock takes an
flock on that file around each run (not around the whole series), so other jobs of a shared
machine interleave. Prints one JSON line per run and a summary line.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext, suppress
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def build_shards(work: Path) -> Path:
    """A small packed set (48 cases, 12 of them val), built once."""
    from lesionseg.config import PackConfig
    from lesionseg.data.shards import pack
    from lesionseg.data.synthetic import write_isic_dataset

    out = work / "shards"
    if not (out / "manifest.json").is_file():
        isic = write_isic_dataset(work / "isic", 48, 0, seed=0, min_side=96, max_side=256)
        pack([isic], out, PackConfig(val_fraction=0.25, max_side=192, shard_max_samples=6,
                                     workers=1), progress=False)
    return out


def kill_tree(proc: psutil.Popen) -> None:
    """The launcher and everything under it (ranks may sit in process groups of their own)."""
    procs = [proc]
    with suppress(psutil.NoSuchProcess):
        procs += proc.children(recursive=True)
    for p in procs:
        with suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


def one_run(repo: Path, shards: Path, out: Path, timeout: float, extra: list[str]) -> dict:
    """One 2-rank run; its status, wall time and whether it hung."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--cpu",
           "--num_processes", "2", str(repo / "jobs" / "train.py"), f"data.shards={shards}",
           "data.image_size=64", "data.batch_size=4", "data.num_workers=2", "data.cache=false",
           "model.encoder_weights=null", "optim.epochs=3", "train.num_threads=1",
           "train.tune_postprocess=false", "tracking.backend=wandb", f"train.output_dir={out}",
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": str(repo), "PYTHONUNBUFFERED": "1"}
    log = out.with_suffix(".log")
    started = time.monotonic()
    with open(log, "w") as f:
        proc = psutil.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                            start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
            hung = False
        except psutil.TimeoutExpired:
            kill_tree(proc)
            code, hung = None, True
    return {"status": code, "hung": hung, "seconds": round(time.monotonic() - started, 1),
            "log": str(log)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a run is a hang")
    p.add_argument("--repo", type=Path, default=ROOT, help="checkout whose jobs/train.py runs")
    p.add_argument("--work", type=Path, default=Path("/tmp/lesionseg-stress"))
    p.add_argument("--lock", type=Path, default=None, help="flock this file around each run")
    p.add_argument("--pause", type=float, default=5.0, help="seconds between runs under --lock")
    p.add_argument("extra", nargs="*", help="more key=value overrides for every run")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    shards = build_shards(args.work)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results = []
    for i in range(args.runs):
        with open(args.lock, "a") if args.lock else nullcontext() as lock:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            result = one_run(args.repo.resolve(), shards, args.work / f"run-{i}", args.timeout,
                             args.extra)
        results.append(result)
        print(json.dumps({"run": i, **result}), flush=True)
        if lock is not None:
            time.sleep(args.pause)  # flock is not fair: let the other jobs waiting on it in
    done = [r for r in results if not r["hung"]]
    summary = {"runs": len(results), "hangs": sum(r["hung"] for r in results),
               "failed": sum(r["status"] not in (0, None) for r in results),
               "mean_seconds": round(sum(r["seconds"] for r in done) / max(1, len(done)), 1),
               "repo": str(args.repo)}
    print(json.dumps(summary), flush=True)
    return 1 if summary["hangs"] or summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
