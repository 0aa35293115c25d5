"""Weights-only checkpoints (`best.pt`, `last.pt`): the model's state dict, the resolved config
and a little metadata, all plain types so that `torch.load(..., weights_only=True)` opens them.

Full training states (optimizer, scheduler, RNG, data position) are Accelerate's business and
live under `<output_dir>/states/`; these files are what inference and users consume.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from lesionseg import __version__
from lesionseg.config import Config, from_dict, to_dict
from lesionseg.errors import UserError
from lesionseg.files import atomic_write_bytes

FORMAT = "lesionseg-checkpoint/1"


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


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Config, dict[str, Any]]:
    """Read a checkpoint written by `save_weights`: (state_dict, config, meta)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors come in many types
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0]})") from None
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
        raise CheckpointError(f"{path}: weights do not fit the model ({str(e).splitlines()[0]})") from None
    return model.eval(), cfg, meta
