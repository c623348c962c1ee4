"""Training losses on mask logits: Dice, BCE, focal, and the predicted-IoU error.

The trainer compares the decoder's logits upsampled to the input resolution with targets at that
resolution (``--loss_resolution input``, as micro-sam); :func:`decoder_targets` gives the
targets at the decoder's 1/4 grid for ``--loss_resolution decoder`` and the correction clicks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("dice_ce", "focal_dice_iou")
LOSS_RESOLUTIONS = ("input", "decoder")
DECODER_SCALE = 4  # the mask decoder's logits are at 1/4 of the input frame


def decoder_targets(targets: torch.Tensor) -> torch.Tensor:
    """Nx1xhxw {0,1} masks at the input resolution -> Nx1x(h/4)x(w/4) float at the decoder's grid
    (sides rounded up): a low-res pixel is foreground when at least half of the input pixels it
    covers are (area average, then 0.5). Objects smaller than about 2x2 input pixels vanish."""
    area = F.avg_pool2d(targets.float(), DECODER_SCALE, ceil_mode=True)
    return (area >= 0.5).to(torch.float32)


def _valid(targets: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(targets) if valid is None else valid.to(targets.dtype).expand_as(targets)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Soft Dice loss per object, Nx1xhxw -> N, over the ``valid`` pixels (Nx1xhxw or 1x1xhxw,
    1 = counts; None = all); +1 smoothing so empty masks give 0, not NaN."""
    v = _valid(targets, valid).flatten(1)
    probs = torch.sigmoid(logits).flatten(1) * v
    t = targets.flatten(1) * v
    return 1 - (2 * (probs * t).sum(1) + 1) / (probs.sum(1) + t.sum(1) + 1)


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy per object (mean over the valid pixels), Nx1xhxw -> N."""
    v = _valid(targets, valid)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * v
    return bce.flatten(1).sum(1) / v.flatten(1).sum(1).clamp(min=1)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None,
               alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss per object (mean over the valid pixels), Nx1xhxw -> N."""
    v = _valid(targets, valid)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    weight = alpha * targets + (1 - alpha) * (1 - targets)
    return (weight * (1 - p_t) ** gamma * bce * v).flatten(1).sum(1) / v.flatten(1).sum(1).clamp(min=1)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """IoU of the thresholded logits with the targets per object over the valid pixels, N (1
    when both are empty)."""
    v = _valid(targets, valid).flatten(1)
    pred = (logits > 0).flatten(1).float() * v
    t = targets.flatten(1) * v
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


def object_losses(kind: str, logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor,
                  valid: torch.Tensor | None = None, iou_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss per object and the output it was taken from: ``(N losses, N indices in 0..C-1)``.

    logits: NxCxhxw (C = 1, or SAM's 3 masks for an ambiguous single click); iou_pred: NxC;
    targets: Nx1xhxw; ``valid``: the pixels that count (ignored regions 0), Nx1xhxw / 1x1xhxw or
    None. The mask loss is the best (lowest) of the C outputs, as SAM trains its multimask output;
    dice_ce = Dice + BCE, focal_dice_iou = 20 focal + Dice (finestSAM's weights). Both add
    ``iou_weight`` x the mean over the C outputs of MSE(predicted IoU, that mask's actual IoU), so
    the IoU head, which ranks overlapping masks in every command, learns too (as in SAM).
    """
    logits = logits.float()
    n, c = logits.shape[:2]
    flat = logits.reshape(n * c, 1, *logits.shape[-2:])
    wide = targets.repeat_interleave(c, dim=0)
    valid_wide = valid if valid is None or valid.shape[0] == 1 else valid.repeat_interleave(c, dim=0)
    if kind == "dice_ce":
        mask = dice_loss(flat, wide, valid_wide) + bce_loss(flat, wide, valid_wide)
    elif kind == "focal_dice_iou":
        mask = 20 * focal_loss(flat, wide, valid_wide) + dice_loss(flat, wide, valid_wide)
    else:
        raise ValueError(f"unknown loss {kind!r}: choose {' or '.join(LOSSES)}")
    mask = mask.reshape(n, c)
    best = mask.detach().argmin(dim=1)
    true_iou = mask_iou(flat, wide, valid_wide).reshape(n, c).detach()
    iou_mse = ((iou_pred.float().reshape(n, c) - true_iou) ** 2).mean(dim=1)
    return mask[torch.arange(n, device=mask.device), best] + iou_weight * iou_mse, best


def compute_loss(kind: str, logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor,
                 valid: torch.Tensor | None = None, iou_weight: float = 1.0) -> torch.Tensor:
    """The mean over N objects of :func:`object_losses` (same arguments)."""
    return object_losses(kind, logits, iou_pred, targets, valid, iou_weight)[0].mean()
