"""reports.py: per-image scores, pooled scores and the bootstrap summaries of an evaluation."""
from __future__ import annotations

import numpy as np
import pytest

import metrics
from reports import pooled_scores, score_image


def test_pooled_scores_sum_counts_and_names_semantic_columns():
    gt = np.zeros((20, 20), np.int32)
    gt[2:8, 2:8] = 1
    pred_a = gt.copy()
    pred_b = np.zeros_like(gt)
    pred_b[10:12, 10:12] = 1
    rows = [score_image(gt, pred_a), score_image(gt, pred_b)]
    assert {"dice", "iou", "pixel_precision", "pixel_recall", "aji", "pq", "f1", "precision"} <= set(rows[0])
    pooled = pooled_scores(rows)
    tp, fp, fn = 36, 4, 36  # pixels: a is perfect; b misses 36 and adds 4
    assert pooled["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert pooled["aji"] == pytest.approx(metrics.pooled_instance_metrics(rows)["aji"])
    assert rows[1]["pixel_precision"] == 0.0 and rows[1]["precision"] == 0.0
