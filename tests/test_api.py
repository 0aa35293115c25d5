"""lesionseg.api: Segmenter on checkpoints and exported files, at the original size, with the
stored threshold and post-processing, the same masks as the infer job."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_POSTPROCESS, TINY_SIZE
from PIL import Image

from lesionseg.api import Segmenter, as_rgb
from lesionseg.cli import main
from lesionseg.config import ConfigError
from lesionseg.export import export_model


@pytest.fixture(scope="module")
def job_out(tiny_checkpoint: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The infer job's output folder for the tiny cases (torch backend, defaults but fp32)."""
    out = tmp_path_factory.mktemp("api_job") / "out"
    assert main(["infer", "--checkpoint", str(tiny_checkpoint["ckpt"]), "--input",
                 str(tiny_checkpoint["images"]), "--out", str(out), "--workers", "0",
                 "--no-report", "--splits", "train", "infer.num_threads=1",
                 "infer.mixed_precision=no"]) == 0
    return out


@pytest.fixture(scope="module")
def job_masks(job_out: Path) -> dict:
    """The infer job's masks for the tiny cases."""
    return {p.name.removesuffix("_Segmentation.png"): np.asarray(Image.open(p))
            for p in (job_out / "masks").glob("*.png")}


@pytest.fixture(scope="module")
def segmenter(tiny_checkpoint: dict) -> Segmenter:
    # fp32: the exact comparisons below (batch = singles, onnxruntime) are about the API, and
    # `auto` is bf16 on a CPU with bf16 hardware.
    return Segmenter.load(tiny_checkpoint["ckpt"], device="cpu", mixed_precision="no")


def images_of(data: dict) -> list[Path]:
    return sorted(data["images"].glob("*.jpg"))


def test_load_uses_the_stored_choice(segmenter: Segmenter) -> None:
    assert segmenter.image_size == TINY_SIZE
    assert segmenter.post.threshold == TINY_POSTPROCESS["threshold"]
    assert segmenter.post.name == "main" and segmenter.predictor.tta
    assert "backend=torch" in repr(segmenter)


def test_segment_path_at_original_size_equals_the_job(segmenter: Segmenter, job_masks: dict,
                                                     tiny_checkpoint: dict) -> None:
    for path in images_of(tiny_checkpoint):
        result = segmenter.segment(path)
        w, h = Image.open(path).size
        assert result.mask.shape == result.probability.shape == (h, w)
        assert result.mask.dtype == np.uint8 and set(np.unique(result.mask)) <= {0, 255}
        assert result.probability.dtype == np.float32
        assert result.probability.min() >= 0 and result.probability.max() <= 1
        assert np.array_equal(result.mask, job_masks[path.stem]), path.name
        # the mask is the stored rule applied to the returned probabilities
        assert result.threshold == 0.45 and result.postprocess == "main"
        assert not np.any(result.mask[result.probability <= 0.45])


def test_quality_columns_equal_the_job(segmenter: Segmenter, job_out: Path,
                                      tiny_checkpoint: dict) -> None:
    """uncertainty, expected_dice and needs_review as the job's metrics.csv has them (up to a
    pixel of the 64² views flipping: the job's batches are larger than one image)."""
    with open(job_out / "metrics.csv", newline="") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    for path in images_of(tiny_checkpoint):
        result, row = segmenter.segment(path), rows[path.stem]
        assert result.uncertainty == pytest.approx(float(row["uncertainty"]), abs=2e-3)
        assert result.expected_dice == pytest.approx(float(row["expected_dice"]), abs=2e-3)
        assert str(result.needs_review) == row["needs_review"]


def test_pil_numpy_and_path_agree_and_batch_equals_singles(segmenter: Segmenter,
                                                           tiny_checkpoint: dict) -> None:
    paths = images_of(tiny_checkpoint)
    pil = [Image.open(p).convert("RGB") for p in paths]
    arrays = [np.asarray(im) for im in pil]
    singles = [segmenter.segment(p) for p in paths]
    batch = segmenter.segment_batch([paths[0], pil[1], arrays[2], arrays[3] / 255.0, paths[4]],
                                    batch_size=2)
    assert len(batch) == len(paths)
    for one, many in zip(singles, batch, strict=True):
        assert np.array_equal(one.mask, many.mask)
        assert np.abs(one.probability - many.probability).max() <= 1e-5


def test_exported_file_and_onnxruntime_backend_give_the_same_masks(
        segmenter: Segmenter, tiny_checkpoint: dict, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    onnx_file = export_model(tiny_checkpoint["ckpt"], tmp_path / "m.onnx", write_card=False).path
    loaded = [Segmenter.load(onnx_file), Segmenter.load(tiny_checkpoint["ckpt"],
                                                         backend="onnxruntime")]
    for other in loaded:
        assert other.predictor.backend == "onnxruntime"
        assert other.post == segmenter.post and other.image_size == segmenter.image_size
        for path in images_of(tiny_checkpoint):
            a, b = segmenter.segment(path), other.segment(path)
            assert (a.mask == b.mask).mean() >= 0.9999
            assert np.abs(a.probability - b.probability).max() <= 1e-4


def test_overrides_and_errors(tiny_checkpoint: dict) -> None:
    seg = Segmenter.load(tiny_checkpoint["ckpt"], threshold=0.99, postprocess="none", tta=False,
                         empty_fallback=0)
    path = images_of(tiny_checkpoint)[0]
    result = seg.segment(path)
    assert result.threshold == 0.99 and result.postprocess == "none"
    assert np.array_equal(result.mask > 0, result.probability > np.float32(0.99))
    # nothing passes 0.99 in the tiny model: by default the most confident region instead
    assert not result.mask.any()
    fallback = Segmenter.load(tiny_checkpoint["ckpt"], threshold=0.99, postprocess="none",
                              tta=False).segment(path)
    top = fallback.probability.max()
    assert fallback.mask.any() and fallback.probability[fallback.mask > 0].min() > 0.5 * top
    assert fallback.needs_review  # a guess: the model found no lesion at the threshold
    with pytest.raises(ConfigError, match="infer.backend"):
        Segmenter.load(tiny_checkpoint["ckpt"], backend="tensorrt")
    with pytest.raises(ValueError, match="H×W"):
        as_rgb(np.zeros((4, 4, 2), np.uint8))
    # a 0-255 float array (what np.asarray(img, float) gives) is refused, not read as white
    with pytest.raises(ValueError, match="in 0-1, got values 0 to 255: divide"):
        as_rgb(np.array([[0.0, 255.0]]))
    with pytest.raises(ValueError, match="NaN"):
        as_rgb(np.array([[0.0, np.nan]]))
    assert as_rgb(np.array([[0.0, 1.0]]))[0].getpixel((1, 0)) == (255, 255, 255)
    with pytest.raises(TypeError):
        as_rgb(42)  # type: ignore[arg-type]
