"""The Python API, for notebooks and other tools: segment images with a checkpoint or an
exported file exactly as `jobs/infer.py` does, without its folders and files.

    from lesionseg.api import Segmenter
    seg = Segmenter.load("runs/demo/best.pt")          # or "best.onnx", backend="onnxruntime"
    result = seg.segment("ISIC_0000000.jpg")            # a path, PIL image or numpy array
    result.mask, result.probability                     # original size: uint8 0/255, float32
    result.uncertainty, result.expected_dice, result.needs_review   # lesionseg.quality
    results = seg.segment_batch(list_of_images)

The same objects as the job: `inference.load_predictor` (torch, or an exported file on its
runtime, with flip TTA), the eval transform to the model's size, `inference.full_size_mask`
(bilinear back to the original size, the stored threshold and post-processing), and the
job's quality columns from the members the forward ran (`lesionseg.quality`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from lesionseg.config import Config, InferConfig, validate
from lesionseg.data.images import load_image
from lesionseg.data.transforms import stack_images
from lesionseg.errors import UserError
from lesionseg.infer.outputs import full_size_mask
from lesionseg.infer.predict import Predictor, load_predictor
from lesionseg.infer.refine import decode_side, model_inputs
from lesionseg.inference import applied_postprocess, applied_temperature
from lesionseg.metrics import degenerate_checkpoint
from lesionseg.postprocess import Postprocess
from lesionseg.quality import QualityModel, calibrate, signals

log = logging.getLogger(__name__)

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike, bytes]  # noqa: UP007 (runtime alias)
# An image made ready: (uint8 3×S×S model input, original (h, w), finer copy or None)
Prepared = tuple[torch.Tensor, tuple[int, int], Union[torch.Tensor, None]]  # noqa: UP007


@dataclass(frozen=True)
class Segmentation:
    """One image's result, at the image's original size (H×W)."""

    mask: np.ndarray  # uint8, 255 = lesion, 0 = background (as the job's mask PNGs)
    probability: np.ndarray  # float32 in [0, 1]: the lesion probability per pixel (under the stored temperature)
    threshold: float  # the mask is probability > threshold, then `postprocess`
    postprocess: str  # none, main, fill or main+fill
    uncertainty: float  # the members' border-weighted spread (flip views, TTA) or the uncertain-pixel share
    expected_dice: float  # the Dice the stored quality fit expects of this mask
    needs_review: bool  # expected_dice below the review level, uncertainty above the review share's cut, or the empty-mask fallback's mask

    @property
    def lesion_fraction(self) -> float:
        """Share of the image's pixels in the mask."""
        return float(np.count_nonzero(self.mask)) / self.mask.size


