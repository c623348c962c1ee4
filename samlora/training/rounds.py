"""Iterative prompting, as micro-sam trains: rounds of random correction clicks, the previous logits sometimes fed back.

Round 1 decodes the given prompts (box, points or both). Each later round adds, per object, one
positive point drawn at random from its missed pixels and one negative point from its false
positives (:func:`sample_clicks`, at the input resolution: the low-resolution logits upsampled
to the input frame, the masks resized to it), and feeds the previous round's low-resolution
logits back as the mask prompt with probability ``MASK_PROB`` (0.5), as micro-sam's
``IterativePromptGenerator`` and ``SamTrainer`` do. A round continues from the output with the
highest *predicted* IoU (a single click's three masks), as the tool segments. The image
embedding is computed once by the caller and shared by every round; the mask prompt is
detached, so each round's loss can be back-propagated on its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samlora.data.prompts import BOX, POINTS
from samlora.models import sam as sam_model

# The decoder's masks are at 1/4 of the input frame.
LOW_RES_SCALE = 4
MASK_PROB = 0.5  # micro-sam's mask_prob: how often a later round is given the previous logits

# choose(round, low_res NxCx(S/4)x(S/4), iou NxC, targets, valid): a round's loss or scores
Choose = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], object]


@dataclass
class Clicks:
    """Where the correction clicks of N objects come from (input frame), with their random draws.

    masks: Nx1xhxw bool object masks at the input size (the resized image, without padding);
    valid: 1x1xhxw bool of the pixels clicks may go to (ignored regions False), or None = all;
    draws: Nx(R-1)x2 uniforms in [0, 1) placing each later round's positive and negative click;
    feed: R-1 bool, whether each later round is given the previous logits as mask prompt (per
    image, as micro-sam's ``mask_prob``). Drawn once per image (:func:`make_clicks`), so decoding
    the objects in chunks changes nothing.
    """

    masks: torch.Tensor
    valid: torch.Tensor | None
    draws: torch.Tensor
    feed: torch.Tensor

    def select(self, rows: slice) -> "Clicks":
        """The clicks of the objects in ``rows``."""
        return Clicks(self.masks[rows], self.valid, self.draws[rows], self.feed)


def input_frame_masks(masks: np.ndarray, input_size: tuple[int, int]) -> torch.Tensor:
    """NxHxW bool masks in the image's pixel frame -> Nx1xhxw bool at the input size (nearest)."""
    tensor = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8))[:, None].float()
    if tuple(tensor.shape[-2:]) != tuple(input_size):
        tensor = F.interpolate(tensor, size=tuple(input_size), mode="nearest-exact")
    return tensor > 0.5


def make_clicks(masks: np.ndarray, ignore: np.ndarray | None, input_size: tuple[int, int], rounds: int,
                device: torch.device, mask_prob: float = MASK_PROB,
                generator: torch.Generator | None = None) -> Clicks:
    """:class:`Clicks` for ``rounds`` rounds of one image's NxHxW target masks and HxW ``ignore``
    (or None), on ``device``; the draws come from ``generator`` (CPU; None: torch's global one)."""
    later = max(rounds - 1, 0)
    draws = torch.rand(len(masks), later, 2, generator=generator)
    feed = torch.rand(later, generator=generator) < mask_prob
    valid = None if ignore is None else ~input_frame_masks(np.asarray(ignore)[None], input_size).to(device)
    return Clicks(input_frame_masks(masks, input_size).to(device), valid, draws.to(device), feed)


def with_kind(tensors: sam_model.PromptTensors, kind: int) -> sam_model.PromptTensors:
    """The prompts of objects of one kind (bits ``BOX`` / ``POINTS``): the others dropped."""
    points = bool(kind & POINTS)
    return sam_model.PromptTensors(tensors.boxes if kind & BOX else None, tensors.points if points else None,
                                   tensors.point_labels if points else None, tensors.masks)


