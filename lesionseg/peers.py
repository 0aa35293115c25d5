"""The peer model of the benchmarks: segmentation_models_pytorch's U-Net with the same encoder.

Used by the train case (step time, equal-time race) and the accuracy case (the plain script
with smp's model). segmentation-models-pytorch is the optional [bench] extra.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lesionseg.model import IMAGENET_MEAN, IMAGENET_STD


def peer_available() -> bool:
    """Whether segmentation-models-pytorch can be imported."""
    return importlib.util.find_spec("segmentation_models_pytorch") is not None


def build_peer() -> Any:
    """smp.Unet("mobilenet_v2", encoder_weights=None) behind the same ImageNet normalization
    as ours, with the encoder/decoder parameter split our optimizer builder expects."""
    import segmentation_models_pytorch as smp  # optional: the [bench] extra

    class PeerUnet(nn.Module):
        """[0, 1] RGB → normalize → smp U-Net → logits (like MobileNetEncoderDecoder)."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
            self.net = smp.Unet("mobilenet_v2", encoder_weights=None, classes=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net((x - self.mean) / self.std)

        def encoder_parameters(self) -> Iterator[nn.Parameter]:
            return self.net.encoder.parameters()

        def decoder_parameters(self) -> Iterator[nn.Parameter]:
            yield from self.net.decoder.parameters()
            yield from self.net.segmentation_head.parameters()

    return PeerUnet()
