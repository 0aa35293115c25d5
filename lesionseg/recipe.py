"""The training recipe that configures itself from what it is given.

Every recipe key left at `null` ("auto") is chosen here from the encoder's weights (random,
ImageNet or a file), the schedule's length in epochs and the image size, and the start-up log
line says what was chosen and why (`Recipe.describe`). A value the user set is never changed.

Why these rules (measured on the hard synthetic set with `jobs/bench.py accuracy`'s pieces, or
taken from published recipes; the README's "Training recipe" section has the numbers):
- A random encoder learns at the decoder's rate: a 0.1× encoder rate is for pretrained weights
  (discriminative fine-tuning, as ULMFiT and fastai do it); on a random encoder it cost 15
  points of Dice in 12 epochs at 128². Pretrained encoders keep 0.1×.
- Peak learning rate: 3e-3 for a random network (the plain script's OneCycle peak; 1e-3 with
  a 50-step warm-up cost 6.5 points), 1e-3 with a pretrained encoder (the decoder's rate; the
  encoder then gets 1e-4, the usual AdamW fine-tuning rate of the light ISIC models).
- Warm-up: 5% of the steps (at least 5, at most 100): a fixed 50 was a third of a 12-epoch run.
- Augmentation follows the schedule: a short schedule cannot fit heavy augmentation (on the
  CEO's hard set it cost 3-9 points of Dice in 12 epochs; on ours it was within the seed
  noise), a long one needs it against over-fitting (ISIC challenge winners and nnU-Net train
  hundreds of epochs with rotation, scaling and colour changes).
  Under 25 epochs: flips only (a crop of the whole image: exactly what eval sees); 25 to 60:
  zoom down to half the area, ±15° rotation, 0.25 colour jitter and a 0.2 colour cast (tint);
  60 and more: zoom down to 0.35 of the area, ±30°, 0.25 jitter, 0.2 tint.
- Colour: on the 289 real ISIC 2016 test images (711 real training pairs, 128², 30 epochs,
  random encoder, seeds 0 and 1) jitter 0.25 with tint 0.2, against the former 0.1 jitter
  and no tint, raised the mean Dice from 0.9168 to 0.9219 and the worst tenth's mean from
  0.719 to 0.751 (docs/BENCHMARKS.md); the strong level's values were not measured apart.
  The medium level's zoom and rotation measured neither gain nor loss there (two seeds
  without them: 0.9221 and 0.751); the strong level's zoom and rotation lost 0.9 points
  (one seed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lesionseg.config import Config

# (epochs below which it applies, name, scale_min, rotate_degrees, color_jitter, tint)
AUGMENTATION_LEVELS = (
    (25, "light", 1.0, 0.0, 0.0, 0.0),
    (60, "medium", 0.5, 15.0, 0.25, 0.2),
    (None, "strong", 0.35, 30.0, 0.25, 0.2),
)
RANDOM_LR, PRETRAINED_LR = 3e-3, 1e-3
PRETRAINED_ENCODER_LR_MULT = 0.1
WARMUP_FRACTION, WARMUP_MIN, WARMUP_MAX = 0.05, 5, 100


@dataclass
class Recipe:
    """What `resolve` chose: key → (value, reason), in the order chosen."""

    choices: dict[str, tuple[object, str]] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: 'key=value (reason); …', or a note that everything was set by hand."""
        if not self.choices:
            return "every recipe key set explicitly"
        return "; ".join(f"{k}={v} ({why})" for k, (v, why) in self.choices.items())


def encoder_kind(cfg: Config) -> str:
    """'whole-model' (model.init_from), else 'random', 'imagenet' or 'file' for
    model.encoder_weights."""
    if cfg.model.init_from:
        return "whole-model"
    weights = cfg.model.encoder_weights
    if weights is None:
        return "random"
    return "imagenet" if str(weights) == "imagenet" else "file"


def resolve(cfg: Config, total_steps: int, steps_per_epoch: int) -> Recipe:
    """Fill every `null` recipe key of `cfg` in place; returns what was chosen and why."""
    recipe = Recipe()
    o, d = cfg.optim, cfg.data
    kind = encoder_kind(cfg)
    pretrained = kind != "random"

    def choose(section: object, key: str, value: object, why: str) -> None:
        if getattr(section, key) is None:
            setattr(section, key, value)
            prefix = "optim" if section is o else "data"
            recipe.choices[f"{prefix}.{key}"] = (value, why)

    choose(o, "lr", PRETRAINED_LR if pretrained else RANDOM_LR, f"{kind} encoder")
    if cfg.model.freeze_encoder and not cfg.model.unfreeze_after_epochs:
        choose(o, "encoder_lr_mult", 0.0, "encoder frozen")
    else:
        choose(o, "encoder_lr_mult", PRETRAINED_ENCODER_LR_MULT if pretrained else 1.0,
               f"{kind} encoder: " + ("fine-tune gently" if pretrained
                                      else "it learns from scratch like the decoder"))
    warmup = min(WARMUP_MAX, max(WARMUP_MIN, round(WARMUP_FRACTION * total_steps)))
    choose(o, "warmup_steps", min(warmup, max(0, total_steps - 1)),
           f"5% of {total_steps} steps")
    epochs = total_steps / max(1, steps_per_epoch)
    for limit, name, scale_min, rotate, jitter, tint in AUGMENTATION_LEVELS:
        if limit is None or epochs < limit:
            why = f"{name} augmentation for {epochs:.0f} epochs"
            choose(d, "scale_min", scale_min, why)
            choose(d, "rotate_degrees", rotate, why)
            choose(d, "color_jitter", jitter, why)
            choose(d, "tint", tint, why)
            break
    return recipe
