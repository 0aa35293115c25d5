"""The prepared GPU checks (lesionseg/gpucheck.py): the whole run with --device cpu as a user
runs it (tiny sizes, CUDA-only parts skipped), the one-line error without CUDA, the time box
that kills a part and goes on, and the pure helpers. The CUDA branches need a GPU host."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lesionseg.gpucheck import (
    PARTS,
    _free_port,
    _summarize,
    ddp_command,
    not_applicable,
    plan_for,
    read_train_run,
    run_command,
    run_part,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "jobs" / "gpucheck.py"


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "PYTHONUNBUFFERED": "1", **extra}


def _positive(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_cpu_run_measures_every_cpu_part_and_skips_the_cuda_ones(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick",
                        "--out", str(out), "--workdir", str(tmp_path / "work")],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    parts = doc["parts"]
    assert list(parts) == list(PARTS) and doc["device"] == "cpu"

    env = parts["environment"]
    assert env["status"] == "ok" and env["gpu_count"] == 0 and env["torch"]

    steps = parts["train_step"]["variants"]
    assert set(steps) == {"fp32 contiguous", "fp32 channels_last", "bf16 contiguous",
                          "bf16 channels_last"}
    for name, v in steps.items():
        assert _positive(v["step_s"]) and _positive(v["images_per_s"]), name
        assert v["loss_finite"] and v["peak_memory_mb"] is None, name

    infer = parts["inference"]
    assert infer["status"] == "ok" and set(infer["precisions"]) == {"fp32", "bf16"}
    for name, p in infer["precisions"].items():
        for key in ("job_loop_s", "job_wall_s", "naive_s", "forward_s", "job_images_per_s",
                    "infer_speedup_vs_naive", "infer_over_pure_forward"):
            assert _positive(p[key]), (name, key)
    assert infer["threads"]["torch_threads"] >= 1 and infer["threads"]["cores"] >= 1
    assert doc["infer_speedup_vs_naive"] == infer["precisions"]["fp32"]["infer_speedup_vs_naive"]
    assert all(t["met"] is None for t in doc["targets"].values())  # judged on CUDA only

    runs = parts["train_job"]["runs"]
    assert set(runs) == {"fp32", "bf16"}
    for name, run in runs.items():
        assert run["exit_status"] == 0 and run["loss_finite"] and run["world_size"] == 1, name
        assert isinstance(run["final_val_dice"], float) and 0 <= run["final_val_dice"] <= 1
        assert _positive(run["wall_s"]) and _positive(run["step_time_s"]), name

    for part in ("pinned_memory", "ddp"):
        assert parts[part]["status"] == "skipped" and "CUDA only" in parts[part]["reason"]
    # Inductor on a small CPU takes minutes: the 20 s time box kills it and the run goes on
    # (on a fast machine it may finish: then it has its figures).
    compiled = parts["compile"]
    assert compiled["status"] in ("ok", "timeout"), compiled
    assert (compiled["status"] == "ok") == ("compile" not in doc["failed_parts"])
    assert "train_step" in r.stdout and f"results written to {out}" in r.stdout
    assert "gpucheck inference: starting" in r.stderr  # progress lines on stderr


def test_without_cuda_it_is_a_one_line_error_with_status_2(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    for device in ([], ["--device", "cuda"]):
        r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *device],
                           env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "no CUDA device" in lines[0] and "--device cpu" in lines[0]
        assert not out.exists()


def test_a_part_past_its_time_limit_is_killed_and_recorded(tmp_path: Path) -> None:
    """torch.compile cannot finish within 3 s anywhere (a fresh process imports torch first)."""
    result = run_part("compile", plan_for("cpu", quick=True), tmp_path, limit_s=3)
    assert result["status"] == "timeout" and "3 s" in result["error"]
    assert result["seconds"] < 30


def test_train_run_with_a_nan_loss_is_not_finite(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "dice": 0.5}\n{"step": 4, "dice": 0.25}\n')
    log = ("training: world size 2 (MULTI_GPU)\nstep 1: loss=2.4 step_time=0.5\n"
           "step 2: loss=nan step_time=0.1\nstep 3: loss=1.9 step_time=0.3\n")
    run = read_train_run({"exit_status": 0, "wall_s": 9.0, "log": log}, tmp_path)
    assert run["ok"] and not run["loss_finite"] and run["final_val_dice"] == 0.25
    assert run["world_size"] == 2 and run["step_time_s"] == 0.2  # first (warm-up) step left out
    run = read_train_run({"exit_status": 1, "wall_s": 1.0, "log": "Traceback"}, tmp_path / "x")
    assert not run["ok"] and run["final_val_dice"] is None and "Traceback" in run["log_tail"]


def test_targets_are_judged_on_cuda_only() -> None:
    inference = {"status": "ok", "infer_speedup_vs_naive": 3.5, "infer_over_pure_forward": 1.4}
    doc = {"device": "cuda", "parts": {"inference": inference,
                                       "compile": {"status": "timeout"}}}
    _summarize(doc)
    assert doc["targets"]["infer_speedup_vs_naive"]["met"] is True
    assert doc["targets"]["infer_over_pure_forward"]["met"] is False
    assert doc["failed_parts"] == ["compile"] and doc["compile_speedup_vs_eager"] is None
    doc["device"] = "cpu"
    _summarize(doc)
    assert doc["targets"]["infer_speedup_vs_naive"]["met"] is None


def test_budget_overrides_the_plan_and_quick_is_shorter() -> None:
    full, quick = plan_for("cuda", quick=False), plan_for("cuda", quick=True)
    assert quick.budget_s < full.budget_s and quick.steps < full.steps
    assert all(quick.timeout(p) <= full.timeout(p) for p in PARTS)
    assert plan_for("cuda", quick=True, budget_s=100).budget_s == 100
    assert plan_for("cpu", quick=False).precisions == ("no", "bf16")
    assert full.precisions == ("fp16", "bf16") and full.batch_size == 16


@pytest.mark.slow
def test_ddp_launch_line_runs_two_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ddp part's `accelerate launch` line as two gloo ranks on the CPU: on a host with
    two GPUs the same line runs over NCCL."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    plan = plan_for("cpu", quick=True)
    ran = run_command(ddp_command(plan, 2, _free_port()), tmp_path, tmp_path / "ddp.log", 240)
    run = read_train_run(ran, tmp_path / "runs" / "ddp")
    assert run["ok"] and run["world_size"] == 2 and run["loss_finite"], run.get("log_tail")


def test_cuda_only_parts_and_one_gpu_ddp_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    cpu, cuda = plan_for("cpu", quick=True), plan_for("cuda", quick=True)
    assert "CUDA only" in not_applicable("pinned_memory", cpu)
    assert "CUDA only" in not_applicable("ddp", cpu)
    assert not_applicable("inference", cpu) is None and not_applicable("compile", cpu) is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert not_applicable("ddp", cuda).startswith("1 GPU")
    assert not_applicable("pinned_memory", cuda) is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert not_applicable("ddp", cuda) is None
