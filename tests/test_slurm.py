"""slurm/train.sh and slurm/infer.sh on a real (local, one-node) Slurm cluster, CPU mode, tiny data.

CI starts the cluster first (`bash tests/slurm/local-slurm.sh start`, see .ci/run); without a
running cluster these tests skip and say why. Every wait is bounded, and every job a test
submitted is cancelled when it ends, whatever happened.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TRAIN_SH = REPO / "slurm" / "train.sh"
INFER_SH = REPO / "slurm" / "infer.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
CPU_JOB = ["--nodes=1", "--gpus-per-node=0"]  # the scripts' defaults ask for GPUs and 2 nodes

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(420)]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """A Slurm client command with a bounded wait; output captured as text."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, **kwargs)


def cluster_problem() -> str | None:
    """Why the local cluster cannot run jobs now, or None when it can."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm is not installed (no sinfo/sbatch); run `bash tests/slurm/local-slurm.sh start`"
    try:
        states = _run(["sinfo", "-h", "-o", "%t"])
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s (slurmctld down?)"
    if states.returncode != 0:
        return (f"the Slurm cluster is down (sinfo: {states.stderr.strip() or states.returncode}); "
                "run `bash tests/slurm/local-slurm.sh start`")
    usable = [s for s in states.stdout.split() if s.rstrip("*") in ("idle", "mix", "alloc", "comp")]
    if not usable:
        return (f"no usable Slurm node (sinfo states: {states.stdout.split() or 'none'}); "
                "run `bash tests/slurm/local-slurm.sh start`")
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    """Skip this module, saying why, unless the local cluster can run jobs."""
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)


class Jobs:
    """Submits jobs from one working folder and cancels every one of them at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ids: list[str] = []
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHON": sys.executable, "LESIONSEG_ROOT": str(REPO),
                    "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Submit; return the job id."""
        done = _run(["sbatch", "--parsable", *args], cwd=self.workdir, env={**self.env, **(env or {})})
        assert done.returncode == 0, f"sbatch {' '.join(args)} failed: {done.stderr.strip()}"
        job = done.stdout.strip().split(";")[0]
        self.ids.append(job)
        return job

    def cancel_all(self) -> None:
        """scancel every job submitted through this helper (finished ones are ignored)."""
        if self.ids:
            subprocess.run(["scancel", *self.ids], capture_output=True, timeout=30)

    def logs(self) -> str:
        """Every log file of this folder, for failure messages."""
        parts = []
        for path in sorted((self.workdir / "logs").iterdir()):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')}")
        return "\n".join(parts)


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[Jobs]:
    """A Jobs helper in this test's folder; its jobs are cancelled at teardown."""
    j = Jobs(tmp_path)
    try:
        yield j
    finally:
        j.cancel_all()


def job_records(job: str) -> list[dict[str, str]]:
    """`scontrol show job -o` as dicts, one per job (an array job gives one per task)."""
    done = _run(["scontrol", "show", "job", "-o", job])
    if done.returncode != 0:
        return []
    records = []
    for line in done.stdout.splitlines():
        records.append(dict(re.findall(r"(\w+)=(\S*)", line)))
    return records


def wait_done(jobs: Jobs, job: str, timeout: float, release_requeued: bool = False) -> list[dict]:
    """Poll until every task of `job` reached a final state; return their records.

    A requeued job waits ~2 minutes (BeginTime) before it may start again; if asked, move its
    start to 3 s from now, once per restart. Not `now`: a restart in the same second as the
    requeue's kill is refused by slurmd ("Job credential revoked") and the job FAILS."""
    deadline = time.monotonic() + timeout
    released: set[tuple[str, str]] = set()
    while time.monotonic() < deadline:
        records = job_records(job)
        if records and all(r.get("JobState") in FINAL_STATES for r in records):
            return records
        for r in records:
            key = (r.get("JobId", ""), r.get("Restarts", ""))
            if (release_requeued and r.get("JobState") == "PENDING"
                    and r.get("Reason") == "BeginTime" and key not in released):
                _run(["scontrol", "update", f"JobId={key[0]}", "StartTime=now+3"])
                released.add(key)
        time.sleep(0.5)
    pytest.fail(f"job {job} not finished after {timeout:.0f} s: {job_records(job)}\n{jobs.logs()}")


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- inference


