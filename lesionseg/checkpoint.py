"""Weights-only checkpoints (`best.pt`, `last.pt`): the model's state dict, the resolved config
and a little metadata, all plain types so that `torch.load(..., weights_only=True)` opens them.

Full training states (optimizer, scheduler, RNG, data position) are Accelerate's business and
live under `<output_dir>/states/`; these files are what inference and users consume.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lesionseg import __version__
from lesionseg.config import Config, from_dict, to_dict
from lesionseg.errors import UserError, first_line
from lesionseg.files import atomic_write_bytes
from lesionseg.model import MobileNetEncoderDecoder
from lesionseg.weights import torch_load

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


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Config, dict[str, Any]]:
    """Read a checkpoint written by `save_weights`: (state_dict, config, meta)."""
    path = Path(path)
    payload = torch_load(path, CheckpointError, "checkpoint",
                         "not a lesionseg checkpoint; use best.pt or last.pt from a training run",
                         mmap=True)
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
    state_dict, cfg, meta = load_weights(path)
    # Built without initialising weights that the checkpoint overwrites at once (strict: every
    # parameter and buffer): ~8 ms instead of ~35 of the inference job's start-up.
    with _no_weight_init():
        model = MobileNetEncoderDecoder(encoder_weights=None, freeze_encoder=False,
                                        decoder_channels=tuple(cfg.model.decoder_channels),
                                        color_constancy=cfg.model.color_constancy)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model ({first_line(e)})") from None
    return model.eval(), cfg, meta


_INIT_MODULES = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear, torch.nn.BatchNorm2d)
_BUILD_LOCK = threading.Lock()


@contextlib.contextmanager
def _no_weight_init() -> Iterator[None]:
    """While this thread builds a model whose weights are loaded right after (as
    transformers' `no_init_weights`): `torch.nn.init`'s in-place initialisers and the layers'
    `reset_parameters` do nothing *for this thread*, so its parameters keep torch.empty's
    memory; any other thread initialises as always (the stand-ins call the originals there).
    Builds take turns (a lock), so the originals are always the ones restored. Only for a
    strict `load_state_dict` to follow."""
    builder = threading.get_ident()

    def skip(original: Any, returns_first: bool) -> Any:
        def stand_in(first: Any, *args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != builder:
                return original(first, *args, **kwargs)
            return first if returns_first else None
        return stand_in

    init = torch.nn.init
    with _BUILD_LOCK:
        names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_")]
        saved = {n: getattr(init, n) for n in names}
        resets = {m: m.__dict__.get("reset_parameters") for m in _INIT_MODULES}
        try:
            for n in names:
                setattr(init, n, skip(saved[n], returns_first=True))
            for m in _INIT_MODULES:
                m.reset_parameters = skip(m.reset_parameters, returns_first=False)
            yield
        finally:
            for n, f in saved.items():
                setattr(init, n, f)
            for m, f in resets.items():
                if f is None:
                    del m.reset_parameters
                else:
                    m.reset_parameters = f
