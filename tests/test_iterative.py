"""iterative.py: which prompts each round gets, the single-click rule, clicks as micro-sam draws them."""
from __future__ import annotations

import torch
from conftest import tiny_sam

from samlora.models.sam import PromptTensors
from samlora.training import rounds as iterative


def test_single_click_is_one_positive_point_without_box_mask_or_negative_point() -> None:
    """One positive and no negative point (padding aside) is the multimask case, as micro-sam
    trains it; a negative point with it was counted as a single click before."""
    one = PromptTensors(points=torch.zeros(2, 2, 2), point_labels=torch.tensor([[1, -1], [1, -1]]))
    assert one.single_click()
    assert not PromptTensors(points=one.points, point_labels=torch.tensor([[1, 0], [1, -1]])).single_click()
    assert not PromptTensors(boxes=torch.zeros(2, 4), points=one.points, point_labels=one.point_labels).single_click()
    assert not PromptTensors(points=one.points, point_labels=torch.tensor([[1, 1], [1, -1]])).single_click()
    assert not PromptTensors(boxes=torch.zeros(2, 4)).single_click()


def _clicks(masks: torch.Tensor, rounds: int = 2, mask_prob: float = 1.0, seed: int = 0,
            ignore=None) -> iterative.Clicks:
    return iterative.make_clicks(masks[:, 0].numpy(), ignore, tuple(masks.shape[-2:]), rounds, torch.device("cpu"),
                                 mask_prob, torch.Generator().manual_seed(seed))


def test_clicks_are_random_pixels_of_the_errors_at_input_resolution() -> None:
    """Item 8: each later round adds one positive point in the missed pixels and one negative in
    the false positives, drawn at random at the input resolution (a 2 px wide miss, thinner than
    a low-res pixel, still gets its click), as micro-sam; before, one deterministic click went
    to the deepest pixel of the largest error region on the 1/4 grid."""
    low_res = torch.full((1, 1, 16, 16), -5.0)
    low_res[0, 0, 2:8, 2:8] = 5.0  # found: about input pixels 8..31 x 8..31
    low_res[0, 0, 2:4, 12:14] = 5.0  # a false positive about input rows 8..15, columns 48..55
    found = torch.nn.functional.interpolate(low_res, (64, 64), mode="bilinear")[:, :, :40] > 0
    truth = found.clone()
    truth[..., 40:] = False
    truth[0, 0, 10:30, 32:34] = True  # missed: a 2 px wide strip beside the found part
    start = PromptTensors(boxes=torch.tensor([[8.0, 8.0, 33.0, 31.0]]))
    seen = set()
    for seed in range(10):
        nxt = iterative.add_clicks(start, low_res, _clicks(truth, seed=seed))
        assert nxt.boxes is start.boxes and torch.equal(nxt.masks, low_res)
        assert nxt.point_labels.tolist() == [[1, 0]]
        (px, py), (nx, ny) = nxt.points[0].tolist()
        assert px in (32.0, 33.0) and 10 <= py < 30  # in the 2 px wide missed strip
        assert 48 <= nx < 56 and 8 <= ny < 16  # in the false positive
        seen.add((px, py))
    assert len(seen) > 3  # random, not one fixed pixel
    again = iterative.add_clicks(nxt, low_res, _clicks(truth))
    assert again.points.shape == (1, 4, 2) and again.point_labels.tolist() == [[1, 0, 1, 0]]


def test_clicks_fall_back_to_found_and_background_pixels_and_avoid_ignored_ones() -> None:
    truth = torch.zeros(1, 16, 16, dtype=torch.bool)
    truth[0, 4:8, 4:8] = True
    draws = torch.full((1, 2), 0.5)
    xy, labels = iterative.sample_clicks(truth.clone(), truth, draws)  # a perfect mask: micro-sam's fallbacks
    assert labels.tolist() == [[1, 0]]
    (px, py), (nx, ny) = xy[0].tolist()
    assert truth[0, int(py), int(px)] and not truth[0, int(ny), int(nx)]
    valid = torch.zeros(16, 16, dtype=torch.bool)
    valid[:, :2] = True  # only the two left columns count: no object pixel there
    xy, labels = iterative.sample_clicks(torch.zeros_like(truth), truth, draws, valid)
    assert labels.tolist() == [[-1, 0]] and xy[0, 1, 0] < 2


def test_the_mask_prompt_is_fed_about_half_of_the_time() -> None:
    """Item 8: the previous logits are the mask prompt with probability 0.5 (micro-sam's
    mask_prob), per image and round; before, every later round was given the mask."""
    truth = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    truth[:, :, 4:12, 4:12] = True
    feed = torch.cat([_clicks(truth, rounds=9, mask_prob=0.5, seed=seed).feed for seed in range(25)])
    assert 0.35 < feed.float().mean() < 0.65
    assert _clicks(truth, rounds=9, mask_prob=1.0).feed.all() and not _clicks(truth, rounds=9, mask_prob=0.0).feed.any()
    low_res = torch.zeros(2, 1, 4, 4)
    never = iterative.add_clicks(PromptTensors(boxes=torch.zeros(2, 4)), low_res, _clicks(truth, mask_prob=0.0))
    assert never.masks is None and never.points.shape == (2, 2, 2)


def test_clicks_of_chunks_are_the_clicks_of_the_whole_image() -> None:
    truth = torch.zeros(3, 1, 16, 16, dtype=torch.bool)
    truth[:, :, 2:10, 3:9] = True
    clicks = _clicks(truth, rounds=4)
    low_res = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    whole = iterative.add_clicks(PromptTensors(boxes=torch.zeros(3, 4)), low_res, clicks, 2)
    parts = [iterative.add_clicks(PromptTensors(boxes=torch.zeros(1, 4)), low_res[i:i + 1],
                                  clicks.select(slice(i, i + 1)), 2) for i in range(3)]
    torch.testing.assert_close(whole.points, torch.cat([p.points for p in parts]))


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

    with torch.no_grad():
        iterative.decode_rounds(sam, embedding, clicks, targets, None, 3, choose, torch.device("cpu"),
                                clicks=_clicks(targets > 0, rounds=3))
    assert seen == [(True, 1, False), (False, 3, True), (False, 5, True)]
    assert shapes == [(0, (2, 3, 16, 16), (2, 3)), (1, (2, 1, 16, 16), (2, 1)), (2, (2, 1, 16, 16), (2, 1))]


def test_the_next_round_continues_from_the_highest_predicted_iou(monkeypatch) -> None:
    """Item 8: after a single click's three masks the next round starts from the mask with the
    highest predicted IoU (as micro-sam, and as the tool segments), not the one of lowest loss."""
    fed = []
    low_res = torch.stack([torch.full((16, 16), float(c)) for c in (-3, 1, 2)])[None].repeat(2, 1, 1, 1)

    def fake_decode(sam, embedding, tensors, multimask_output=False):
        fed.append(None if tensors.masks is None else tensors.masks.clone())
        if multimask_output:
            return low_res, torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.1]])
        return low_res[:, :1], torch.zeros(2, 1)

    monkeypatch.setattr(iterative.sam_model, "decode", fake_decode)
    targets = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    single = PromptTensors(points=torch.tensor([[[30.0, 30.0]], [[20.0, 20.0]]]), point_labels=torch.ones(2, 1))
    iterative.decode_rounds(None, torch.zeros(1), single, targets, None, 2, lambda *a: None, torch.device("cpu"),
                            clicks=_clicks(targets, rounds=2))
    assert fed[0] is None and fed[1][:, 0, 0, 0].tolist() == [1.0, -3.0]
