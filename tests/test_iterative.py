"""iterative.py: which prompts each round gets, the single-click rule, clicks in the input frame."""
from __future__ import annotations

import torch

import iterative
from conftest import tiny_sam
from model import PromptTensors


def test_single_click_is_one_positive_point_without_box_or_mask() -> None:
    one = PromptTensors(points=torch.zeros(2, 2, 2), point_labels=torch.tensor([[1, 0], [1, -1]]))
    assert one.single_click()
    assert not PromptTensors(boxes=torch.zeros(2, 4), points=one.points, point_labels=one.point_labels).single_click()
    assert not PromptTensors(points=one.points, point_labels=torch.tensor([[1, 1], [1, 0]])).single_click()
    assert not PromptTensors(boxes=torch.zeros(2, 4)).single_click()


def test_clicks_are_added_in_the_input_frame_with_the_mask_prompt() -> None:
    targets = torch.zeros(1, 1, 32, 40)  # at the input resolution: 8x10 on the decoder's grid
    targets[0, 0, 8:24, 8:32] = 1
    low_res = torch.full((1, 1, 16, 16), -5.0)
    low_res[0, 0, 2:6, 2:4] = 5.0  # only the left third is found: the click goes to the missed part
    start = PromptTensors(boxes=torch.tensor([[8.0, 8.0, 31.0, 23.0]]))
    nxt = iterative.add_clicks(start, low_res, targets)
    assert nxt.boxes is start.boxes and torch.equal(nxt.masks, low_res)
    assert nxt.point_labels.tolist() == [[1]]
    x, y = (nxt.points[0, 0] - 1.5) / 4  # back to low-res pixels
    assert 4 <= x < 8 and 2 <= y < 6 and float(x).is_integer()
    again = iterative.add_clicks(nxt, low_res, targets)
    assert again.points.shape == (1, 2, 2) and again.point_labels.tolist() == [[1, 1]]


def test_rounds_decode_once_each_and_carry_clicks_and_masks(monkeypatch) -> None:
    sam = tiny_sam("vit", image_size=64)
    seen = []
    original = iterative.sam_model.decode

    def spy(sam, embedding, tensors, multimask_output=False):
        seen.append((multimask_output, None if tensors.points is None else tensors.points.shape[1],
                     tensors.masks is not None))
        return original(sam, embedding, tensors, multimask_output)

    monkeypatch.setattr(iterative.sam_model, "decode", spy)
    with torch.no_grad():
        embedding = sam.image_encoder(torch.zeros(1, 3, 64, 64))[0]
    targets = torch.zeros(2, 1, 64, 64)  # at the input resolution
    targets[:, :, 16:48, 16:48] = 1
    clicks = PromptTensors(points=torch.tensor([[[30.0, 30.0]], [[20.0, 20.0]]]), point_labels=torch.ones(2, 1))
    shapes = []

    def choose(r, low_res, iou, targets, valid):
        shapes.append((r, tuple(low_res.shape), tuple(iou.shape)))
        return iou.argmax(dim=1)

    with torch.no_grad():
        iterative.decode_rounds(sam, embedding, clicks, targets, None, 3, choose, torch.device("cpu"))
    assert seen == [(True, 1, False), (False, 2, True), (False, 3, True)]
    assert shapes == [(0, (2, 3, 16, 16), (2, 3)), (1, (2, 1, 16, 16), (2, 1)), (2, (2, 1, 16, 16), (2, 1))]
