"""prompts.py: boxes enclose their masks, points fall inside / outside, jitter is bounded."""
from __future__ import annotations

import numpy as np

from prompts import sample_prompts


def test_boxes_enclose_masks_and_points_fall_inside_and_outside(cpm15):
    labels = cpm15[0].labels
    prompts = sample_prompts(labels, np.random.default_rng(0), "point", num_points=3, box_jitter=0.0)
    n = labels.max()
    assert len(prompts) == n
    assert prompts.boxes.shape == (n, 4) and prompts.boxes.dtype == np.float32
    assert prompts.points.shape == (n, 6, 2) and prompts.point_labels.shape == (n, 6)
    assert prompts.masks.shape == (n,) + labels.shape and prompts.masks.dtype == bool
    assert prompts.use_points and not prompts.use_boxes and prompts.mask_inputs is None
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


def test_prompts_without_objects_cap_mix_and_mask_prompt(cpm15):
    empty = sample_prompts(np.zeros((50, 70), np.int32), np.random.default_rng(0), "mix", num_points=2)
    assert len(empty) == 0
    assert empty.boxes.shape == (0, 4) and empty.points.shape == (0, 4, 2)
    assert empty.point_labels.shape == (0, 4) and empty.masks.shape == (0, 50, 70)
    labels = cpm15[2].labels
    capped = sample_prompts(labels, np.random.default_rng(0), max_objects=5, mask_prompt=True)
    assert len(capped) == 5 and len(set(capped.object_ids.tolist())) == 5
    assert np.array_equal(capped.mask_inputs, capped.masks)
    modes = {(p.use_boxes, p.use_points) for p in
             (sample_prompts(labels, np.random.default_rng(s), "mix", max_objects=2) for s in range(12))}
    assert modes == {(True, False), (False, True), (True, True)}
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
