"""Reading weights files: `torch_load` (weights-only, errors in our words) and the encoder's
pretrained weights (`load_encoder_weights`: "imagenet" from torchvision's cache, or a local
state-dict file). Anything that cannot be loaded is a `WeightsError`, never a silent random
initialization. Checkpoints of whole runs (best.pt, last.pt) are lesionseg.checkpoint's.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import pickle
import re
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import MobileNet_V2_Weights

from lesionseg.errors import UserError, first_line

log = logging.getLogger(__name__)

ALLOW_DOWNLOAD_ENV = "LESIONSEG_ALLOW_DOWNLOAD"


class WeightsError(UserError):
    """Encoder weights that cannot be had: not cached, missing, unreadable or not fitting."""

    shared = True  # every rank reads the same file



def torch_load(path: Path, error: type[UserError], missing: str, unreadable: str,
               mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` onto the CPU (`mmap`, for checkpoints: memory-
    mapped, and through `load_plain_tensors` first, which allows less and is twice as fast);
    a missing file raises error("<path>: <missing> file not found"), a folder says so, and an
    unreadable file raises error("<path>: <unreadable> (<reason>)") — never torch's advice to
    load it unsafely."""
    if path.is_dir():
        hint = next((f"; did you mean {path / n}?" for n in ("best.pt", "last.pt")
                     if (path / n).is_file()), "")
        raise error(f"{path}: is a folder, not a {missing} file{hint}")
    if not path.is_file():
        raise error(f"{path}: {missing} file not found")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore")
            if mmap:  # tensors read from the mapped file (zip format only; else read in full)
                with contextlib.suppress(Exception):  # anything else: torch's own weights-only
                    return load_plain_tensors(path)
                with contextlib.suppress(RuntimeError):
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors come in many types
        raise error(f"{path}: {unreadable} ({_load_failure(e)})") from None


class _PlainTensorsUnpickler(pickle.Unpickler):
    """Python's C unpickler allowing only what a state dict of plain tensors names: tensors
    (`torch._utils._rebuild_tensor_v2`, with torch's storage types, which torch resolves
    itself) and `collections.OrderedDict`. Any other name is refused, so no code a file
    names can run: a subset of what torch's weights-only unpickler allows."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        raise pickle.UnpicklingError(f"{module}.{name} is not a plain tensor or container")


# torch.load reads `Unpickler` (and the name) of the pickle module it is given.
_PLAIN_TENSORS_PICKLE = types.ModuleType("lesionseg_plain_tensors_pickle")
_PLAIN_TENSORS_PICKLE.Unpickler = _PlainTensorsUnpickler


def load_plain_tensors(path: Path) -> Any:
    """A zip-format torch.save file of plain tensors in plain containers (what
    `checkpoint.save_weights` writes), memory-mapped, through `_PlainTensorsUnpickler`: in C,
    where weights_only=True unpickles in Python (the README's bench section has the times).
    Raises for anything else (torch_load then uses weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True,
                      pickle_module=_PLAIN_TENSORS_PICKLE)


def _load_failure(e: BaseException) -> str:
    """Why torch.load failed, in our words. torch's weights-only message advises re-running
    with weights_only=False, which would run whatever code the file holds: never pass that on."""
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
        return ("not a weights-only PyTorch file: another program's file, a pickled object "
                "or a damaged download")
    return re.sub(r"\x1b\[[0-9;]*m", "", first_line(e))


def imagenet_cache_path() -> Path:
    """Where torchvision keeps the IMAGENET1K_V2 MobileNetV2 weights (honours TORCH_HOME)."""
    url = MobileNet_V2_Weights.IMAGENET1K_V2.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def check_encoder_weights(source: str | os.PathLike | None) -> None:
    """Before any process, worker or decode starts: the encoder weights a config names can be
    read (`load_encoder_weights` later checks that they fit the encoder)."""
    if source is None:
        return
    if str(source) == "imagenet":
        if imagenet_cache_path().is_file() or os.environ.get(ALLOW_DOWNLOAD_ENV) == "1":
            return
        _imagenet_state_dict()  # raises the WeightsError that says what to do
    else:
        _read_state_dict(Path(source).expanduser())


def load_encoder_weights(encoder: nn.Module, source: str | os.PathLike) -> None:
    """Load `"imagenet"` or a state-dict file into a `MobileNetEncoder` (lesionseg.model);
    any failure is a WeightsError."""
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


def _load_into(encoder: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
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
