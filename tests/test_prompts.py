"""prompts.py: boxes enclose their masks, points fall inside / outside, jitter is bounded."""
from __future__ import annotations

import numpy as np
import pytest

from samlora.data.prompts import (
    BOX,
    POINTS,
    interior_point,
    label_boxes,
    object_prompts,
    sample_prompts,
    selection_prompts,
)


def test_boxes_enclose_masks_and_points_fall_inside_and_outside(cpm15):
    labels = cpm15[0].labels
    n = labels.max()
    widths = set()
    for seed in range(12):
        prompts = sample_prompts(labels, np.random.default_rng(seed), "point", num_points=3, box_jitter=0.0)
        assert len(prompts) == n
        assert prompts.boxes.shape == (n, 4) and prompts.boxes.dtype == np.float32
        k = prompts.points.shape[1]
        widths.add(k)
        assert prompts.points.shape == (n, k, 2) and prompts.point_labels.shape == (n, k)
        assert prompts.masks.shape == (n,) + labels.shape and prompts.masks.dtype == bool
        assert prompts.use_points and not prompts.use_boxes
        for box, pts, pl, mask, obj in zip(prompts.boxes, prompts.points, prompts.point_labels,
                                           prompts.masks, prompts.object_ids, strict=True):
            assert np.array_equal(mask, labels == obj)
            ys, xs = np.nonzero(mask)
            assert box.tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]
            assert pl.tolist() == [1] + [0] * (k - 1)
            inside = mask[pts[:, 1].astype(int), pts[:, 0].astype(int)]
            assert inside.tolist() == [True] + [False] * (k - 1)
    assert widths == {1, 2, 3, 4}  # one positive and 0..3 negatives, drawn per image


def test_point_prompts_are_one_positive_and_zero_to_k_negatives_with_the_single_click_among_them(cpm15):
    """Item 7: training samples the single click users give (one positive, no negative: SAM's
    multimask case) besides one positive with up to k negatives, as micro-sam; before, every
    prompt had k positives and k negatives, so the single click was never trained."""
    import torch

    from samlora.models import sam as sam_model

    labels = cpm15[0].labels
    single = 0
    for seed in range(20):
        p = sample_prompts(labels, np.random.default_rng(seed), "point", num_points=1)
        assert (p.point_labels == 1).sum(axis=1).tolist() == [1] * len(p)
        negatives = int((p.point_labels[0] == 0).sum())
        assert 0 <= negatives <= 1
        tensors = sam_model.PromptTensors(points=torch.from_numpy(p.points),
                                          point_labels=torch.from_numpy(p.point_labels))
        assert tensors.single_click() == (negatives == 0)
        single += tensors.single_click()
    assert 4 <= single <= 16  # about half of the images at k = 1


def test_selection_prompts_are_evaluates_prompts_with_masks(cpm15):
    """Item 7: epoch selection prompts as evaluate does: the exact box (box, mix) or one click at
    the deepest pixel (point), the same prompts as object_prompts, with the target masks."""
    labels = cpm15[0].labels
    for prompt, kind in (("point", "point"), ("box", "box"), ("mix", "box")):
        chosen, evaluated = selection_prompts(labels, prompt), object_prompts(labels, kind)
        assert (chosen.use_boxes, chosen.use_points) == (evaluated.use_boxes, evaluated.use_points)
        np.testing.assert_array_equal(chosen.points, evaluated.points)
        np.testing.assert_array_equal(chosen.point_labels, evaluated.point_labels)
        np.testing.assert_array_equal(chosen.boxes, evaluated.boxes)
        np.testing.assert_array_equal(chosen.masks, labels[None] == chosen.object_ids[:, None, None])


def test_box_jitter_is_bounded(cpm15):
    labels = cpm15[1].labels
    exact = sample_prompts(labels, np.random.default_rng(0), box_jitter=0.0).boxes
    jittered = sample_prompts(labels, np.random.default_rng(1), box_jitter=0.1).boxes
    side = np.concatenate([exact[:, 2:] - exact[:, :2] + 1] * 2, axis=1)
    delta = np.abs(jittered - exact)
    assert np.all(delta <= 0.1 * side + 1e-4)
    assert delta.mean() > 0.01
    h, w = labels.shape
    assert np.all(jittered >= 0)
    assert np.all(jittered[:, [0, 2]] <= w - 1) and np.all(jittered[:, [1, 3]] <= h - 1)
    assert np.all(jittered[:, 2] >= jittered[:, 0]) and np.all(jittered[:, 3] >= jittered[:, 1])


