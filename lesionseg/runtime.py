"""Exported models as prediction backends: tell an exported file from a checkpoint, read the
metadata it carries, and run it (ONNX files with ONNX Runtime, TorchScript files with torch).

Every backend maps a uint8 (0-255) or float (0-1) RGB batch N×3×H×W (H, W ≥ 32) to
probabilities N×H×W, as the exported graph does: normalization, the pad to a multiple of 32
and the crop back happen inside the file. `lesionseg.export` writes such files.
"""

from __future__ import annotations

import json
import logging
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lesionseg.data.transforms import to_float_images
from lesionseg.errors import UserError, first_line
from lesionseg.model import MIN_SIDE

log = logging.getLogger(__name__)

EXPORT_FORMAT = "lesionseg-export/1"  # metadata["format"] of every file lesionseg exports
METADATA_KEY = "lesionseg"  # ONNX metadata_props key holding the JSON metadata
TORCHSCRIPT_EXTRA = "lesionseg.json"  # TorchScript extra file holding the same JSON
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
FORMATS = ("onnx", "torchscript")
BACKENDS = ("torch", "onnxruntime")
ORT_MISSING = ("ONNX Runtime is not installed; pip install 'lesionseg[export]' "
               "(onnx, onnxruntime)")


class ExportedFileError(UserError):
    """An exported file that cannot be read or run (names the file and why)."""


def export_format(path: str | Path) -> str | None:
    """'onnx' or 'torchscript' for a file lesionseg exported, None for anything else (a
    checkpoint). A TorchScript archive is a zip holding `<name>/extra/lesionseg.json`; a
    checkpoint (torch.save) is a zip without it."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if not path.is_file() or not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as z:
        if any(n.endswith(f"/extra/{TORCHSCRIPT_EXTRA}") for n in z.namelist()):
            return "torchscript"
    return None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata an exported file carries (`lesionseg.export.build_metadata`)."""
    path = Path(path)
    fmt = export_format(path)
    if not path.is_file():
        raise ExportedFileError(f"{path}: exported model file not found")
    try:
        if fmt == "onnx":
            raw = _onnx_metadata(path)
        elif fmt == "torchscript":
            with zipfile.ZipFile(path) as z:
                name = next(n for n in z.namelist() if n.endswith(f"/extra/{TORCHSCRIPT_EXTRA}"))
                raw = z.read(name).decode("utf-8")
        else:
            raise ExportedFileError(f"{path}: not a model exported by lesionseg (.onnx, or a "
                                    "TorchScript file from `lesionseg export`)")
        meta = json.loads(raw) if raw else None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ExportedFileError(f"{path}: unreadable exported model ({first_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ExportedFileError(f"{path}: carries no lesionseg metadata (expected format "
                                f"{EXPORT_FORMAT}); export it with `lesionseg export`")
    return meta


def _onnx_metadata(path: Path) -> str:
    """The JSON string under METADATA_KEY in an ONNX file's metadata_props ('' if absent)."""
    try:
        import onnx
    except ImportError:
        raise ExportedFileError(f"{path}: reading ONNX files needs the onnx package; pip "
                                "install 'lesionseg[export]'") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf decode errors come in several types
        raise ExportedFileError(f"{path}: not a readable ONNX file ({first_line(e)})") from None
    return next((p.value for p in model.metadata_props if p.key == METADATA_KEY), "")


def check_sides(images: torch.Tensor) -> None:
    """The exported graph cannot raise: check the input shape before running it."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected N×3×H×W RGB images, got shape {tuple(images.shape)}")
    if min(images.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"images must be at least {MIN_SIDE}×{MIN_SIDE}, got "
                         f"{images.shape[-2]}×{images.shape[-1]}")


class OnnxBackend:
    """An exported ONNX file in an ONNX Runtime session: CUDA provider when asked for and
    present, else the CPU provider with `threads` intra-op threads (0 = ORT's default)."""

    name = "onnxruntime"
    precision = "fp32"  # the file's (metadata "precision"), set by open_backend

    def __init__(self, path: str | Path, device: str = "cpu", threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportedFileError(f"{path}: {ORT_MISSING}") from None
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # ORT warns about unused initializers; not the user's concern
        # ORT's intra-op threads spin-wait after each run by default: on a CPU they would take
        # the cores from the decode workers and finishing threads between batches.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" in ort.get_available_providers():
                index = int(device.split(":")[1]) if ":" in device else 0
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
            else:
                log.warning("onnxruntime has no CUDA provider here (pip install "
                            "onnxruntime-gpu); running %s on the CPU", path)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise ExportedFileError(f"{path}: ONNX Runtime cannot load it ({first_line(e)})") from None
        self.providers = self.session.get_providers()
        self.device = torch.device("cuda" if self.providers[0].startswith("CUDA") else "cpu")
        kind = self.session.get_inputs()[0].type
        self.input_dtype = torch.uint8 if kind == "tensor(uint8)" else torch.float32

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or float [0, 1] N×3×H×W → float32 probabilities N×H×W (CPU)."""
        check_sides(images)
        x = _as_input(images.cpu(), self.input_dtype)
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x.numpy())})[0]
        return torch.from_numpy(out).float()


class TorchScriptBackend:
    """An exported TorchScript file on a torch device (it takes uint8 and float alike)."""

    name = "torchscript"
    precision = "fp32"

    def __init__(self, path: str | Path, device: str = "cpu", threads: int = 0) -> None:
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if device == "auto" else device))
        try:
            with warnings.catch_warnings():  # torch.jit's deprecation notice, on every load
                warnings.simplefilter("ignore", FutureWarning)
                self.module = torch.jit.load(str(path), map_location=self.device).eval()
        except Exception as e:  # torch.jit raises RuntimeError and friends
            raise ExportedFileError(f"{path}: not a loadable TorchScript file ({first_line(e)})") from None
        self.providers = [str(self.device)]

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_sides(images)
        return self.module(images.to(self.device)).float().cpu()


def _as_input(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The batch in the file's input convention. uint8 → float is exactly what the PyTorch
    path does (`to_float_images`); float → a uint8 file would round, so it is refused."""
    if images.dtype == dtype:
        return images
    if dtype == torch.float32:
        return to_float_images(images).float()
    raise ValueError("this exported file takes uint8 images (0-255); got "
                     f"{images.dtype} (export with --input float for float images)")


def open_backend(path: str | Path, device: str = "cpu",
                 threads: int = 0) -> tuple[OnnxBackend | TorchScriptBackend, dict[str, Any]]:
    """(backend, metadata) of an exported file: ONNX on ONNX Runtime, TorchScript on torch."""
    meta = read_metadata(path)
    backend_type = OnnxBackend if export_format(path) == "onnx" else TorchScriptBackend
    backend = backend_type(path, device, threads)
    backend.precision = str(meta.get("precision", "fp32"))
    return backend, meta
