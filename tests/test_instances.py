"""instances.py: painting masks into one label map by score, the box / ellipse baselines."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from samlora.data.instances import Instance, box_baseline, ellipse_mask, instance_from_mask, paint_instances
from samlora.data.prompts import object_prompts
from samlora.evaluation.reports import score_image

# Dice and IoU of a filled box against the ellipse inscribed in it (areas pi/4 : 1).
BOX_VS_ELLIPSE_DICE = 2 * (math.pi / 4) / (1 + math.pi / 4)
BOX_VS_ELLIPSE_IOU = math.pi / 4


def paint(masks: list[tuple[np.ndarray, float, int]]) -> np.ndarray:
    """Full-size masks with (score, label) painted by the one rule."""
    found = [instance_from_mask(mask, score, label=label) for mask, score, label in masks]
    return paint_instances([f for f in found if f is not None], (10, 10))[0]


def test_painting_higher_score_wins_in_any_order():
    a = np.zeros((10, 10), bool)
    a[0:6, 0:6] = True
    b = np.zeros((10, 10), bool)
    b[3:9, 3:9] = True
    for order in ([(a, 0.9, 1), (b, 0.5, 2)], [(b, 0.5, 2), (a, 0.9, 1)]):
        labels = paint(order)
        assert (labels[3:6, 3:6] == 1).all()  # the overlap goes to the higher score
        assert (labels[6:9, 6:9] == 2).all() and (labels[a] == 1).all()
    labels = paint([(a, 0.5, 1), (b, 0.5, 2)])
    assert (labels[3:6, 3:6] == 2).all()  # equal scores: the later mask
    labels = paint([(a, 0.5, 1), (b, 0.5, 2), (np.zeros((10, 10), bool), 1.0, 3)])
    assert 3 not in labels  # an empty mask changes nothing


def test_baselines_against_analytic_areas():
    """Box vs ellipse: Dice = 2(pi/4)/(1+pi/4), IoU = pi/4 (ellipse area / box area)."""
    h, w, y0, x0 = 120, 200, 30, 40
    ellipse_gt = np.zeros((200, 300), np.uint8)  # rasterised by cv2, not by instances.py
    cv2.ellipse(ellipse_gt, (x0 + w // 2, y0 + h // 2), (w // 2, h // 2), 0, 0, 360, 1, -1)
    prompts = object_prompts(ellipse_gt.astype(np.int32))
    box = score_image(ellipse_gt, box_baseline(prompts.boxes, ellipse_gt.shape, "box", prompts.object_ids))
    assert box["dice"] == pytest.approx(BOX_VS_ELLIPSE_DICE, abs=0.01)
    assert box["iou"] == pytest.approx(BOX_VS_ELLIPSE_IOU, abs=0.01)
    assert box["pixel_recall"] == 1.0  # the box covers its object
    ellipse = score_image(ellipse_gt, box_baseline(prompts.boxes, ellipse_gt.shape, "ellipse", prompts.object_ids))
    assert ellipse["dice"] > 0.98 and ellipse["pq"] > 0.95

    rect_gt = np.zeros((200, 300), np.int32)
    rect_gt[y0:y0 + h, x0:x0 + w] = 1
    prompts = object_prompts(rect_gt)
    assert score_image(rect_gt, box_baseline(prompts.boxes, rect_gt.shape, "box", prompts.object_ids))["dice"] == 1.0
    on_rect = score_image(rect_gt, box_baseline(prompts.boxes, rect_gt.shape, "ellipse", prompts.object_ids))
    assert on_rect["dice"] == pytest.approx(BOX_VS_ELLIPSE_DICE, abs=0.01)
    assert ellipse_mask(h, w).sum() == pytest.approx(math.pi / 4 * h * w, rel=0.01)
    with pytest.raises(ValueError):
        box_baseline(prompts.boxes, rect_gt.shape, "triangle")


def test_baseline_overlaps_go_to_the_smaller_shape():
    labels = np.zeros((60, 60), np.int32)
    labels[5:55, 5:55] = 1  # a large object ...
    labels[25:35, 25:35] = 2  # ... with a small one inside its box
    prompts = object_prompts(labels)
    pred = box_baseline(prompts.boxes, labels.shape, "box", prompts.object_ids)
    assert (pred[25:35, 25:35] == 2).all() and (pred[5:55, 5:55] > 0).all()


def test_paint_resolves_overlaps_by_score() -> None:
    a = Instance((0, 0, 4, 4), np.ones((4, 4), bool), score=0.5, confidence=0.9)
    b = Instance((2, 2, 6, 6), np.ones((4, 4), bool), score=0.8, confidence=0.1)
    hidden = Instance((3, 3, 5, 5), np.ones((2, 2), bool), score=0.1, confidence=0.1)  # fully under b
    tiny = Instance((7, 7, 8, 8), np.ones((1, 1), bool), score=0.9, confidence=0.9)
    labels, kept = paint_instances([a, b, hidden, tiny], (8, 8), min_area=2)
    assert kept == [b, a]  # label 1 = highest score; hidden and tiny (1 px < min_area) dropped
    assert labels[3, 3] == 1 and labels[0, 0] == 2 and labels[7, 7] == 0
    assert (labels == 1).sum() == 16 and (labels == 2).sum() == 12


def test_box_baseline_fills_detector_boxes() -> None:
    labels = box_baseline(np.array([[1, 1, 2.5, 3], [0, 0, 1, 1]]), (6, 6))  # the smaller box on top
    assert labels[0, 0] == 1 and labels[3, 3] == 2 and labels[1, 1] == 1
    assert (labels == 2).sum() == 3 * 3 - 1  # x 1..3 (3.5 rounds out), y 1..3, less the shared pixel
