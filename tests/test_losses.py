"""losses.py: every loss is finite on empty masks, small when right, large when wrong; Dice + BCE by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from samlora.training import losses


@pytest.mark.parametrize("kind", losses.LOSSES)
def test_losses_are_finite_on_empty_masks_and_match_hand_values(kind: str) -> None:
    logits = torch.tensor([[[[8.0, -8.0], [-8.0, -8.0]]], [[[-8.0, -8.0], [-8.0, -8.0]]]], requires_grad=True)
    targets = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])  # 2nd object: empty
    iou = torch.tensor([[1.0], [1.0]])
    loss = losses.compute_loss(kind, logits, iou, targets)
    assert torch.isfinite(loss) and loss.item() < 0.05  # both predictions are right
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # all-wrong predictions cost more; an empty target with an empty prediction costs ~0
    worse = losses.compute_loss(kind, -logits.detach(), iou, targets)
    assert worse > 0.5
    # Dice + BCE by hand for one 1-pixel object predicted with logit 0 everywhere
    if kind == "dice_ce":
        zero = torch.zeros(1, 1, 1, 2)
        target = torch.tensor([[[[1.0, 0.0]]]])
        dice = 1 - (2 * 0.5 + 1) / (1.0 + 1 + 1)  # soft Dice with +1 smoothing: probs 0.5, 0.5
        bce = float(np.log(2))
        assert losses.compute_loss(kind, zero, iou[:1], target, iou_weight=0).item() == pytest.approx(dice + bce,
                                                                                                      rel=1e-5)
        # the IoU head is trained in every loss: the mask's true IoU is 0, predicted 1 -> + 1 * (1 - 0)^2
        assert losses.compute_loss(kind, zero, iou[:1], target).item() == pytest.approx(dice + bce + 1, rel=1e-5)
        assert losses.compute_loss(kind, zero, torch.zeros(1, 1), target).item() == pytest.approx(dice + bce, rel=1e-5)


@pytest.mark.parametrize("kind", losses.LOSSES)
def test_ignored_pixels_are_out_of_the_loss(kind: str) -> None:
    """A wrong prediction on an ignored pixel costs nothing; the same pixel counted costs more."""
    target = torch.tensor([[[[1.0, 0.0, 0.0]]]])
    logits = torch.tensor([[[[8.0, -8.0, 8.0]]]])  # right, right, wrong
    iou = torch.tensor([[0.5]])
    valid = torch.tensor([[[[1.0, 1.0, 0.0]]]])  # the wrong pixel is ignored
    ignored = losses.compute_loss(kind, logits, iou, target, valid)
    counted = losses.compute_loss(kind, logits, iou, target)
    right = losses.compute_loss(kind, torch.tensor([[[[8.0, -8.0, -8.0]]]]), iou, target)
    assert ignored.item() == pytest.approx(right.item(), abs=1e-3) and counted > ignored + 0.1


def test_multimask_loss_takes_the_best_output_and_trains_every_iou() -> None:
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    right, wrong = torch.tensor([[8.0, -8.0], [-8.0, -8.0]]), torch.full((2, 2), 8.0)
    logits = torch.stack([wrong, right, wrong])[None]  # 1x3x2x2: the second output is right
    iou = torch.tensor([[0.0, 1.0, 0.5]])
    loss, best = losses.object_losses("dice_ce", logits, iou, target)
    assert best.tolist() == [1]
    single = losses.object_losses("dice_ce", right[None, None], torch.tensor([[1.0]]), target, iou_weight=0)[0]
    true_iou_wrong = 0.25  # the all-foreground mask covers 1 of its 4 pixels correctly
    expected = single + ((0 - true_iou_wrong) ** 2 + 0 + (0.5 - true_iou_wrong) ** 2) / 3
    torch.testing.assert_close(loss, expected)
