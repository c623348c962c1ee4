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
from losses import decoder_targets
from prompts import BOX, POINTS, correction_clicks

# The decoder's masks are at 1/4 of the input frame: a low-res pixel's centre in input pixels.
LOW_RES_SCALE = 4

# choose(round, low_res NxCx(S/4)x(S/4), iou NxC, targets Nx1xhxw, valid 1x1xhxw | None) -> N output indices
Choose = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def with_kind(tensors: sam_model.PromptTensors, kind: int) -> sam_model.PromptTensors:
    """The prompts of objects of one kind (bits ``BOX`` / ``POINTS``): the others dropped."""
    points = bool(kind & POINTS)
    return sam_model.PromptTensors(tensors.boxes if kind & BOX else None, tensors.points if points else None,
                                   tensors.point_labels if points else None, tensors.masks)


def add_clicks(tensors: sam_model.PromptTensors, low_res: torch.Tensor, targets: torch.Tensor,
               valid: torch.Tensor | None = None) -> sam_model.PromptTensors:
    """The next round's prompts: one correction click per object, and ``low_res`` as mask prompt.

    low_res: Nx1x(S/4)x(S/4) logits of the masks chosen this round (the decoder's whole frame);
    targets: Nx1xhxw {0,1} at the input resolution (the valid part of the frame, h, w <= S);
    valid: 1x1xhxw or None. The click is placed on the errors on the decoder's grid (the targets
    area-averaged down to it); points are in the input frame, as ``PromptTensors`` holds them.
    """
    targets = decoder_targets(targets)
    h, w = targets.shape[-2:]
    pred = (low_res[:, 0, :h, :w] > 0).cpu().numpy()
    keep = None if valid is None else decoder_targets(valid)[0, 0].cpu().numpy() > 0.5
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

    embedding: 256x(S/16)x(S/16); targets: Nx1xhxw at the input resolution. After each round ``choose(round, low_res,
    iou, targets, valid)`` (low_res NxCx(S/4)x(S/4) logits, iou NxC; C = 3 for a single click in
    round 0, else 1) does what the caller needs (a loss and its backward pass, or scores) and
    returns the N indices of the outputs the next round continues from.
    """
    for r in range(rounds):
        multimask = r == 0 and tensors.single_click()
        with sam_model.autocast(device, precision):
            low_res, iou = sam_model.decode(sam, embedding, tensors, multimask_output=multimask)
        best = choose(r, low_res, iou, targets, valid)
        if r + 1 < rounds:
            tensors = add_clicks(tensors, sam_model.pick_outputs(low_res.detach(), best), targets, valid)
