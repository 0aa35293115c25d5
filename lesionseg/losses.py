"""Weighted BCE + (1 − soft Dice) + (1 − soft IoU), the training loss.

Always computed in fp32 (autocast is switched off inside and the inputs are cast), because
sums over hundreds of thousands of pixels lose too much in bf16/fp16. A denominator floor keeps
values and gradients finite on empty and all-lesion masks even with smooth = 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Floor of the soft Dice/IoU denominators: only matters when smooth = 0 and both masks are empty.
_EPS = 1e-7


class SegmentationLoss(nn.Module):
    """`loss(logits, target) -> (total, {"bce", "dice", "iou"})`, target N×1×H×W in {0, 1}.

    The components are the unweighted BCE, 1 − Dice and 1 − IoU, detached, for logging; the
    total is `bce_weight·bce + dice_weight·(1 − dice) + iou_weight·(1 − iou)`. Dice and IoU are
    computed per image and averaged over the batch (`per_image=True`) or over the batch's pixels
    as one region (`per_image=False`). `pos_weight` weighs lesion pixels in the BCE.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, iou_weight: float = 1.0,
                 smooth: float = 1.0, per_image: bool = True,
                 pos_weight: float | None = None) -> None:
        super().__init__()
        if min(bce_weight, dice_weight, iou_weight) < 0 or smooth < 0:
            raise ValueError("loss weights and smooth must be >= 0")
        if pos_weight is not None and pos_weight <= 0:
            raise ValueError(f"pos_weight must be > 0, got {pos_weight}")
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        self.iou_weight = float(iou_weight)
        self.smooth = float(smooth)
        self.per_image = bool(per_image)
        self.pos_weight = None if pos_weight is None else float(pos_weight)

    def forward(self, logits: torch.Tensor,
                target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted total (scalar, fp32) and the three unweighted components."""
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} "
                             "must have the same shape")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits, target = logits.float(), target.float()
            bce = self._bce(logits, target)
            dice, iou = soft_dice_iou(logits, target, self.smooth, self.per_image)
            total = (self.bce_weight * bce + self.dice_weight * (1 - dice)
                     + self.iou_weight * (1 - iou))
        parts = {"bce": bce.detach(), "dice": (1 - dice).detach(), "iou": (1 - iou).detach()}
        return total, parts

    def _bce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean binary cross-entropy over all pixels, lesion pixels weighted by pos_weight."""
        pos_weight = None
        if self.pos_weight is not None:
            pos_weight = torch.tensor(self.pos_weight, dtype=logits.dtype, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)


def soft_dice_iou(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
                  per_image: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft Dice and IoU of sigmoid(logits) against target, batch-averaged scalars.

    Dice = (2·Σpt + s) / (Σp + Σt + s), IoU = (Σpt + s) / (Σp + Σt − Σpt + s), sums per image
    (then a mean over images) or over the whole batch.
    """
    prob = torch.sigmoid(logits)
    n = logits.shape[0] if per_image else 1
    prob, target = prob.reshape(n, -1), target.reshape(n, -1)
    inter = (prob * target).sum(dim=1)
    total = prob.sum(dim=1) + target.sum(dim=1)
    dice = (2 * inter + smooth) / (total + smooth).clamp_min(_EPS)
    iou = (inter + smooth) / (total - inter + smooth).clamp_min(_EPS)
    return dice.mean(), iou.mean()
