"""Who does what: this job's part of the inputs (flags or a Slurm array), the process state
(Accelerate), the device each process runs on and how many processes share the host."""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from lesionseg.infer import InferenceError


def job_part(num_shards: int | None, shard_index: int | None,
             env: dict[str, str] | None = None) -> tuple[int, int]:
    """(N, I) from the flags, else from a Slurm array (`--array=0-9:2` gives index 0..4)."""
    env = os.environ if env is None else env
    if num_shards is None:
        num_shards = int(env.get("SLURM_ARRAY_TASK_COUNT", "1"))
    if shard_index is None:
        if "SLURM_ARRAY_TASK_ID" in env and num_shards > 1:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            step = int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
            shard_index = (int(env["SLURM_ARRAY_TASK_ID"]) - first) // step
        else:
            shard_index = 0
    if num_shards < 1:
        raise InferenceError(f"--num-shards must be at least 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise InferenceError(f"--shard-index {shard_index} is outside 0..{num_shards - 1}")
    return num_shards, shard_index


def distributed_state(device: str = "auto") -> Any:
    """Accelerate's process state (1 process under plain python).

    PartialState, unlike Accelerator, ignores ACCELERATE_USE_CPU: without `cpu=True` a CPU
    launch of N processes would give N processes that each think they are alone (and do
    all the work). So: CPU when asked (infer.device=cpu or the launcher), or when there is
    no CUDA."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InferenceError(f"--device {device}: no CUDA device is visible here; use "
                             "--device cpu (or auto)")
    cpu = device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def local_processes(state: Any) -> int:
    """How many processes of this job share this host's cores: the launcher's local world
    size (torchrun, accelerate launch), else every process of a one-host CPU launch, else 1."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and int(local) > 0:
        return int(local)
    return max(1, state.num_processes) if state.device.type == "cpu" else 1


def run_device(setting: str, state: Any) -> torch.device:
    """The device this process runs on: the launcher's (cuda:LOCAL_RANK, or cpu), except that
    one process may be sent to a chosen GPU with infer.device=cuda:N."""
    if ":" not in setting:
        return state.device
    if state.num_processes > 1:
        raise InferenceError(f"--device {setting}: one GPU per process is chosen by the "
                             "launcher; use --device cuda with several processes")
    index = int(setting.split(":")[1])
    if index >= torch.cuda.device_count():
        raise InferenceError(f"--device {setting}: only {torch.cuda.device_count()} CUDA "
                             "device(s) visible")
    return torch.device(setting)
