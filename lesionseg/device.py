"""The device side of a forward pass, shared by training and inference: mixed precision and
the uint8 batch → float, channels_last model input."""

from __future__ import annotations

import contextlib

import torch

from lesionseg.data.transforms import to_float_images


def precision_dtype(precision: str) -> torch.dtype | None:
    """A mixed-precision setting (`no`, `bf16`, `fp16`) as the autocast dtype (None: fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast to `dtype` on the device's type; None: full precision (no autocast)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_model_input(images: torch.Tensor, device: torch.device,
                   channels_last: bool = True) -> torch.Tensor:
    """A uint8 (or float) image batch on `device` as float32 in [0, 1], channels_last if asked.
    Batches travel as uint8 (a quarter of the bytes); the conversion happens on the device."""
    x = to_float_images(images.to(device, non_blocking=True))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
