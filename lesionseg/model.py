"""The segmentation network: a torchvision MobileNetV2 encoder and a small U-Net-style decoder.

Data flows top to bottom through three modules: `MobileNetEncoder` (skip features at strides 2,
4, 8, 16 and the deepest at 32), `CustomDecoder` (transposed-convolution upsampling, skip
concatenation, conv-BN-ReLU; a last transposed conv to the logits) and
`MobileNetEncoderDecoder`, which normalizes RGB in [0, 1] with ImageNet statistics held in a
buffer, pads to a multiple of 32 and crops the logits back.

The architecture only: pretrained encoder weights (`None`: random, `"imagenet"`, or a local
state-dict file) are read by lesionseg.weights, checkpoints by lesionseg.checkpoint.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.models import mobilenet_v2

from lesionseg.weights import load_encoder_weights

log = logging.getLogger(__name__)

# ImageNet statistics the torchvision weights were trained with (RGB, [0, 1] input).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The total stride of the encoder: inputs are padded to a multiple of it.
OUTPUT_STRIDE = 32
MIN_SIDE = 32

# Indices into `mobilenet_v2().features` whose outputs are the skips at strides 2, 4, 8, 16
# (the last block before each stride-2 block), and the deepest output at stride 32.
SKIP_INDICES = (1, 3, 6, 13)
ENCODER_CHANNELS = (16, 24, 32, 96, 1280)  # strides 2, 4, 8, 16, 32

DEFAULT_DECODER_CHANNELS = (96, 64, 48, 32)  # strides 16, 8, 4, 2
SEPARABLE_FROM_STAGE = 2
SHADES_OF_GRAY_P = 6.0  # Minkowski norm of the colour constancy (6: the ISIC winners' choice)  # decoder stages 2 and 3 (strides 4 and 2) fuse with separable convs


class MobileNetEncoder(nn.Module):
    """torchvision's MobileNetV2 `features`, returning [stride 2, 4, 8, 16, 32] feature maps."""

    out_channels: tuple[int, ...] = ENCODER_CHANNELS

    def __init__(self) -> None:
        super().__init__()
        self.features = mobilenet_v2(weights=None).features

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run the backbone once, keeping the skip outputs and the deepest output."""
        outputs = []
        for i, block in enumerate(self.features):
            x = block(x)
            if i in SKIP_INDICES:
                outputs.append(x)
        outputs.append(x)
        return outputs


class DecoderStage(nn.Module):
    """Upsample by 2 with a transposed conv, concatenate the matching skip, fuse, BN, ReLU.

    The fusion is a full 3×3 conv, or (`separable`, for the high-resolution stages) a
    depthwise 3×3 conv followed by a 1×1 conv, as in DeepLabV3+'s decoder: at strides 4 and 2
    a full 3×3 conv would dominate the model's multiply-accumulates.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int,
                 separable: bool = False) -> None:
        super().__init__()
        joined = out_channels + skip_channels
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        if separable:
            self.conv = nn.Sequential(
                nn.Conv2d(joined, joined, kernel_size=3, padding=1, groups=joined, bias=False),
                nn.Conv2d(joined, out_channels, kernel_size=1, bias=False))
        else:
            self.conv = nn.Conv2d(joined, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """One decoder step; the skip has exactly twice x's spatial size."""
        x = torch.cat([self.up(x), skip], dim=1)
        return self.act(self.bn(self.conv(x)))


class CustomDecoder(nn.Module):
    """Four skip stages (strides 16, 8, 4, 2), then a transposed conv from stride 2 straight
    to the one logit map at stride 1.

    `decoder_channels` are the widths at strides 16, 8, 4 and 2; the stages at strides 4 and 2
    fuse with separable convs. No feature map is ever made at full resolution: a learned 2×2
    sub-pixel upsampling of the stride-2 features gives the logits (full-resolution feature
    maps are mostly memory traffic on a CPU).
    """

    def __init__(self, encoder_channels: Sequence[int] = ENCODER_CHANNELS,
                 decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS) -> None:
        super().__init__()
        if len(encoder_channels) != 5 or len(decoder_channels) != 4:
            raise ValueError("CustomDecoder needs 5 encoder and 4 decoder widths, got "
                             f"{tuple(encoder_channels)} and {tuple(decoder_channels)}")
        skips = list(encoder_channels[:4])[::-1]  # strides 16, 8, 4, 2
        ins = [encoder_channels[4], *decoder_channels[:3]]
        self.stages = nn.ModuleList(
            DecoderStage(i, s, o, separable=k >= SEPARABLE_FROM_STAGE)
            for k, (i, s, o) in enumerate(zip(ins, skips, decoder_channels, strict=True))
        )
        self.head = nn.ConvTranspose2d(decoder_channels[3], 1, kernel_size=2, stride=2)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """features = [stride 2, 4, 8, 16, 32] → logits at stride 1 (N×1×H×W)."""
        *skips, x = features
        for stage, skip in zip(self.stages, reversed(skips), strict=True):
            x = stage(x, skip)
        return self.head(x)


class MobileNetEncoderDecoder(nn.Module):
    """RGB floats in [0, 1] (N×3×H×W, H, W ≥ 32) → lesion logits (N×1×H×W).

    ImageNet normalization is a buffer here, the one place it happens, so training, inference
    and exported weights can never disagree about it; so is the optional colour constancy
    (`shades_of_gray`, model.color_constancy) before it.
    """

    def __init__(self, encoder_weights: str | os.PathLike | None = None,
                 freeze_encoder: bool = False,
                 decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
                 color_constancy: bool = False) -> None:
        super().__init__()
        self.color_constancy = bool(color_constancy)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.encoder = MobileNetEncoder()
        self.decoder = CustomDecoder(self.encoder.out_channels, tuple(decoder_channels))
        if encoder_weights is not None:
            load_encoder_weights(self.encoder, encoder_weights)
        self.encoder_frozen = False
        self.set_encoder_frozen(freeze_encoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize, pad to a multiple of 32, encode, decode, crop back to H×W."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected N×3×H×W RGB images, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h < MIN_SIDE or w < MIN_SIDE:
            raise ValueError(f"images must be at least {MIN_SIDE}×{MIN_SIDE}, got {h}×{w}")
        if self.color_constancy:
            x = shades_of_gray(x)
        x = (x - self.mean) / self.std
        x = pad_to_multiple(x, OUTPUT_STRIDE)
        logits = self.decoder(self.encoder(x))
        return logits[..., :h, :w]

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """The backbone's parameters (the param group with the lower learning rate)."""
        return self.encoder.parameters()

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter outside the backbone: decoder stages and the head."""
        return self.decoder.parameters()

    def set_encoder_frozen(self, frozen: bool) -> None:
        """Stop (or restart) training the encoder: no gradients, BatchNorm statistics fixed.

        Under DDP, call this before wrapping the model: DDP registers only the parameters that
        require grad when it is built.
        """
        self.encoder_frozen = bool(frozen)
        for p in self.encoder.parameters():
            p.requires_grad_(not self.encoder_frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> MobileNetEncoderDecoder:
        """Like nn.Module.train, but a frozen encoder stays in eval mode (BN stats untouched)."""
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self


def shades_of_gray(x: torch.Tensor, p: float = SHADES_OF_GRAY_P) -> torch.Tensor:
    """Colour constancy per image (Finlayson & Trezzi's Shades of Gray, the p-norm of each
    channel as its illuminant): every channel is scaled so that the illuminant becomes grey,
    then clipped to [0, 1]. Removes the colour cast of a dermoscope's light and much of the
    skin tone, so a brown skin is not taken for a brown lesion; computed in fp32."""
    xf = x.float()
    illuminant = xf.clamp_min(0).pow(p).mean(dim=(2, 3), keepdim=True).pow(1 / p)
    gain = illuminant.mean(dim=1, keepdim=True) / illuminant.clamp_min(1e-4)
    return (xf * gain).clamp(0, 1).to(x.dtype)


def fuse_for_inference(model: nn.Module, inplace: bool = False) -> nn.Module:
    """An eval-mode copy of `model` (with `inplace`, the model itself: no copy, for a model
    built only to run inference) with every BatchNorm folded into the convolution before it
    (the encoder's conv-BN pairs and each decoder stage's fusion conv + BN).

    The outputs are the same up to float rounding; an eval BatchNorm costs about as much as a
    conv on a CPU, so the fused forward is faster. For inference only: the copy cannot be
    trained (no BN).
    """
    fused = (model if inplace else copy.deepcopy(model)).eval()
    for module in fused.modules():
        if isinstance(module, nn.Sequential):  # torchvision's Conv2dNormActivation, block.conv
            names = list(module._modules)
            for a, b in zip(names, names[1:], strict=False):
                conv, bn = module._modules[a], module._modules[b]
                if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d):
                    _fold_bn(conv, bn)
                    module._modules[b] = nn.Identity()
        elif isinstance(module, DecoderStage) and isinstance(module.bn, nn.BatchNorm2d):
            if isinstance(module.conv, nn.Sequential):
                _fold_bn(module.conv[-1], module.bn)
            else:
                _fold_bn(module.conv, module.bn)
            module.bn = nn.Identity()
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval BatchNorm into the conv before it, in place: torch's own arithmetic
    (`fuse_conv_bn_weights`, as `fuse_conv_bn_eval`) without its copy of each conv (52 copies
    were ~12 ms of the inference job's start-up)."""
    conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean,
                                                  bn.running_var, bn.eps, bn.weight, bn.bias)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom and right by reflection up to a multiple of `multiple` (a no-op if already).

    Reflection continues the skin texture into the border, where replication would smear the
    edge pixels into streaks and zeros would draw a hard frame, neither of which the network
    saw in training. With H, W ≥ 32 the pad (≤ 31) is always smaller than the image, as
    reflection requires.
    """
    h, w = x.shape[-2:]
    # Rounding up by floor division, not `(-h) % multiple`: torch.compile's inductor (2.14) fails
    # on a modulo of dynamic sizes ("TensorReferenceAnalysis has no attribute python_mod").
    pad_h = (h + multiple - 1) // multiple * multiple - h
    pad_w = (w + multiple - 1) // multiple * multiple - w
    if pad_h == 0 and pad_w == 0:
        return x
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
