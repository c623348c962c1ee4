"""detector.py: YOLO label lines, box IoU and matching (pure numpy), and the boxes of a detector
trained by ``detect train`` on real EM data (the ``best_pt`` fixture of conftest.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from samlora.inference.yolo import box_iou, load_yolo, match_boxes, yolo_boxes, yolo_label_lines


def test_yolo_label_lines() -> None:
    labels = np.zeros((10, 20), np.int32)
    labels[2:4, 5:9] = 1  # x 5..8, y 2..3 -> box [5, 2, 8, 3] with inclusive corners
    labels[9, 19] = 3  # a 1-pixel object in the corner; label 2 is absent
    assert yolo_label_lines(labels) == ["0 0.350000 0.300000 0.200000 0.200000",
                                        "0 0.975000 0.950000 0.050000 0.100000"]
    assert yolo_label_lines(np.zeros((5, 5), np.int32)) == []


def test_box_iou_and_matching() -> None:
    # inclusive max corners: [0, 0, 9, 9] covers 10 x 10 pixels
    gt = np.array([[0, 0, 9, 9], [20, 20, 29, 29], [50, 50, 59, 59]], np.float32)
    pred = np.array([[0, 0, 9, 4],       # IoU 0.5 with gt 0: not a match (strict, as metrics.py)
                     [0, 0, 9, 5],       # IoU 0.6 with gt 0
                     [21, 21, 29, 29],   # IoU 0.81 with gt 1
                     [20, 20, 29, 30],   # IoU 100/110 with gt 1, a duplicate: only one may match
                     [100, 100, 109, 109]], np.float32)
    iou = box_iou(gt, pred)
    assert iou.shape == (3, 5)
    assert iou[0, 0] == pytest.approx(0.5) and iou[0, 1] == pytest.approx(0.6)
    assert iou[1, 2] == pytest.approx(81 / 100)
    counts = match_boxes(gt, pred)
    assert (counts.tp, counts.fp, counts.fn) == (2, 3, 1)
    scores = counts.scores()
    assert scores["precision"] == pytest.approx(2 / 5) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["mean_matched_iou"] == pytest.approx((0.6 + 100 / 110) / 2)  # the better duplicate
    assert match_boxes(np.zeros((0, 4)), np.zeros((0, 4))).scores()["recall"] == 1.0
    none_found = match_boxes(gt, np.zeros((0, 4))).scores()
    assert none_found["recall"] == 0.0 and none_found["precision"] == 0.0 and none_found["fn"] == 3


@pytest.mark.slow
def test_yolo_boxes_for_evaluate(best_pt: Path, em_section_19, no_network: list) -> None:
    yolo = load_yolo(best_pt)
    image, _ = em_section_19
    boxes, scores = yolo_boxes(yolo, image[:256, :256], conf=0.001, iou=0.7, imgsz=256)
    assert boxes.dtype == np.float32 and boxes.shape == (len(scores), 4)
    assert np.all(scores >= 0.001) and np.all(boxes[:, 2:] >= boxes[:, :2])