class Segmenter:
    """A loaded model with its image size, threshold and post-processing (`Segmenter.load`)."""

    def __init__(self, predictor: Predictor, image_size: int, post: Postprocess,
                 source: str, quality: QualityModel | None = None,
                 temperature: float = 1.0) -> None:
        self.predictor, self.image_size, self.post, self.source = predictor, image_size, post, source
        self.quality, self.temperature = quality or QualityModel(), temperature

    @classmethod
    def load(cls, path: str | os.PathLike, *, backend: str = "torch", device: str = "auto",
             tta: bool = True, refine: bool = True, refine_max_zoom: float = 0.0,
             threshold: float | None = None, postprocess: str = "auto",
             image_size: int = 0, mixed_precision: str = "auto",
             review_below: float = 0.8, review_share: float = 0.1,
             empty_fallback: float = 0.5) -> Segmenter:
        """A checkpoint (best.pt) or an exported file (.onnx, TorchScript). backend
        "onnxruntime" runs a checkpoint through an ONNX export made on the fly (parity-checked).
        threshold/postprocess default to what validation chose (stored in the file);
        image_size 0 = the model's training size. Threads: torch.set_num_threads(N) before
        loading (ONNX Runtime takes the same number when its session is made). refine and
        refine_max_zoom: the lesion-centred second pass (`lesionseg.infer.refine`; as
        infer.refine and infer.refine_max_zoom). review_below:
        the expected Dice below which a result needs review; review_share: a result also needs
        review when it is more uncertain than all but this share of the val images;
        empty_fallback: a mask with no pixel above the threshold becomes the main region above
        this share of the image's highest probability (0: stays empty)."""
        icfg = InferConfig(backend=backend, device=device, tta=tta, refine=refine,
                           refine_max_zoom=refine_max_zoom, threshold=threshold,
                           postprocess=postprocess, image_size=image_size,
                           mixed_precision=mixed_precision, review_below=review_below,
                           review_share=review_share, empty_fallback=empty_fallback)
        validate(Config(infer=icfg))  # a bad choice is a ConfigError naming infer.<key>
        predictor, cfg, meta = load_predictor(path, icfg, resolve_device(device))
        post, _ = applied_postprocess(icfg, meta)
        degenerate = degenerate_checkpoint(meta)
        if degenerate:  # as the train job's last line, the model card and the infer job say
            log.warning("DEGENERATE CHECKPOINT %s: %s", path, degenerate)
        return cls(predictor, image_size or cfg.data.image_size, post, str(path),
                   QualityModel.from_meta(meta, review_below, review_share),
                   applied_temperature(meta))

    def __repr__(self) -> str:
        return (f"Segmenter({self.source!r}, backend={self.predictor.backend}, "
                f"device={self.predictor.device}, size={self.image_size}, "
                f"threshold={self.post.threshold:g}, postprocess={self.post.name}, "
                f"tta={self.predictor.tta}, refine={self.predictor.refine is not None})")

    def segment(self, image: ImageLike) -> Segmentation:
        """Mask and probability map of one image at its original size."""
        return self.segment_batch([image])[0]

    def segment_batch(self, images: Iterable[ImageLike], batch_size: int = 8) -> list[Segmentation]:
        """Every image of `images`, `batch_size` at a time through the model, in order."""
        results: list[Segmentation] = []
        pending: list[Prepared] = []
        for image in images:
            pending.append(self._prepare(image))
            if len(pending) == batch_size:
                results += self._predict(pending)
                pending = []
        if pending:
            results += self._predict(pending)
        return results

    def _prepare(self, image: ImageLike) -> Prepared:
        """(uint8 3×S×S model input, original (h, w), the finer copy the second pass crops
        from or None) as the job's decode workers make them."""
        refine = self.predictor.refine
        rgb, size = as_rgb(image, decode_side(self.image_size, refine))
        x, fine = model_inputs(rgb, self.image_size, refine)
        return x, size, fine

    def _predict(self, pending: Sequence[Prepared]) -> list[Segmentation]:
        probs, views = self.predictor.predict(stack_images([x for x, _, _ in pending]),
                                              [f for _, _, f in pending])
        # under a temperature the threshold moves with the probabilities: the same mask
        threshold = (self.post.threshold if self.temperature == 1.0 else
                     float(calibrate(np.float32(self.post.threshold), self.temperature)))
        out = []
        for prob, member_views, (_, size, _) in zip(probs, views, pending, strict=True):
            full, mask, fell_back = full_size_mask(prob, size, self.post)
            rated = self.quality.row(signals(member_views, self.post.threshold), fell_back)
            out.append(Segmentation(mask, calibrate(full, self.temperature), threshold,
                                    self.post.name, **rated))
        return out


def resolve_device(setting: str) -> torch.device:
    """auto (CUDA when visible, else the CPU), cpu, cuda or cuda:N (which must be visible)."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {setting}: no CUDA device is visible here; use cpu or auto")
    return device


def as_rgb(image: ImageLike, min_size: int = 0) -> tuple[Image.Image, tuple[int, int]]:
    """(RGB PIL image, original (h, w)). A path or bytes goes through the job's image loader
    (EXIF orientation applied, JPEG decoded at the smallest DCT scale still ≥ min_size); a PIL
    image is used as given; a numpy array is H×W (grey), H×W×3 (RGB) or H×W×4 (alpha
    dropped), uint8 0-255 or float 0-1 (a float array outside 0-1, or with NaN, is refused)."""
    if isinstance(image, str | os.PathLike | bytes):
        name = None if isinstance(image, bytes) else str(image)
        src = image if isinstance(image, bytes) else Path(image)
        return load_image(src, name, min_size=min_size or None)
    if isinstance(image, Image.Image):
        return image.convert("RGB"), (image.height, image.width)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[..., :3]
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
            raise ValueError(f"expected an H×W or H×W×3 image array, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            if not np.issubdtype(arr.dtype, np.floating):
                raise ValueError(f"expected a uint8 (0-255) or float (0-1) array, got {arr.dtype}")
            finite = arr[np.isfinite(arr)]
            if finite.size < arr.size or (finite.size and (finite.min() < -1e-3
                                                           or finite.max() > 1 + 1e-3)):
                # a 0-255 float array read as 0-1 would be a white image, segmented silently
                raise ValueError(
                    "expected a float image array in 0-1, got values "
                    + (f"{finite.min():g} to {finite.max():g}" if finite.size else "")
                    + (" and NaN/inf" if finite.size < arr.size else "")
                    + ": divide a 0-255 array by 255, or pass it as uint8")
            arr = np.clip(np.rint(arr * 255), 0, 255).astype(np.uint8)
        rgb = Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
        return rgb, (rgb.height, rgb.width)
    raise TypeError(f"expected a path, bytes, PIL image or numpy array, got {type(image).__name__}")