def _random_pixels(region: torch.Tensor, draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NxHxW bool and N uniforms in [0, 1) -> (N flat indices of a uniformly chosen pixel of each
    region, N bool: the region is not empty)."""
    flat = region.flatten(1)
    count = flat.sum(dim=1)
    rank = torch.minimum((draws.to(flat.device) * count).long(), (count - 1).clamp(min=0))
    index = (flat.to(torch.int32).cumsum(dim=1, dtype=torch.int32) > rank[:, None]).to(torch.uint8).argmax(dim=1)
    return index, count > 0


def sample_clicks(pred: torch.Tensor, truth: torch.Tensor, draws: torch.Tensor,
                  valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One positive and one negative correction click per object, drawn as micro-sam draws them.

    pred, truth: NxHxW bool; draws: Nx2 uniforms in [0, 1) (positive, negative); valid: HxW bool
    of the pixels that count, or None. The positive point is a uniformly random missed pixel
    (``truth & ~pred``), else one of the found ones; the negative point a random false positive
    (``pred & ~truth``), else a random background pixel. Returns (Nx2x2 float32 ``(x, y)``
    pixels, Nx2 int32 labels ``[1, 0]``); a point with nowhere to go is labelled -1, a padding
    point the prompt encoder ignores.
    """
    inside, outside = truth, ~truth
    if valid is not None:
        inside, outside = truth & valid, outside & valid
    width = truth.shape[-1]
    xy, labels = [], []
    for column, (label, first, fallback) in enumerate(((1, inside & ~pred, inside), (0, outside & pred, outside))):
        has_first = first.flatten(1).any(dim=1)
        index, found = _random_pixels(torch.where(has_first[:, None, None], first, fallback), draws[:, column])
        xy.append(torch.stack([index % width, index // width], dim=1).float())
        labels.append(torch.where(found, label, -1).to(torch.int32))
    return torch.stack(xy, dim=1), torch.stack(labels, dim=1)


def add_clicks(tensors: sam_model.PromptTensors, low_res: torch.Tensor, clicks: Clicks,
               later: int = 0) -> sam_model.PromptTensors:
    """The prompts of later round ``later`` (0: the second round): a positive and a negative
    click per object (:func:`sample_clicks` on ``low_res`` upsampled to the input frame), and
    ``low_res`` as mask prompt when ``clicks.feed[later]``.

    low_res: Nx1x(S/4)x(S/4) logits of the masks chosen this round (the decoder's whole frame);
    points are in the input frame, as ``PromptTensors`` holds them.
    """
    side = low_res.shape[-1] * LOW_RES_SCALE
    h, w = clicks.masks.shape[-2:]
    with torch.no_grad():
        up = F.interpolate(low_res.detach().float(), (side, side), mode="bilinear", align_corners=False)
    valid = None if clicks.valid is None else clicks.valid[0, 0]
    xy, labels = sample_clicks(up[:, 0, :h, :w] > 0, clicks.masks[:, 0], clicks.draws[:, later], valid)
    points, point_labels = xy.to(low_res.device), labels.to(low_res.device)
    if tensors.points is not None:
        points = torch.cat([tensors.points, points.to(tensors.points.dtype)], dim=1)
        point_labels = torch.cat([tensors.point_labels, point_labels.to(tensors.point_labels.dtype)], dim=1)
    masks = low_res.detach().float() if bool(clicks.feed[later]) else None
    return sam_model.PromptTensors(tensors.boxes, points, point_labels, masks)


def decode_rounds(sam: nn.Module, embedding: torch.Tensor, tensors: sam_model.PromptTensors, targets: torch.Tensor,
                  valid: torch.Tensor | None, rounds: int, choose: Choose, device: torch.device,
                  precision: str = "fp32", clicks: Clicks | None = None) -> None:
    """Decode ``rounds`` rounds of prompts for N objects of one image.

    embedding: 256x(S/16)x(S/16); ``targets`` (Nx1xhxw at the input resolution) and ``valid`` are passed on to ``choose``. After
    each round ``choose(round, low_res, iou, targets, valid)`` (low_res NxCx(S/4)x(S/4) logits,
    iou NxC; C = 3 for a single click in round 0, else 1) does what the caller needs (a loss and
    its backward pass, or scores). The next round continues from each object's output with the
    highest predicted IoU, its correction clicks placed by ``clicks`` (:func:`make_clicks`; needed
    when rounds > 1).
    """
    if rounds > 1 and clicks is None:
        raise ValueError("more than one round needs the clicks' target masks")
    for r in range(rounds):
        multimask = r == 0 and tensors.single_click()
        with sam_model.autocast(device, precision):
            low_res, iou = sam_model.decode(sam, embedding, tensors, multimask_output=multimask)
        choose(r, low_res, iou, targets, valid)
        if r + 1 < rounds:
            best = iou.detach().argmax(dim=1)
            tensors = add_clicks(tensors, sam_model.pick_outputs(low_res.detach(), best), clicks, r)
