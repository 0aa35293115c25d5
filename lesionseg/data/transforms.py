"""Joint image+mask transforms: random training augmentation and the one eval resize.

Both work on `tv_tensors.Image` / `tv_tensors.Mask` through `torchvision.transforms.v2`
functionals, so every geometric op is applied to image and mask alike (the mask with nearest
interpolation) and the mask stays exactly binary and aligned. Images stay uint8 through the
geometry and colour ops and become float in [0, 1] last; masks come out as uint8 {0, 1}.

Randomness never comes from a global or worker RNG: the training transform draws every
parameter from an explicit `torch.Generator`, which the pipeline seeds from (seed, epoch,
position, sample id) via `augment_seed`. The same sample at the same place in the same epoch is
therefore augmented identically on every run, which is what makes resume exact.

`eval_transform` resizes the WHOLE image to size×size (no crop). Validation and inference both
use it, so their inputs match; validation scores at that resolution (the mask is resized with
nearest), inference scores at the original size after resizing the prediction back.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

# Aspect-ratio range of the random resized crop (torchvision's default).
CROP_RATIO = (3 / 4, 4 / 3)
# Masks are resized with nearest on the same half-pixel grid as the image's bilinear resize.
# Plain NEAREST, torchvision's default for masks (and the only mode its resized_crop gives a
# Mask), samples at floor(i * scale): shifted by up to half a source pixel against the image,
# a visible misalignment when a crop is enlarged. So masks are cropped, then resized with this.
MASK_RESIZE = InterpolationMode.NEAREST_EXACT
# Attempts at a crop of the drawn area and aspect ratio before falling back to a centre crop.
CROP_ATTEMPTS = 10


def augment_seed(*parts: object) -> int:
    """A 63-bit seed from any hashable parts (e.g. seed, epoch, lane, index, sample id).

    A cryptographic hash, not Python's `hash` (salted per process), so the same parts give the
    same seed in every process and on every machine.
    """
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator_for(*parts: object) -> torch.Generator:
    """A CPU torch.Generator seeded from `augment_seed(*parts)`."""
    g = torch.Generator()
    g.manual_seed(augment_seed(*parts))
    return g


@dataclass(frozen=True)
class AugmentParams:
    """Strengths of the training augmentation (built from `DataConfig` by `from_config`)."""

    size: int  # output side (data.image_size)
    scale_min: float = 0.3  # smallest crop area as a fraction of the image
    hflip: bool = True
    vflip: bool = True
    rotate_degrees: float = 30.0  # rotation drawn uniformly in [-d, d]; corners filled with 0
    color_jitter: float = 0.2  # brightness/contrast/saturation factors in [1 - j, 1 + j]

    @classmethod
    def from_config(cls, data_cfg: object) -> AugmentParams:
        """Take the augmentation fields of a `DataConfig`."""
        return cls(size=data_cfg.image_size, scale_min=data_cfg.scale_min,
                   hflip=data_cfg.hflip, vflip=data_cfg.vflip,
                   rotate_degrees=data_cfg.rotate_degrees, color_jitter=data_cfg.color_jitter)


def to_tv_tensors(image: Image.Image | torch.Tensor,
                  mask: Image.Image | torch.Tensor | None) -> tuple[tv_tensors.Image,
                                                                    tv_tensors.Mask | None]:
    """RGB PIL (or uint8 3×H×W tensor) and L 0/255 mask → uint8 Image and {0, 1} uint8 Mask."""
    img = tv_tensors.Image(F.pil_to_tensor(image) if isinstance(image, Image.Image) else image)
    if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"expected an RGB uint8 image, got {img.dtype} {tuple(img.shape)}")
    if mask is None:
        return img, None
    m = F.pil_to_tensor(mask) if isinstance(mask, Image.Image) else mask
    if m.ndim == 2:
        m = m.unsqueeze(0)
    if m.shape[-2:] != img.shape[-2:]:
        raise ValueError(f"mask {tuple(m.shape[-2:])} and image {tuple(img.shape[-2:])} differ "
                         "in size")
    return img, tv_tensors.Mask(_binary(m))


def _binary(m: torch.Tensor) -> torch.Tensor:
    """0/255 (L masks), 0/1 or bool → uint8 {0, 1}; 0/255 is thresholded at 128 like ISIC."""
    if m.dtype != torch.bool and m.numel() and int(m.max()) > 1:
        return (m > 127).to(torch.uint8)
    return (m > 0).to(torch.uint8)


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def crop_params(height: int, width: int, scale_min: float,
                g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering [scale_min, 1] of the area, aspect in
    CROP_RATIO; the algorithm of torchvision's RandomResizedCrop, driven by `g`."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(CROP_ATTEMPTS):
        target = area * _uniform(g, scale_min, 1.0)
        ratio = math.exp(_uniform(g, *log_ratio))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    # Fallback: the largest centre crop within the ratio range.
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, round(height * CROP_RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(image: Image.Image | torch.Tensor, mask: Image.Image | torch.Tensor,
                    params: AugmentParams,
                    g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop to size×size, flips, rotation, colour jitter, all drawn from `g`.

    Returns (float32 3×S×S image in [0, 1], uint8 1×S×S mask in {0, 1}). The crop is taken from
    the full image and resampled once (antialiased); rotation and jitter then run at S×S, which
    is cheap. Rotated-in corners are black in the image and background (0) in the mask.
    """
    img, msk = to_tv_tensors(image, mask)
    h, w = img.shape[-2:]
    top, left, ch, cw = crop_params(h, w, params.scale_min, g)
    size = [params.size, params.size]
    img = F.resized_crop(img, top, left, ch, cw, size, antialias=True)
    msk = F.resize(F.crop(msk, top, left, ch, cw), size, interpolation=MASK_RESIZE)
    if params.hflip and float(torch.rand((), generator=g)) < 0.5:
        img, msk = F.horizontal_flip(img), F.horizontal_flip(msk)
    if params.vflip and float(torch.rand((), generator=g)) < 0.5:
        img, msk = F.vertical_flip(img), F.vertical_flip(msk)
    if params.rotate_degrees > 0:
        angle = _uniform(g, -params.rotate_degrees, params.rotate_degrees)
        img = F.rotate(img, angle, interpolation=InterpolationMode.BILINEAR, fill=0)
        msk = F.rotate(msk, angle, fill=0)  # tv_tensors.Mask: nearest, so values stay {0, 1}
    if params.color_jitter > 0:
        img = _jitter(img, params.color_jitter, g)
    return F.to_dtype(img, torch.float32, scale=True).as_subclass(torch.Tensor), \
        msk.as_subclass(torch.Tensor)


def _jitter(img: tv_tensors.Image, strength: float, g: torch.Generator) -> tv_tensors.Image:
    """Brightness, contrast and saturation, each scaled by a factor in [1 - s, 1 + s]."""
    b, c, s = (_uniform(g, 1 - strength, 1 + strength) for _ in range(3))
    img = F.adjust_brightness(img, b)
    img = F.adjust_contrast(img, c)
    return F.adjust_saturation(img, s)


def eval_transform(image: Image.Image | torch.Tensor, mask: Image.Image | torch.Tensor | None,
                   size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize the whole image to size×size (bilinear, antialiased; no crop, aspect not kept).

    Returns (float32 3×S×S image in [0, 1], uint8 1×S×S {0, 1} mask resized with nearest, or
    None without a mask). Validation and inference both call this so that the model sees the
    same input in both; inference resizes the prediction back to the original size itself.
    """
    img, msk = to_tv_tensors(image, mask)
    img = F.resize(img, [size, size], antialias=True)
    out_mask = None
    if msk is not None:
        out_mask = F.resize(msk, [size, size], interpolation=MASK_RESIZE).as_subclass(torch.Tensor)
    return F.to_dtype(img, torch.float32, scale=True).as_subclass(torch.Tensor), out_mask