def test_prompts_without_objects_cap_and_mix(cpm15):
    empty = sample_prompts(np.zeros((50, 70), np.int32), np.random.default_rng(0), "mix", num_points=2)
    assert len(empty) == 0
    assert empty.boxes.shape == (0, 4) and empty.points.shape[0] == 0 and empty.points.shape[2] == 2
    assert empty.point_labels.shape == (0, empty.points.shape[1]) and empty.masks.shape == (0, 50, 70)
    labels = cpm15[2].labels
    capped = sample_prompts(labels, np.random.default_rng(0), max_objects=5)
    assert len(capped) == 5 and len(set(capped.object_ids.tolist())) == 5
    mixed = sample_prompts(labels, np.random.default_rng(0), "mix")  # per object, as micro-sam trains
    assert set(mixed.object_kinds().tolist()) == {BOX, POINTS, BOX | POINTS}
    assert set(capped.object_kinds().tolist()) == {BOX}
    order = np.argsort(mixed.object_kinds(), kind="stable")
    taken = mixed.take(order)
    assert np.array_equal(taken.object_ids, mixed.object_ids[order]) and np.array_equal(taken.masks, mixed.masks[order])
    full = [sample_prompts(np.ones((8, 8), np.int32), np.random.default_rng(seed), "point").point_labels.tolist()
            for seed in range(8)]
    assert [[1, -1]] in full and [[1]] in full  # nowhere to put a negative point


def test_negative_points_avoid_ignored_pixels():
    labels = np.zeros((40, 40), np.int32)
    labels[15:25, 15:25] = 1
    ignore = np.ones((40, 40), bool)
    ignore[:, :5] = False
    p = sample_prompts(labels, np.random.default_rng(0), "point", num_points=20, ignore=ignore)
    negatives = p.points[0, 1:]
    assert len(negatives) and np.all(negatives[:, 0] < 5)


def test_object_prompts_boxes_points_and_subset():
    labels = np.zeros((40, 50), np.int32)
    labels[5:15, 10:30] = 7  # a 10x20 rectangle, non-consecutive id
    labels[20:35, 2:6] = 3   # an L shape: a vertical bar ...
    labels[31:35, 2:20] = 3  # ... and a foot
    prompts = object_prompts(labels)
    assert prompts.object_ids.tolist() == [3, 7]
    np.testing.assert_array_equal(prompts.boxes, [[2, 20, 19, 34], [10, 5, 29, 14]])  # inclusive corners
    for (x, y), obj in zip(prompts.points[:, 0], prompts.object_ids):
        assert labels[int(y), int(x)] == obj  # inside its own object
    # The rectangle's point is as deep as a 10x20 rectangle allows (5 px from the border).
    x, y = prompts.points[1, 0]
    assert min(y - 5 + 1, 14 - y + 1, x - 10 + 1, 29 - x + 1) == 5
    assert prompts.ignore is None

    # max_objects: a seeded subset; the others' pixels are ignored, not counted as missed.
    many = np.zeros((30, 30), np.int32)
    for k in range(9):
        many[(k // 3) * 10 + 2:(k // 3) * 10 + 8, (k % 3) * 10 + 2:(k % 3) * 10 + 8] = k + 1
    sub = object_prompts(many, max_objects=4, rng=np.random.default_rng(0))
    again = object_prompts(many, max_objects=4, rng=np.random.default_rng(0))
    assert len(sub) == 4 and sub.object_ids.tolist() == again.object_ids.tolist()
    np.testing.assert_array_equal(sub.ignore, (many > 0) & ~np.isin(many, sub.object_ids))


def test_interior_point_is_the_deepest_pixel():
    mask = np.zeros((9, 30), bool)
    mask[1:8, 2:29] = True  # 7 rows: the middle row is 4 px from the border
    y, x = interior_point(mask)
    assert y == 4 and mask[y, x]
    with pytest.raises(ValueError):
        interior_point(np.zeros((3, 3), bool))


def test_label_boxes_have_inclusive_corners():
    labels = np.zeros((10, 20), np.int32)
    labels[2:4, 5:9] = 1  # x 5..8, y 2..3 -> box [5, 2, 8, 3] with inclusive corners
    labels[9, 19] = 3  # a 1-pixel object in the corner; label 2 is absent
    ids, boxes = label_boxes(labels)
    assert ids.tolist() == [1, 3]
    np.testing.assert_array_equal(boxes, [[5, 2, 8, 3], [19, 9, 19, 9]])