@pytest.fixture(scope="module")
def infer_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Six synthetic ISIC cases and a random-weight checkpoint whose masks are neither empty
    nor full (so that equal masks mean something)."""
    from lesionseg.checkpoint import save_weights
    from lesionseg.config import load_config
    from lesionseg.data.images import load_image
    from lesionseg.data.synthetic import write_isic_dataset
    from lesionseg.data.transforms import eval_transform, stack_images, to_float_images
    from lesionseg.model import MobileNetEncoderDecoder

    root = tmp_path_factory.mktemp("slurm-infer")
    isic = write_isic_dataset(root / "isic", 6, seed=5, min_side=48, max_side=96)
    torch.manual_seed(0)
    model = MobileNetEncoderDecoder().eval()
    images = sorted(isic.rglob("*.jpg"))
    batch = to_float_images(stack_images([eval_transform(load_image(p.read_bytes())[0], None, 64)[0]
                                          for p in images]))
    with torch.no_grad():
        model.decoder.head.bias -= model(batch).median()
    cfg = load_config(None, ["model.encoder_weights=null", "data.image_size=64"])
    return {"isic": isic, "ckpt": save_weights(root / "best.pt", model.state_dict(), cfg)}


def test_infer_array_plus_merge_equals_single_run(infer_data: dict[str, Path], jobs: Jobs) -> None:
    common = ["--checkpoint", str(infer_data["ckpt"]), "--input", str(infer_data["isic"]),
              "--splits", "train,test", "--workers", "0", "--batch-size", "2"]
    single, parts = jobs.workdir / "single", jobs.workdir / "parts"
    # The reference: one plain run, outside Slurm.
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "infer.py"), *common,
                           "--out", str(single)], capture_output=True, text=True, timeout=300,
                          env=jobs.env)
    assert done.returncode == 0, done.stderr[-3000:]

    # The one command: a 2-task array and a merge job after it.
    submit = subprocess.run(
        ["bash", str(INFER_SH), "--submit", "2", "--gpus=0", "--cpus-per-task=1", "--",
         *common, "--out", str(parts)],
        cwd=jobs.workdir, env=jobs.env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    array_id, merge_id = submit.stdout.split()
    jobs.ids += [array_id, merge_id]
    tasks = wait_done(jobs, array_id, timeout=180)
    assert len(tasks) == 2 and all(t["JobState"] == "COMPLETED" for t in tasks), jobs.logs()
    merged = wait_done(jobs, merge_id, timeout=60)
    assert merged[0]["JobState"] == "COMPLETED", jobs.logs()
    # afterok: the merge started only once both tasks had ended (ISO times compare as text).
    assert merged[0]["StartTime"] >= max(t["EndTime"] for t in tasks)

    # Each task ran its own part (0 and 1 of 2), and the merge wrote every output.
    logs = jobs.logs()
    assert "--num-shards 2 --shard-index 0" in logs and "--num-shards 2 --shard-index 1" in logs
    for name in ("metrics.csv", "errors.csv", "summary.json", "report.html"):
        assert (parts / name).is_file(), f"{name} missing\n{logs}"
    assert (parts / "metrics.csv").read_text() == (single / "metrics.csv").read_text()
    assert (parts / "errors.csv").read_text() == (single / "errors.csv").read_text()
    one = {p.name: np.asarray(Image.open(p)) for p in sorted((single / "masks").iterdir())}
    two = {p.name: np.asarray(Image.open(p)) for p in sorted((parts / "masks").iterdir())}
    assert one.keys() == two.keys() and len(one) == 6
    assert all(np.array_equal(one[k], two[k]) for k in one)
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (single, parts))
    assert s1["means"] == s2["means"] and s2["num_shards"] == 2 and s2["complete"]
    assert len(read_csv(parts / "metrics.csv")) == 6


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 tiny synthetic cases packed 3 per shard (3 train shards, 2 val shards)."""
    from lesionseg.config import PackConfig
    from lesionseg.data.shards import pack
    from lesionseg.data.synthetic import write_isic_dataset

    root = tmp_path_factory.mktemp("slurm-train")
    isic = write_isic_dataset(root / "isic", 12, seed=1, min_side=48, max_side=96)
    pack([isic], root / "shards", PackConfig(max_side=0, workers=1, val_fraction=0.25,
                                             shard_max_samples=3), progress=False)
    return root / "shards"


def tiny_train_args(shards: Path, max_steps: int) -> list[str]:
    """key=value arguments of a training run that takes seconds on one CPU."""
    return [f"data.shards={shards}", "data.image_size=32", "data.batch_size=2",
            "data.num_workers=0", "model.encoder_weights=null", f"optim.max_steps={max_steps}",
            "optim.steps_per_epoch=1000", "optim.warmup_steps=0", "tracking.backend=none",
            "train.log_every_steps=1", "train.num_threads=1"]


def logged_steps(text: str) -> list[int]:
    """Optimizer steps of the trainer's `step N: loss=…` lines, in log order."""
    return [int(m) for m in re.findall(r"lesionseg\.training: step (\d+): loss=", text)]


def test_train_job_finishes_and_writes_best(train_shards: Path, jobs: Jobs) -> None:
    from lesionseg.checkpoint import load_weights

    name = f"slurm-train-{os.getpid()}"
    job = jobs.sbatch(f"--job-name={name}", *CPU_JOB, "--cpus-per-task=1", str(TRAIN_SH),
                      *tiny_train_args(train_shards, 6),
                      env={"OUTPUT_ROOT": str(jobs.workdir / "runs")})
    record = wait_done(jobs, job, timeout=150)[0]
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", jobs.logs()
    run = jobs.workdir / "runs" / name  # keyed by the job name
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file(), jobs.logs()
    _, cfg, meta = load_weights(run / "last.pt")
    assert meta["step"] == 6 and cfg.train.output_dir == str(run)
    logs = jobs.logs()
    assert "launch single" in logs and logged_steps(logs) == list(range(1, 7))


