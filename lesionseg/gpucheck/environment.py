"""Part `environment`: library versions, device, capability, GPU count and memory, bf16,
cuDNN and NCCL, the host CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lesionseg.bench.measure import machine_info
from lesionseg.gpucheck.plan import CheckPlan
from lesionseg.inference import cpu_has_bf16


def check_environment(plan: CheckPlan, workdir: Path, deadline: float) -> dict[str, Any]:
    """Library versions, device, capability, GPU count and memory, bf16, cuDNN, host CPU."""
    import accelerate
    import torch
    import torchvision


    env: dict[str, Any] = {
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "accelerate": accelerate.__version__, "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        # TF32 in fp32 convolutions / matmuls (torch's defaults: on / off): the fp32 figures
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "host": machine_info(0)}
    if plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update({"device_name": props.name, "capability": f"{props.major}.{props.minor}",
                    "gpu_count": torch.cuda.device_count(),
                    "memory_gb": round(props.total_memory / 2**30, 1),
                    "multiprocessors": props.multi_processor_count,
                    "bf16_supported": torch.cuda.is_bf16_supported(),
                    "nccl": _nccl_version()})
    else:
        env.update({"device_name": "cpu", "capability": None, "gpu_count": 0,
                    "memory_gb": env["host"]["memory_gb"], "bf16_supported": cpu_has_bf16()})
    return env


def _nccl_version() -> str | None:
    """NCCL's version as torch reports it (None where this build has no NCCL)."""
    import torch

    try:
        version = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
