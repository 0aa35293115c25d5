"""The device side of a forward pass, shared by training and inference: mixed precision and
the uint8 batch → float, channels_last model input."""

from __future__ import annotations

import contextlib

import torch

from lesionseg.data.transforms import to_float_images


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """`no`: full precision; `bf16`/`fp16`: torch.autocast on the device's type."""
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_model_input(images: torch.Tensor, device: torch.device,
                   channels_last: bool = True) -> torch.Tensor:
    """A uint8 (or float) image batch on `device` as float32 in [0, 1], channels_last if asked.
    Batches travel as uint8 (a quarter of the bytes); the conversion happens on the device."""
    x = to_float_images(images.to(device, non_blocking=True))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