def test_usr1_saves_requeues_and_resumes(train_shards: Path, jobs: Jobs) -> None:
    """Two CPU ranks through `accelerate launch`; USR1 to the batch script mid-run."""
    from lesionseg.checkpoint import load_weights

    name, total = f"slurm-usr1-{os.getpid()}", 80
    job = jobs.sbatch(f"--job-name={name}", *CPU_JOB, "--cpus-per-task=2", str(TRAIN_SH),
                      *tiny_train_args(train_shards, total),
                      env={"OUTPUT_ROOT": str(jobs.workdir / "runs"),
                           "LESIONSEG_PROCS_PER_NODE": "2"})
    err = jobs.workdir / "logs" / f"{name}-{job}.err"
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:  # wait until it is really training, then signal
        if err.is_file() and max(logged_steps(err.read_text(errors="replace")), default=0) >= 3:
            break
        states = [r.get("JobState") for r in job_records(job)]
        assert not states or states[0] in ("PENDING", "RUNNING"), f"{states}\n{jobs.logs()}"
        time.sleep(0.2)
    else:
        pytest.fail(f"job {job} logged no training step in 150 s\n{jobs.logs()}")
    sent = _run(["scancel", "--signal=USR1", "--batch", job])
    assert sent.returncode == 0, sent.stderr

    record = wait_done(jobs, job, timeout=200, release_requeued=True)[0]
    logs = jobs.logs()
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", f"{record}\n{logs}"
    saved = re.findall(r"stop requested \(signal\): state saved at step (\d+)", logs)
    resumed = re.findall(r"resumed from \S+: epoch \d+, micro-batch \d+, step (\d+)", logs)
    assert len(saved) == 1 and resumed == saved, logs
    stop_at = int(saved[0])
    assert 3 <= stop_at < total, logs
    assert "requeueing job" in logs and "restart 1:" in logs and "launch multi" in logs
    # The step counter continues: 1..stop_at before the requeue, stop_at+1..total after it.
    assert logged_steps(logs) == list(range(1, total + 1)), logs
    _, _, meta = load_weights(jobs.workdir / "runs" / name / "last.pt")
    assert meta["step"] == total
    assert (jobs.workdir / "runs" / name / "best.pt").is_file()


def test_cv_array_trains_one_fold_per_task_and_the_last_writes_the_summary(
        train_shards: Path, jobs: Jobs) -> None:
    """`sbatch --array=0-1 slurm/train.sh data.folds=2`: task I trains fold I into
    runs/<name>/fold-I/, and whichever finishes last pools both into runs/<name>/cv/."""
    from lesionseg.checkpoint import load_weights

    name = f"slurm-cv-{os.getpid()}"
    job = jobs.sbatch(f"--job-name={name}", "--array=0-1", *CPU_JOB, "--cpus-per-task=1",
                      str(TRAIN_SH), *tiny_train_args(train_shards, 2), "data.folds=2",
                      env={"OUTPUT_ROOT": str(jobs.workdir / "runs")})
    tasks = wait_done(jobs, job, timeout=240)
    assert len(tasks) == 2 and all(t["JobState"] == "COMPLETED" for t in tasks), jobs.logs()
    run = jobs.workdir / "runs" / name
    for fold in (0, 1):
        _, cfg, meta = load_weights(run / f"fold-{fold}" / "best.pt")
        assert (cfg.data.folds, cfg.data.fold, meta["step"]) == (2, str(fold), 2)
        # Two steps from a random start learn nothing: no threshold is claimed on them
        # (tuning refuses a degenerate model); the pooled out-of-fold scores are stored.
        assert "postprocess" not in meta and meta["oof"]["pooled"], jobs.logs()
    summary = json.loads((run / "cv" / "summary.json").read_text())
    manifest = json.loads((train_shards / "manifest.json").read_text())["splits"]
    assert summary["cases"] == manifest["train"]["count"] + manifest["val"]["count"]
    assert len(read_csv(run / "cv" / "metrics.csv")) == summary["cases"]
    logs = jobs.logs()
    assert "data.fold=0" in logs and "data.fold=1" in logs


def test_array_job_without_folds_is_refused(train_shards: Path, jobs: Jobs) -> None:
    job = jobs.sbatch("--job-name=slurm-nofolds", "--array=0-1", *CPU_JOB, "--cpus-per-task=1",
                      str(TRAIN_SH), *tiny_train_args(train_shards, 2),
                      env={"OUTPUT_ROOT": str(jobs.workdir / "runs")})
    tasks = wait_done(jobs, job, timeout=60)
    assert all(t["JobState"] == "FAILED" for t in tasks)
    assert "pass data.folds=K" in jobs.logs()
