"""Joint image+mask transforms: random training augmentation and the one eval resize.

Both take PIL images (the augmentation also H×W(×C) uint8 arrays) and return uint8 tensors: images 3×S×S whose memory is
H×W×C (so a stacked batch is already channels_last), masks 1×S×S in {0, 1}. Float conversion
happens once per batch, after the transfer to the device (`to_float_images`): a uint8 batch is
a quarter of the bytes through worker shared memory, pinned memory and PCIe.

Training augmentation is ONE geometric resampling: random resized crop, flips, rotation and
the resize to S×S compose into a single affine map that OpenCV applies with SIMD code
(`cv2.warpAffine`: bilinear for the image, nearest for the mask, both on the same pixel-centre
grid, so they stay aligned), followed by ONE colour pass (brightness, contrast, saturation and the
per-channel tint compose into a 3×4 colour matrix, `cv2.transform`). Before decoding, `draw_augmentation` fixes
the crop, so a JPEG can be decoded at the smallest DCT scale that still holds the crop at S×S
(`Augmentation.decode_size`); where the source is still larger than the output, the needed
region is area-averaged to the output's scale first (bilinear alone would skip pixels).
OpenCV runs single-threaded (`lesionseg.data.cv`): the parallelism is the DataLoader's workers.

Randomness never comes from a global or worker RNG: every parameter is drawn from an explicit
`torch.Generator`, which the pipeline seeds from (seed, epoch, lane, position, sample key) via
`augment_seed`. The same sample at the same place in the same epoch is therefore augmented
identically on every run, which is what makes resume exact.

`eval_transform` resizes the WHOLE image to size×size (no crop, aspect not kept) through the
same resampler with the identity augmentation, so validation and inference see exactly what
training sees for a whole-image crop; the random crop keeps the image's own aspect ratio (times
a jitter around 1), so training differs from evaluation only by the deliberate zoom, flips,
rotation and colour. Validation scores at that resolution, inference at the original size
after resizing the prediction back.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from lesionseg.data.cv import cv2
from lesionseg.data.stickers import draw_sticker

# Range of the random resized crop's aspect ratio relative to the image's own (torchvision's
# range, taken relative: eval squashes the whole image, so relative is what the model sees).
CROP_RATIO = (3 / 4, 4 / 3)
# Luma weights (ITU-R 601, as torchvision and Pillow's "L" conversion use).
LUMA = (0.299, 0.587, 0.114)
# Relative absorbance of melanin at red, green and blue (~620, 540, 460 nm; melanin's
# absorbance falls as wavelength^-3.48): darker skin is lighter skin seen through more
# melanin, I·exp(-d·MELANIN) for an optical density d (Beer-Lambert).
MELANIN = (0.353, 0.572, 1.0)
SKIN_TONE_SHARE = 0.5  # share of crops darkened when data.skin_tone > 0
# A skin crop (data.skin_crop_prob) spans at least this share of each side of the image: a
# smaller one would be blown up into a blur no whole image looks like.
SKIN_CROP_MIN_SIDE = 0.4
# Above this many source pixels per output pixel (along either source axis), the sampled
# region is area-reduced to about one source pixel per output pixel before the bilinear warp
# (bilinear alone reads 2×2 pixels and would skip the others: aliasing, thin hairs broken).
MAX_SAMPLING_STEP = 1.0


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
    rotate_degrees: float = 30.0  # rotation drawn uniformly in [-d, d]; outside the image: 0
    color_jitter: float = 0.2  # brightness/contrast/saturation factors in [1 - j, 1 + j]
    tint: float = 0.0  # per-channel (R, G, B) gains exp(U(-t, t)): white balance
    skin_tone: float = 0.0  # largest added melanin optical density (SKIN_TONE_SHARE of crops)
    grey_prob: float = 0.0  # share of crops turned to greyscale (saturation 0, no tint)
    sticker_prob: float = 0.0  # share of crops that get a calibration sticker (data.stickers)
    skin_crop_prob: float = 0.0  # share of crops taken beside the lesion, none of it in view

    @classmethod
    def from_config(cls, data_cfg: object) -> AugmentParams:
        """Take the augmentation fields of a `DataConfig` (resolved: no null left, see
        `lesionseg.recipe.resolve`)."""
        missing = [k for k in ("scale_min", "rotate_degrees", "color_jitter", "tint")
                   if getattr(data_cfg, k) is None]
        if missing:
            raise ValueError(f"augmentation keys {missing} are still null (auto): resolve the "
                             "recipe first (lesionseg.recipe.resolve)")
        return cls(size=data_cfg.image_size, scale_min=data_cfg.scale_min,
                   hflip=data_cfg.hflip, vflip=data_cfg.vflip,
                   rotate_degrees=data_cfg.rotate_degrees, color_jitter=data_cfg.color_jitter,
                   tint=data_cfg.tint, skin_tone=data_cfg.skin_tone,
                   grey_prob=data_cfg.grey_prob, sticker_prob=data_cfg.sticker_prob,
                   skin_crop_prob=data_cfg.skin_crop_prob)


@dataclass(frozen=True)
class Augmentation:
    """One drawn augmentation of an image of (height, width) = `source`: crop box (top, left,
    h, w) in its pixels, flips, rotation in degrees, colour factors, output side, the seed
    of the calibration sticker painted into the output (None: no sticker) and the (R, G, B)
    gains of the tint (None: no tint)."""

    source: tuple[int, int]
    crop: tuple[int, int, int, int]
    hflip: bool
    vflip: bool
    angle: float
    brightness: float
    contrast: float
    saturation: float
    size: int
    sticker_seed: int | None = None
    tint: tuple[float, float, float] | None = None

    def has_colour(self) -> bool:
        """Whether the colour pass changes anything."""
        return (self.brightness != 1 or self.contrast != 1 or self.saturation != 1
                or self.tint is not None)

    def decode_size(self) -> tuple[int, int]:
        """(width, height) the full image must be decoded at, at least, for the crop to hold
        `size` pixels each way: what to ask a JPEG decoder's draft mode for."""
        height, width = self.source
        _, _, ch, cw = self.crop
        return (min(width, math.ceil(width * self.size / cw)),
                min(height, math.ceil(height * self.size / ch)))

    def affine(self) -> tuple[float, ...]:
        """Output pixel (u, v) → source (x, y), continuous coordinates (a pixel spans [i, i+1]),
        as Pillow's AFFINE data (a, b, c, d, e, f): x = a u + b v + c, y = d u + e v + f."""
        top, left, ch, cw = self.crop
        s = self.size
        sx = cw / s * (-1.0 if self.hflip else 1.0)
        sy = ch / s * (-1.0 if self.vflip else 1.0)
        cos, sin = math.cos(math.radians(self.angle)), math.sin(math.radians(self.angle))
        a, b = sx * cos, sx * sin
        d, e = -sy * sin, sy * cos
        cx, cy = left + cw / 2, top + ch / 2
        return (a, b, cx - (a + b) * s / 2, d, e, cy - (d + e) * s / 2)


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def crop_params(height: int, width: int, scale_min: float,
                g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering a fraction s ∈ [scale_min, 1] of the image,
    its aspect ratio the image's own times r, r log-uniform in CROP_RATIO narrowed to [s, 1/s]
    so that the crop always fits. The crop is then squashed to S×S like the eval transform
    squashes the whole image, so s = 1 is exactly the eval framing (a 3:2 image is not
    centre-cropped to 4:3), and smaller crops zoom in around it."""
    s = _uniform(g, scale_min, 1.0)
    low = max(math.log(CROP_RATIO[0]), math.log(s))
    high = min(math.log(CROP_RATIO[1]), -math.log(s))
    r = math.exp(_uniform(g, low, high))
    h = min(height, max(1, round(height * math.sqrt(s / r))))
    w = min(width, max(1, round(width * math.sqrt(s * r))))
    top = int(torch.randint(0, height - h + 1, (), generator=g))
    left = int(torch.randint(0, width - w + 1, (), generator=g))
    return top, left, h, w


def lesion_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) of a mask's lesion pixels (bottom and right exclusive), or
    None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def skin_crop(height: int, width: int, box: tuple[int, int, int, int],
              g: torch.Generator) -> tuple[int, int, int, int] | None:
    """A crop (top, left, h, w) of the image's own aspect ratio lying wholly above, below,
    left or right of the lesion's bounding `box`, spanning at least SKIN_CROP_MIN_SIDE of each
    side (one of the bands that fit, drawn from `g`); None when no band is wide enough."""
    top, left, bottom, right = box
    fits = []  # (band top, band left, band h, band w): the bands outside the box
    for band in ((0, 0, top, width), (bottom, 0, height - bottom, width),
                 (0, 0, height, left), (0, right, height, width - right)):
        bh, bw = band[2], band[3]
        h, w = min(bh, round(bw * height / width)), min(bw, round(bh * width / height))
        if h >= SKIN_CROP_MIN_SIDE * height and w >= SKIN_CROP_MIN_SIDE * width:
            fits.append((band, h, w))
    if not fits:
        return None
    (bt, bl, bh, bw), h, w = fits[int(torch.randint(0, len(fits), (), generator=g))]
    return (bt + int(torch.randint(0, bh - h + 1, (), generator=g)),
            bl + int(torch.randint(0, bw - w + 1, (), generator=g)), h, w)


def draw_augmentation(height: int, width: int, params: AugmentParams,
                      g: torch.Generator,
                      lesion: tuple[int, int, int, int] | None = None) -> Augmentation:
    """Draw every random parameter for an image of height × width from `g` (fixed order:
    crop, horizontal flip, vertical flip, angle, brightness, contrast, saturation, with
    `sticker_prob` > 0 whether to paint a sticker and its seed, with `tint` > 0 the three
    channel gains, with `skin_tone` > 0 whether to darken the skin and the melanin density,
    with `grey_prob` > 0 whether to turn the crop grey, with `skin_crop_prob` > 0 whether to
    move the crop beside the `lesion` box (`lesion_box`; without one, or where no band
    beside it is wide enough, the crop stays) and where: a zero strength draws nothing, so
    other draws stay as they were)."""
    crop = crop_params(height, width, params.scale_min, g)
    hflip = params.hflip and float(torch.rand((), generator=g)) < 0.5
    vflip = params.vflip and float(torch.rand((), generator=g)) < 0.5
    angle = (_uniform(g, -params.rotate_degrees, params.rotate_degrees)
             if params.rotate_degrees > 0 else 0.0)
    j = params.color_jitter
    b, c, s = ((_uniform(g, 1 - j, 1 + j) for _ in range(3)) if j > 0 else (1.0, 1.0, 1.0))
    sticker = None
    if params.sticker_prob > 0 and float(torch.rand((), generator=g)) < params.sticker_prob:
        sticker = int(torch.randint(0, 2**62, (), generator=g))
    gains = [math.exp(_uniform(g, -params.tint, params.tint)) for _ in range(3)] \
        if params.tint > 0 else [1.0, 1.0, 1.0]
    if params.skin_tone > 0 and float(torch.rand((), generator=g)) < SKIN_TONE_SHARE:
        density = _uniform(g, 0.0, params.skin_tone)
        gains = [k * math.exp(-density * m) for k, m in zip(gains, MELANIN, strict=True)]
    tint = tuple(gains) if gains != [1.0, 1.0, 1.0] else None
    if params.grey_prob > 0 and float(torch.rand((), generator=g)) < params.grey_prob:
        s, tint = 0.0, None  # saturation 0: every channel its luma
    if params.skin_crop_prob > 0 and float(torch.rand((), generator=g)) < params.skin_crop_prob \
            and lesion is not None:
        crop = skin_crop(height, width, lesion, g) or crop
    return Augmentation((height, width), crop, hflip, vflip, angle, b, c, s, params.size,
                        sticker, tint)


def apply_augmentation(image: Image.Image | np.ndarray, mask: Image.Image | np.ndarray,
                       aug: Augmentation, soft_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply `aug` to an RGB image and its 0/255 mask (PIL or H×W(×3) uint8 arrays) →
    (uint8 3×S×S, uint8 1×S×S in {0, 1}; with `soft_mask`, uint8 0-255: the lesion's share
    of each output pixel, resampled like the image: area-averaged, then bilinear).

    The mask must be at `aug.source` size; the image may be smaller (decoded at a reduced JPEG
    scale): its coordinates are scaled, so image and mask stay aligned. Outside the source the
    image is black and the mask background.
    """
    height, width = aug.source
    src, msk = np.asarray(image), np.asarray(mask)
    if msk.shape[:2] != (height, width):
        raise ValueError(f"mask is {msk.shape[1]}x{msk.shape[0]} but the augmentation was "
                         f"drawn for {width}x{height}")
    s = aug.size
    coeffs = aug.affine()
    out = _sample(src, coeffs, src.shape[1] / width, src.shape[0] / height, s)
    if soft_mask:
        warped = np.ascontiguousarray(_sample(np.ascontiguousarray(msk), coeffs, 1.0, 1.0, s))
    else:
        warped = cv2.warpAffine(msk, _cv2_matrix(coeffs), (s, s),
                                flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    _sticker(out, warped, aug)
    if aug.has_colour():
        out = _colour(out, aug.brightness, aug.contrast, aug.saturation, aug.tint)
    if soft_mask:
        return _image_tensor(out), torch.from_numpy(warped[None])
    return _image_tensor(out), _mask_tensor(warped)


def _sticker(image: np.ndarray, mask: np.ndarray, aug: Augmentation) -> None:
    """Paint the augmentation's sticker (if any) into the S×S output, mask cleared under it."""
    if aug.sticker_seed is not None:
        draw_sticker(image, mask, np.random.default_rng(aug.sticker_seed))


def is_flip_and_colour(aug: Augmentation) -> bool:
    """Whether `aug` frames the whole image without rotation: then it is the eval resize
    followed by flips and colour, and `flip_and_colour` can apply it to a resized copy."""
    height, width = aug.source
    return aug.crop == (0, 0, height, width) and aug.angle == 0


def flip_and_colour(image: torch.Tensor, mask: torch.Tensor,
                    aug: Augmentation) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a whole-image, unrotated `aug` (`is_flip_and_colour`) to an image and mask
    already resized to S×S (`eval_transform`'s output): its flips, then its colour pass.

    The same augmentation as `apply_augmentation` on the source, which warps with the flips
    folded into one affine map: image pixels may differ by one grey level where OpenCV's
    fixed-point coordinates round the mirrored grid differently (tested), masks are identical.
    """
    if not is_flip_and_colour(aug):
        raise ValueError("flip_and_colour takes whole-image unrotated augmentations only")
    img = image.permute(1, 2, 0).numpy()  # H×W×3 view of the HWC memory
    msk = mask
    if aug.hflip:
        img, msk = img[:, ::-1], msk.flip(-1)
    if aug.vflip:
        img, msk = img[::-1], msk.flip(-2)
    if aug.sticker_seed is not None:  # painted on copies: `image` may be the memory cache's
        img, plane = np.array(img, order="C"), msk[0].numpy().copy()
        _sticker(img, plane, aug)
        msk = torch.from_numpy(plane[None])
    if aug.has_colour():
        img = _colour(np.ascontiguousarray(img), aug.brightness, aug.contrast, aug.saturation,
                      aug.tint)
    return _image_tensor(img), msk.contiguous()


def _cv2_matrix(coeffs: tuple[float, ...]) -> np.ndarray:
    """Pillow-style AFFINE data (continuous coordinates, a pixel spans [i, i+1]) → OpenCV's
    inverse map on pixel indices (pixel i is centred at i): x_idx = a u + b v + c', with
    c' = c + (a + b) / 2 - 1/2 so that centres map to centres."""
    a, b, c, d, e, f = coeffs
    return np.array([[a, b, c + (a + b) / 2 - 0.5], [d, e, f + (d + e) / 2 - 0.5]])


def _sample(src: np.ndarray, coeffs: tuple[float, ...], fx: float, fy: float,
            s: int) -> np.ndarray:
    """Bilinear affine resampling of `src` (whose scale against the augmentation's source is
    fx, fy) to s×s. Where the map reduces (more than MAX_SAMPLING_STEP source pixels per
    output pixel along a source axis), the region it samples is first area-averaged
    (`cv2.INTER_AREA`, exact fractional box weights) to about one pixel per output pixel, so
    every source pixel contributes, whatever the zoom: the same antialiasing for a training
    crop and for the whole-image eval resize (`eval_transform` is this with the identity)."""
    a, b, c, d, e, f = coeffs
    a, b, c, d, e, f = a * fx, b * fx, c * fx, d * fy, e * fy, f * fy
    kx, ky = max(1.0, math.hypot(a, b)), max(1.0, math.hypot(d, e))  # source px per output px
    if kx > MAX_SAMPLING_STEP or ky > MAX_SAMPLING_STEP:
        xs = [a * u + b * v + c for u in (0, s) for v in (0, s)]
        ys = [d * u + e * v + f for u in (0, s) for v in (0, s)]
        # The region the output samples, with a margin of one reduced pixel so that bilinear
        # sampling near its edge reads image, not fill; clipped to the image.
        mx, my = math.ceil(kx), math.ceil(ky)
        x0, y0 = max(0, math.floor(min(xs)) - mx), max(0, math.floor(min(ys)) - my)
        x1 = min(src.shape[1], math.ceil(max(xs)) + mx)
        y1 = min(src.shape[0], math.ceil(max(ys)) + my)
        if x1 > x0 and y1 > y0:
            w, h = max(1, round((x1 - x0) / kx)), max(1, round((y1 - y0) / ky))
            if (w, h) != (x1 - x0, y1 - y0):
                src = cv2.resize(src[y0:y1, x0:x1], (w, h), interpolation=cv2.INTER_AREA)
            else:
                src = src[y0:y1, x0:x1]
            rx, ry = (x1 - x0) / w, (y1 - y0) / h  # exact: reduced pixel i = [i·rx, (i+1)·rx)
            a, b, c = a / rx, b / rx, (c - x0) / rx
            d, e, f = d / ry, e / ry, (f - y0) / ry
    return cv2.warpAffine(src, _cv2_matrix((a, b, c, d, e, f)), (s, s),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def _colour(img: np.ndarray, brightness: float, contrast: float, saturation: float,
            tint: tuple[float, float, float] | None = None) -> np.ndarray:
    """Brightness (scale), contrast (blend with the mean luma), saturation (blend with each
    pixel's luma) and the tint (a gain per channel), in that order, as one colour-matrix pass;
    results saturate to [0, 255]."""
    r, g, b = cv2.mean(img)[:3]
    mean = LUMA[0] * r + LUMA[1] * g + LUMA[2] * b
    # x → T(S(C(B x))) with B = b·I, C x = c·x + (1 - c)·b·mean, S = s·I + (1 - s)·1·lumaᵀ,
    # T = diag(tint); S maps a grey offset to itself, so the offset before T stays
    # (1 - c)·b·mean.
    scale = brightness * contrast
    offset = (1 - contrast) * brightness * mean
    gains = tint or (1.0, 1.0, 1.0)
    m = np.empty((3, 4), np.float32)
    for i in range(3):
        for k in range(3):
            m[i, k] = gains[i] * (scale * (1 - saturation) * LUMA[k]
                                  + (scale * saturation if k == i else 0.0))
        m[i, 3] = gains[i] * offset
    return cv2.transform(img, m)


def _image_tensor(img: np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 array → uint8 3×H×W tensor over that H×W×C memory (see `stack_images`)."""
    return torch.from_numpy(np.require(img, np.uint8, ['C', 'W'])).permute(2, 0, 1)


def _mask_tensor(msk: np.ndarray) -> torch.Tensor:
    """H×W 0/255 array → uint8 1×H×W in {0, 1} (thresholded at 128, as ISIC does)."""
    return torch.from_numpy((msk > 127).view(np.uint8)[None])


def _check_pair(image: Image.Image, mask: Image.Image | None) -> None:
    if not isinstance(image, Image.Image) or image.mode != "RGB":
        raise ValueError(f"expected an RGB PIL image, got {type(image).__name__} "
                         f"{getattr(image, 'mode', '')}".rstrip())
    if mask is not None and (not isinstance(mask, Image.Image) or mask.mode != "L"):
        raise ValueError(f"expected an L (0/255) PIL mask, got {type(mask).__name__} "
                         f"{getattr(mask, 'mode', '')}".rstrip())
    if mask is not None and mask.size != image.size:
        raise ValueError(f"mask {mask.size} and image {image.size} differ in size")


def train_transform(image: Image.Image, mask: Image.Image, params: AugmentParams,
                    g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop to size×size, flips, rotation, colour jitter, all drawn from `g`,
    on an already decoded image and mask of the same size (see `draw_augmentation` +
    `apply_augmentation` for decoding at the crop's scale). Returns (uint8 3×S×S image,
    uint8 1×S×S {0, 1} mask)."""
    _check_pair(image, mask)
    lesion = lesion_box(np.asarray(mask) > 127) if params.skin_crop_prob > 0 else None
    aug = draw_augmentation(mask.height, mask.width, params, g, lesion)
    return apply_augmentation(image, mask, aug)


def identity_augmentation(height: int, width: int, size: int) -> Augmentation:
    """The augmentation that does nothing but squash the whole image to size×size."""
    return Augmentation((height, width), (0, 0, height, width), False, False, 0.0, 1.0, 1.0,
                        1.0, size)


def eval_transform(image: Image.Image, mask: Image.Image | None, size: int,
                   soft_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize the whole image to size×size (no crop, aspect not kept), exactly as training
    resamples a whole-image crop: `apply_augmentation` with the identity augmentation (area
    reduction, then bilinear; the mask with nearest on the same pixel grid).

    Returns (uint8 3×S×S image, uint8 1×S×S {0, 1} mask, or None without a mask). Validation
    and inference both call this, so the model sees the same input in both, and the same as a
    training crop covering the whole image; inference resizes the prediction back.
    """
    _check_pair(image, mask)
    aug = identity_augmentation(image.height, image.width, size)
    if mask is None:
        src = np.asarray(image)
        return _image_tensor(_sample(src, aug.affine(), 1.0, 1.0, size)), None
    return apply_augmentation(image, mask, aug, soft_mask)


def crop_sample(image: torch.Tensor, box: tuple[float, float, float], size: int) -> torch.Tensor:
    """The square region (top, left, side) of a uint8 C×H×W image, in its continuous pixel
    coordinates (fractions allowed), resampled to uint8 C×size×size as a training crop of it is
    (`_sample`: area reduction where the crop shrinks, then bilinear). The second pass of
    inference (`lesionseg.infer.refine`) cuts its crops from a finer copy of the image this way."""
    if image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(f"expected a uint8 C×H×W image, got {image.dtype} {tuple(image.shape)}")
    top, left, side = box
    k = side / size
    src = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    return _image_tensor(_sample(src, (k, 0.0, left, 0.0, k, top), 1.0, 1.0, size))


def to_float_images(x: torch.Tensor) -> torch.Tensor:
    """A uint8 image batch (any device, any memory format) → float32 in [0, 1], same layout;
    float input passes through unchanged."""
    if x.dtype == torch.uint8:
        return x.float().mul_(1 / 255)
    return x


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack 3×H×W images into N×3×H×W with channels_last memory (what the model runs in;
    torch.stack alone would make a contiguous NCHW copy)."""
    return torch.stack([x.permute(1, 2, 0) for x in images]).permute(0, 3, 1, 2)
