"""Parts `train_job` and `ddp`: `jobs/train.py` on the demo data as a user runs it, once per
precision, and over every GPU with DDP over NCCL; read back from its log and metrics."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lesionseg.bench.measure import rounded
from lesionseg.gpucheck.common import rounded_median
from lesionseg.gpucheck.plan import KILL_GRACE_S, PRECISION_NAMES, TRAIN_SCRIPT, CheckPlan
from lesionseg.workers import kill_session

log = logging.getLogger("lesionseg.gpucheck")


def run_command(cmd: list[str], cwd: Path, log_path: Path, timeout_s: float) -> dict[str, Any]:
    """Run `cmd` in its own session, output to `log_path`; past `timeout_s` the session is
    killed (accelerate's ranks and DataLoader workers with it, which subprocess.run's timeout
    would leave running). Returns exit status (None on timeout), wall seconds and the log."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            kill_session(proc.pid)
            proc.wait()
            rc = None
        finally:
            if proc.poll() is None:
                kill_session(proc.pid)
                proc.wait()
    return {"exit_status": rc, "wall_s": round(time.monotonic() - t0, 1),
            "log": log_path.read_text(errors="replace")}


LOSS_RE = re.compile(r"step (\d+): loss=(\S+)")
STEP_TIME_RE = re.compile(r"step_time=(\S+)")
WORLD_RE = re.compile(r"world size (\d+)")


def read_train_run(ran: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """What a finished training run shows: the final val Dice (metrics.jsonl), whether every
    logged loss was finite and no step was skipped, the median logged step time."""
    text = ran.pop("log")
    losses = [float(v) for _, v in LOSS_RE.findall(text)]
    step_times = [float(v) for v in STEP_TIME_RE.findall(text)]
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    dice = json.loads(lines[-1])["dice"] if lines else None
    world = WORLD_RE.search(text)
    finite = bool(losses) and all(map(math.isfinite, losses)) and "non-finite" not in text
    result = {**ran, "ok": ran["exit_status"] == 0 and dice is not None,
              "final_val_dice": rounded(dice), "loss_finite": finite,
              "logged_losses": len(losses), "first_loss": rounded(losses[0]) if losses else None,
              "last_loss": rounded(losses[-1]) if losses else None,
              "step_time_s": rounded_median(step_times[1:] or step_times),
              "world_size": int(world.group(1)) if world else None}
    if not result["ok"]:
        result["log_tail"] = text[-3000:]
    return result


def train_overrides(plan: CheckPlan, precision: str, run: str) -> list[str]:
    """The training job on the built-in demo data (data.shards unset), no tracking, every
    step's scalars logged (the finite-loss check reads them)."""
    return [*plan.train_overrides, f"train.mixed_precision={precision}",
            "tracking.backend=none", "train.log_every_steps=1", f"train.output_dir=runs/{run}"]


def check_train_job(plan: CheckPlan, workdir: Path, deadline: float) -> dict[str, Any]:
    """`python jobs/train.py` on the demo data, once per precision, as a user runs it."""
    cwd = workdir / "train-job"  # the demo data is built (once) under its shards/demo
    cwd.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Any] = {}
    for k, precision in enumerate(plan.precisions):
        left = deadline - time.monotonic() - KILL_GRACE_S
        timeout = left / (len(plan.precisions) - k)
        log.info("train job %s: at most %.0f s", PRECISION_NAMES[precision], timeout)
        ran = run_command([sys.executable, str(TRAIN_SCRIPT),
                           *train_overrides(plan, precision, precision)],
                          cwd, cwd / f"train-{precision}.log", timeout)
        runs[PRECISION_NAMES[precision]] = {"setting": f"train.mixed_precision={precision}",
                                            **read_train_run(ran, cwd / "runs" / precision)}
    return {"overrides": list(plan.train_overrides), "runs": runs,
            "all_ok": all(r["ok"] and r["loss_finite"] for r in runs.values())}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_command(plan: CheckPlan, processes: int, port: int) -> list[str]:
    """`accelerate launch --multi_gpu` of the training job (bf16) over `processes` ranks."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "bf16",
            "--dynamo_backend", "no", "--main_process_port", str(port), str(TRAIN_SCRIPT),
            *train_overrides(plan, "bf16", "ddp"), f"optim.max_steps={plan.ddp_steps}"]


def check_ddp(plan: CheckPlan, workdir: Path, deadline: float) -> dict[str, Any]:
    """The training job over every GPU, DDP over NCCL (the demo data of train_job, reused)."""
    import torch

    gpus = torch.cuda.device_count()  # at least 2 (not_applicable)
    cwd = workdir / "train-job"
    cwd.mkdir(parents=True, exist_ok=True)
    ran = run_command(ddp_command(plan, gpus, _free_port()), cwd, cwd / "train-ddp.log",
                      deadline - time.monotonic() - KILL_GRACE_S)
    result = read_train_run(ran, cwd / "runs" / "ddp")
    return {"processes": gpus, "steps": plan.ddp_steps, **result,
            "ok": result["ok"] and result["world_size"] == gpus}
