"""The check's plan: the parts and their order, the targets, the sizes, repeats and time
limits of a run (`plan_for`: full, --quick, or tiny on the CPU)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lesionseg.errors import UserError

SCHEMA = "lesionseg-gpucheck/1"
ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = ROOT / "jobs" / "train.py"
# The order parts run in: the cheap and most wanted first, torch.compile (slowest, likeliest
# to fail) last, so that it can only eat time nothing else needed.
PARTS = ("environment", "train_step", "pinned_memory", "inference", "train_job", "ddp",
         "compile")
# Ratio -> (comparison, target, explanation); judged on CUDA only (issue 18: on a small CPU
# host the job's CPU stages share the cores with the forward).
TARGETS: dict[str, tuple[str, float, str]] = {
    "infer_speedup_vs_naive": (">=", 3.0, "batch job images/s ÷ naive per-image loop images/s"),
    "infer_over_pure_forward": ("<=", 1.3, "batch job loop time ÷ pure batched forward time"),
}
CUDA_ONLY = {"pinned_memory": "CUDA only (host-to-device copies)",
             "ddp": "CUDA only (DDP over NCCL)"}
PRECISION_NAMES = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}  # setting -> what it computes in
KILL_GRACE_S = 5.0  # a part's subprocesses get at most this much less time than the part


class GpuCheckError(UserError):
    """The check cannot run as asked (no CUDA, bad option); the message says what to do."""


@dataclass(frozen=True)
class CheckPlan:
    """Sizes, repeats and time limits of one run (`plan_for` gives the presets)."""

    device: str = "cuda"  # cuda or cpu
    image_size: int = 384  # side of the training-step and inference images (train_job: the demo's)
    batch_size: int = 16  # images per training step and per inference forward
    warmup: int = 5  # untimed training steps / copies before the timed ones
    steps: int = 30  # timed training steps per variant (figures are medians)
    copies: int = 30  # timed host-to-device copies per memory kind
    infer_images: int = 48  # full-size synthetic images of the inference part
    infer_sides: tuple[int, int] = (1024, 4288)  # their longest sides, from … to (ISIC's largest)
    infer_repeats: int = 3  # timed rounds of the inference variants, after one warm-up round
    train_overrides: tuple[str, ...] = ("optim.epochs=8",)  # of each training run (demo data)
    ddp_steps: int = 40  # optimizer steps of the DDP run
    budget_s: float = 1200.0  # the whole run; a part gets at most what is left of it
    timeouts_s: tuple[tuple[str, float], ...] = (  # per part: at most this many seconds
        ("environment", 60), ("train_step", 300), ("pinned_memory", 60), ("inference", 420),
        ("train_job", 600), ("ddp", 300), ("compile", 420))

    def timeout(self, part: str) -> float:
        return dict(self.timeouts_s)[part]

    @property
    def precisions(self) -> tuple[str, ...]:
        """Autocast settings checked (config names): CUDA has fp16 and bf16; a CPU has no fast
        fp16, so there: no and bf16."""
        return ("fp16", "bf16") if self.device == "cuda" else ("no", "bf16")


def plan_for(device: str, quick: bool, budget_s: float | None = None) -> CheckPlan:
    """The full CUDA plan, the --quick one (about 6 minutes on one H200), or the tiny CPU
    one (the same code paths in about a minute on 2 cores; --quick changes nothing there)."""
    plan = CheckPlan(device=device)
    if device == "cpu":
        plan = dataclasses.replace(
            plan, image_size=64, batch_size=2, warmup=1, steps=3, copies=3, infer_images=3,
            infer_sides=(256, 640), infer_repeats=1,
            train_overrides=("data.demo_cases=12", "data.image_size=64", "data.batch_size=2",
                             "data.num_workers=0", "optim.max_steps=3", "train.num_threads=1"),
            ddp_steps=3, budget_s=300.0,
            timeouts_s=(("environment", 60), ("train_step", 120), ("pinned_memory", 30),
                        ("inference", 150), ("train_job", 150), ("ddp", 60),
                        ("compile", 20)))  # inductor on 2 CPU cores takes minutes: time-boxed
    elif quick:
        plan = dataclasses.replace(
            plan, warmup=3, steps=10, copies=10, infer_images=16, infer_repeats=2,
            train_overrides=("optim.epochs=3",), ddp_steps=20, budget_s=420.0,
            timeouts_s=(("environment", 60), ("train_step", 120), ("pinned_memory", 45),
                        ("inference", 180), ("train_job", 200), ("ddp", 150),
                        ("compile", 180)))
    return dataclasses.replace(plan, budget_s=budget_s) if budget_s else plan
