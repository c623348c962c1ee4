"""Training losses on low-resolution mask logits: Dice, BCE, focal, and the predicted-IoU error."""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("dice_ce", "focal_dice_iou")


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss per object, Nx1xhxw -> N; +1 smoothing so empty masks give 0, not NaN."""
    probs = torch.sigmoid(logits).flatten(1)
    t = targets.flatten(1)
    return 1 - (2 * (probs * t).sum(1) + 1) / (probs.sum(1) + t.sum(1) + 1)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss per object (mean over pixels), Nx1xhxw -> N."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    weight = alpha * targets + (1 - alpha) * (1 - targets)
    return (weight * (1 - p_t) ** gamma * bce).flatten(1).mean(1)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded logits with the targets per object, N (1 when both are empty)."""
    pred = (logits > 0).flatten(1).float()
    t = targets.flatten(1)
    inter = (pred * t).sum(1)
    union = pred.sum(1) + t.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def hard_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice of the thresholded logits per object, N (1 when both are empty)."""
    with torch.no_grad():
        pred = (logits > 0).flatten(1).float()
        t = targets.flatten(1)
        total = pred.sum(1) + t.sum(1)
        return torch.where(total > 0, 2 * (pred * t).sum(1) / total.clamp(min=1), torch.ones_like(total))


def compute_loss(kind: str, logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean loss over N objects. logits, targets: Nx1xhxw; iou_pred: Nx1.

    dice_ce = Dice + BCE; focal_dice_iou = 20 focal + Dice + MSE(predicted IoU, actual IoU).
    """
    logits = logits.float()
    if kind == "dice_ce":
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1)
        return (dice_loss(logits, targets) + bce).mean()
    if kind == "focal_dice_iou":
        iou_mse = (iou_pred.float()[:, 0] - mask_iou(logits, targets).detach()) ** 2
        return (20 * focal_loss(logits, targets) + dice_loss(logits, targets) + iou_mse).mean()
    raise ValueError(f"unknown loss {kind!r}: choose {' or '.join(LOSSES)}")
