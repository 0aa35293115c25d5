"""Weights-only checkpoints (`best.pt`, `last.pt`): the model's state dict, the resolved config
and a little metadata, all plain types so that `torch.load(..., weights_only=True)` opens them.

Full training states (optimizer, scheduler, RNG, data position) are Accelerate's business and
live under `<output_dir>/states/`; these files are what inference and users consume.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from lesionseg import __version__
from lesionseg.config import Config, from_dict, to_dict
from lesionseg.errors import UserError, first_line
from lesionseg.files import atomic_write_bytes

# /2: the decoder with separable high-resolution stages and a transposed-conv logit head
# (lesionseg 0.2); /1 files hold the earlier decoder, whose weights do not fit.
FORMAT = "lesionseg-checkpoint/2"
OLDER_FORMATS = ("lesionseg-checkpoint/1",)


class CheckpointError(UserError):
    """A checkpoint file that is missing, unreadable or not a lesionseg checkpoint."""


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], cfg: Config,
                 **meta: Any) -> Path:
    """Write a weights-only checkpoint atomically. `meta` holds plain values (step, epoch, metrics)."""
    payload = {
        "format": FORMAT,
        "lesionseg_version": __version__,
        "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
        "config": to_dict(cfg),
        "meta": meta,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue())


def torch_load(path: Path, error: type[UserError], missing: str, unreadable: str) -> Any:
    """`torch.load(path, weights_only=True)` onto the CPU; a missing file raises
    error("<path>: <missing> file not found"), a folder says so, and an unreadable file raises
    error("<path>: <unreadable> (<reason>)") — never torch's advice to load it unsafely."""
    if path.is_dir():
        hint = next((f"; did you mean {path / n}?" for n in ("best.pt", "last.pt")
                     if (path / n).is_file()), "")
        raise error(f"{path}: is a folder, not a {missing} file{hint}")
    if not path.is_file():
        raise error(f"{path}: {missing} file not found")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors come in many types
        raise error(f"{path}: {unreadable} ({_load_failure(e)})") from None


def _load_failure(e: BaseException) -> str:
    """Why torch.load failed, in our words. torch's weights-only message advises re-running
    with weights_only=False, which would run whatever code the file holds: never pass that on."""
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
        return ("not a weights-only PyTorch file: another program's file, a pickled object "
                "or a damaged download")
    return re.sub(r"\x1b\[[0-9;]*m", "", first_line(e))


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Config, dict[str, Any]]:
    """Read a checkpoint written by `save_weights`: (state_dict, config, meta)."""
    path = Path(path)
    payload = torch_load(path, CheckpointError, "checkpoint",
                         "not a lesionseg checkpoint; use best.pt or last.pt from a training run")
    if isinstance(payload, dict) and payload.get("format") in OLDER_FORMATS:
        raise CheckpointError(
            f"{path}: written by lesionseg {payload.get('lesionseg_version', '< 0.2')} "
            f"({payload['format']}), whose decoder differs from this version's; retrain, or "
            "use its encoder alone with model.encoder_weights=<this file>")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a lesionseg checkpoint (expected format {FORMAT}); "
                              "use best.pt or last.pt from a training run folder")
    return payload["state_dict"], from_dict(payload["config"]), dict(payload.get("meta", {}))


def build_model_from_checkpoint(path: str | Path) -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """The model a checkpoint describes, with its weights loaded (on the CPU, in eval mode)."""
    from lesionseg.model import MobileNetEncoderDecoder

    state_dict, cfg, meta = load_weights(path)
    model = MobileNetEncoderDecoder(encoder_weights=None, freeze_encoder=False,
                                    decoder_channels=tuple(cfg.model.decoder_channels))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model ({first_line(e)})") from None
    return model.eval(), cfg, meta
