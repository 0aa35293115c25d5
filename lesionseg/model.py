"""The segmentation network: a torchvision MobileNetV2 encoder and a small U-Net-style decoder.

Data flows top to bottom through three modules: `MobileNetEncoder` (skip features at strides 2,
4, 8, 16 and the deepest at 32), `CustomDecoder` (transposed-convolution upsampling, skip
concatenation, conv-BN-ReLU; a last transposed conv to the logits) and
`MobileNetEncoderDecoder`, which normalizes RGB in [0, 1] with ImageNet statistics held in a
buffer, pads to a multiple of 32 and crops the logits back.

Encoder weights come from `None` (random), `"imagenet"` (torchvision's cache only, never a
download unless LESIONSEG_ALLOW_DOWNLOAD=1) or a local state-dict file; anything that cannot be
loaded is a `WeightsError`, never a silent random initialization.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from lesionseg.errors import UserError, first_line

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
SEPARABLE_FROM_STAGE = 2  # decoder stages 2 and 3 (strides 4 and 2) fuse with separable convs

ALLOW_DOWNLOAD_ENV = "LESIONSEG_ALLOW_DOWNLOAD"


class WeightsError(UserError):
    """Encoder weights that cannot be had: not cached, missing, unreadable or not fitting."""


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
    a full 3×3 conv cost 0.8 of the model's 2.2 GMAC at 384², the separable one a tenth of it.
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
    sub-pixel upsampling of the stride-2 features gives the logits (a full-resolution feature
    stage cost a third of a training step on the CPU, mostly memory traffic).
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
    and exported weights can never disagree about it.
    """

    def __init__(self, encoder_weights: str | os.PathLike | None = None,
                 freeze_encoder: bool = False,
                 decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS) -> None:
        super().__init__()
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


def fuse_for_inference(model: nn.Module, inplace: bool = False) -> nn.Module:
    """An eval-mode copy of `model` (with `inplace`, the model itself: no copy, for a model
    built only to run inference) with every BatchNorm folded into the convolution before it
    (the encoder's conv-BN pairs and each decoder stage's fusion conv + BN).

    The outputs are the same up to float rounding (max |Δlogit| ~ 1e-6 on random BN
    statistics); on this CPU an eval BatchNorm costs as much as a conv, and the fused forward is
    ~40% faster at 384², batch 8. For inference only: the copy cannot be trained (no BN).
    """
    fused = (model if inplace else copy.deepcopy(model)).eval()
    for module in fused.modules():
        if isinstance(module, nn.Sequential):  # torchvision's Conv2dNormActivation, block.conv
            names = list(module._modules)
            for a, b in zip(names, names[1:], strict=False):
                conv, bn = module._modules[a], module._modules[b]
                if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d):
                    module._modules[a] = fuse_conv_bn_eval(conv, bn)
                    module._modules[b] = nn.Identity()
        elif isinstance(module, DecoderStage) and isinstance(module.bn, nn.BatchNorm2d):
            if isinstance(module.conv, nn.Sequential):
                module.conv[-1] = fuse_conv_bn_eval(module.conv[-1], module.bn)
            else:
                module.conv = fuse_conv_bn_eval(module.conv, module.bn)
            module.bn = nn.Identity()
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused


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


def imagenet_cache_path() -> Path:
    """Where torchvision keeps the IMAGENET1K_V2 MobileNetV2 weights (honours TORCH_HOME)."""
    url = MobileNet_V2_Weights.IMAGENET1K_V2.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_encoder_weights(encoder: MobileNetEncoder, source: str | os.PathLike) -> None:
    """Load `"imagenet"` or a state-dict file into the encoder; any failure is a WeightsError."""
    if str(source) == "imagenet":
        state, origin = _imagenet_state_dict(), "imagenet"
    else:
        path = Path(source).expanduser()
        state, origin = _read_state_dict(path), str(path)
    _load_into(encoder, state, origin)
    log.info("encoder weights loaded from %s", origin)


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    """The cached torchvision ImageNet weights; a download only if LESIONSEG_ALLOW_DOWNLOAD=1."""
    weights = MobileNet_V2_Weights.IMAGENET1K_V2
    path = imagenet_cache_path()
    if path.is_file():
        return _read_state_dict(path)
    if os.environ.get(ALLOW_DOWNLOAD_ENV) == "1":
        log.info("downloading %s to %s (%s=1)", weights.url, path, ALLOW_DOWNLOAD_ENV)
        try:
            return weights.get_state_dict(progress=True, check_hash=True)
        except Exception as e:  # URL, HTTP, hash and file errors come in many types
            raise WeightsError(f"model.encoder_weights=imagenet: download of {weights.url} "
                               f"failed ({first_line(e)})") from None
    raise WeightsError(
        f"model.encoder_weights=imagenet: ImageNet weights are not cached at {path}; on a "
        f"machine with internet fetch {weights.url} and put the file at that path (set "
        f"TORCH_HOME to change the cache folder), or pass a local state-dict file as "
        f"model.encoder_weights=/path/to/mobilenet_v2.pth, or model.encoder_weights=null for a "
        f"random encoder (or set {ALLOW_DOWNLOAD_ENV}=1 to allow the download)")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """torch.load a state dict (weights only), unwrapping a {"state_dict": …} container."""
    from lesionseg.checkpoint import torch_load

    obj = torch_load(path, WeightsError, "encoder weights", "not a readable state-dict file")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return obj


def _encoder_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a full torchvision, encoder-only or lesionseg state dict onto `features.*` keys.

    DDP's `module.` and our own `encoder.` prefixes are stripped; `classifier.*` (torchvision)
    and decoder keys (a whole lesionseg model) are ignored; bare `0.0.weight` keys (a
    `features` module's own state dict) get the `features.` prefix.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("encoder.features.") for k in state):
        return {k.removeprefix("encoder."): v for k, v in state.items()
                if k.startswith("encoder.features.")}
    if any(k.startswith("features.") for k in state):
        return {k: v for k, v in state.items() if k.startswith("features.")}
    return {f"features.{k}": v for k, v in state.items()}


def _load_into(encoder: MobileNetEncoder, state: dict[str, torch.Tensor], origin: str) -> None:
    """Strictly load the mapped state dict, naming missing, unexpected and misshapen keys."""
    mapped = _encoder_keys(state)
    expected = encoder.state_dict()
    missing = [k for k in expected if k not in mapped]
    unexpected = [k for k in mapped if k not in expected]
    misshapen = [f"{k} {tuple(mapped[k].shape)} vs {tuple(v.shape)}"
                 for k, v in expected.items() if k in mapped and mapped[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if misshapen:
        problems.append(f"{len(misshapen)} shape mismatches (e.g. {', '.join(misshapen[:2])})")
    if problems:
        raise WeightsError(f"{origin}: not MobileNetV2 encoder weights: {'; '.join(problems)}")
    encoder.load_state_dict(mapped, strict=True)
