"""prompts.py: boxes enclose their masks, points fall inside / outside, jitter is bounded."""
from __future__ import annotations

import numpy as np

import pytest

from prompts import BOX, POINTS, correction_clicks, interior_point, label_boxes, object_prompts, sample_prompts


def test_boxes_enclose_masks_and_points_fall_inside_and_outside(cpm15):
    labels = cpm15[0].labels
    prompts = sample_prompts(labels, np.random.default_rng(0), "point", num_points=3, box_jitter=0.0)
    n = labels.max()
    assert len(prompts) == n
    assert prompts.boxes.shape == (n, 4) and prompts.boxes.dtype == np.float32
    assert prompts.points.shape == (n, 6, 2) and prompts.point_labels.shape == (n, 6)
    assert prompts.masks.shape == (n,) + labels.shape and prompts.masks.dtype == bool
    assert prompts.use_points and not prompts.use_boxes
    for box, pts, pl, mask, obj in zip(prompts.boxes, prompts.points, prompts.point_labels,
                                       prompts.masks, prompts.object_ids, strict=True):
        assert np.array_equal(mask, labels == obj)
        ys, xs = np.nonzero(mask)
        assert box.tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]
        assert pl.tolist() == [1, 1, 1, 0, 0, 0]
        inside = mask[pts[:, 1].astype(int), pts[:, 0].astype(int)]
        assert inside.tolist() == [True, True, True, False, False, False]


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
    assert empty.boxes.shape == (0, 4) and empty.points.shape == (0, 4, 2)
    assert empty.point_labels.shape == (0, 4) and empty.masks.shape == (0, 50, 70)
    labels = cpm15[2].labels
    capped = sample_prompts(labels, np.random.default_rng(0), max_objects=5)
    assert len(capped) == 5 and len(set(capped.object_ids.tolist())) == 5
    mixed = sample_prompts(labels, np.random.default_rng(0), "mix")  # per object, as micro-sam trains
    assert set(mixed.object_kinds().tolist()) == {BOX, POINTS, BOX | POINTS}
    assert set(capped.object_kinds().tolist()) == {BOX}
    order = np.argsort(mixed.object_kinds(), kind="stable")
    taken = mixed.take(order)
    assert np.array_equal(taken.object_ids, mixed.object_ids[order]) and np.array_equal(taken.masks, mixed.masks[order])
    full = sample_prompts(np.ones((8, 8), np.int32), np.random.default_rng(0), "point")
    assert full.point_labels.tolist() == [[1, -1]]  # nowhere to put a negative point


def test_negative_points_avoid_ignored_pixels():
    labels = np.zeros((40, 40), np.int32)
    labels[15:25, 15:25] = 1
    ignore = np.ones((40, 40), bool)
    ignore[:, :5] = False
    p = sample_prompts(labels, np.random.default_rng(0), "point", num_points=20, ignore=ignore)
    negatives = p.points[0, 20:]
    assert np.all(negatives[:, 0] < 5)


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


def test_correction_clicks_go_to_the_deepest_pixel_of_the_largest_error():
    target = np.zeros((3, 30, 40), bool)
    pred = np.zeros((3, 30, 40), bool)
    target[0, 5:25, 5:35] = True
    pred[0, 5:25, 5:20] = True  # missed its right half (20x15), no false positive
    target[1, 10:20, 10:20] = True
    pred[1, 10:20, 10:20] = True
    pred[1, 0:4, 30:40] = True  # a 4x10 false positive ...
    pred[1, 25:26, 0:3] = True  # ... and a smaller one
    target[2, 2:8, 2:8] = True
    pred[2] = target[2]  # no error at all
    xy, labels = correction_clicks(pred, target)
    assert labels.tolist() == [1, 0, -1]
    assert target[0, int(xy[0, 1]), int(xy[0, 0])] and not pred[0, int(xy[0, 1]), int(xy[0, 0])]
    assert xy[0, 0] >= 20 and 12 <= xy[0, 1] <= 17  # deep inside the missed half
    assert 30 <= xy[1, 0] < 40 and 0 <= xy[1, 1] < 4  # in the larger false positive
    valid = np.ones((30, 40), bool)
    valid[0:4, 30:40] = False  # ignored pixels give no clicks
    xy, labels = correction_clicks(pred[1:2], target[1:2], valid)
    assert labels.tolist() == [0] and xy[0, 1] == 25
