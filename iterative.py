"""Iterative prompting, as SAM and micro-sam train: rounds of correction clicks with the previous logits as mask prompt.

Round 1 decodes the given prompts (box, points or both). Each later round adds one click per
object at its largest error region (prompts.correction_clicks: positive in a missed part,
negative in a false positive) and feeds the previous round's low-resolution logits back as the
mask prompt. The image embedding is computed once by the caller and shared by every round; the
mask prompt is detached, so each round's loss can be back-propagated on its own.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import model as sam_model
from losses import hard_dice
from prompts import BOX, POINTS, correction_clicks

# The decoder's masks are at 1/4 of the input frame: a low-res pixel's centre in input pixels.
LOW_RES_SCALE = 4

Choose = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def with_kind(tensors: sam_model.PromptTensors, kind: int) -> sam_model.PromptTensors:
    """The prompts of objects of one kind (bits ``BOX`` / ``POINTS``): the others dropped."""
    points = bool(kind & POINTS)
    return sam_model.PromptTensors(tensors.boxes if kind & BOX else None, tensors.points if points else None,
                                   tensors.point_labels if points else None, tensors.masks)


def single_click(tensors: sam_model.PromptTensors) -> bool:
    """Whether every object is prompted by one positive point and no box or mask: SAM's ambiguous
    case, answered with three masks (negative points may come with it)."""
    if tensors.boxes is not None or tensors.masks is not None or tensors.point_labels is None:
        return False
    return bool(((tensors.point_labels == 1).sum(dim=1) == 1).all())


def add_clicks(tensors: sam_model.PromptTensors, low_res: torch.Tensor, targets: torch.Tensor,
               valid: torch.Tensor | None = None) -> sam_model.PromptTensors:
    """The next round's prompts: one correction click per object, and ``low_res`` as mask prompt.

    low_res: Nx1x(S/4)x(S/4) logits of the masks chosen this round (the decoder's whole frame);
    targets: Nx1xhxw {0,1} (the valid part of the frame, h, w <= S/4); valid: 1x1xhxw or None.
    The click is placed on the errors inside ``hxw``; points are in the input frame, as
    ``PromptTensors`` holds them.
    """
    h, w = targets.shape[-2:]
    pred = (low_res[:, 0, :h, :w] > 0).cpu().numpy()
    keep = None if valid is None else valid[0, 0].cpu().numpy() > 0.5
    xy, labels = correction_clicks(pred, targets[:, 0].cpu().numpy() > 0.5, keep)
    device = low_res.device
    click = torch.from_numpy(xy * LOW_RES_SCALE + (LOW_RES_SCALE - 1) / 2).to(device)[:, None]
    click_labels = torch.from_numpy(labels).to(device)[:, None]
    if tensors.points is not None:
        click = torch.cat([tensors.points, click.to(tensors.points.dtype)], dim=1)
        click_labels = torch.cat([tensors.point_labels, click_labels.to(tensors.point_labels.dtype)], dim=1)
    return sam_model.PromptTensors(tensors.boxes, click, click_labels, low_res.detach().float())


def decode_rounds(sam: nn.Module, embedding: torch.Tensor, tensors: sam_model.PromptTensors, targets: torch.Tensor,
                  valid: torch.Tensor | None, rounds: int, choose: Choose, device: torch.device,
                  precision: str = "fp32") -> None:
    """Decode ``rounds`` rounds of prompts for N objects of one image.

    embedding: 256x(S/16)x(S/16); targets: Nx1xhxw. After each round ``choose(round, low_res,
    iou)`` (low_res NxCx(S/4)x(S/4) logits, iou NxC; C = 3 for a single click in round 0, else
    1) does what the caller needs (a loss and its backward pass, or scores) and returns the N
    indices of the outputs the next round continues from.
    """
    for r in range(rounds):
        multimask = r == 0 and single_click(tensors)
        with sam_model.autocast(device, precision):
            low_res, iou = sam_model.decode(sam, embedding, tensors, multimask_output=multimask)
        best = choose(r, low_res, iou)
        if r + 1 < rounds:
            picked = low_res.detach()[torch.arange(len(best), device=best.device), best][:, None]
            tensors = add_clicks(tensors, picked, targets, valid)


@torch.no_grad()
def round_dice(sam: nn.Module, embedding: torch.Tensor, tensors: sam_model.PromptTensors, targets: torch.Tensor,
               valid: torch.Tensor | None, rounds: int, device: torch.device, precision: str = "fp32") -> list[float]:
    """Mean Dice over N objects after each of ``rounds`` rounds (the first prompt, then each
    correction click), at the decoder's resolution against Nx1xhxw ``targets``.

    The outputs are chosen as the tool segments: by predicted IoU among a single click's three
    masks (losses.hard_dice: an empty target and prediction score 1).
    """
    h, w = targets.shape[-2:]
    dice: list[float] = []  # valid only matters for where clicks go; targets hold no ignored pixels

    def choose(r: int, low_res: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
        best = iou.argmax(dim=1)
        chosen = low_res[torch.arange(len(best), device=best.device), best][:, None, :h, :w]
        dice.append(float(hard_dice(chosen.float(), targets).mean()))
        return best

    decode_rounds(sam, embedding, tensors, targets, valid, rounds, choose, device, precision)
    return dice
