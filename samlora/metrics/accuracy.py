"""Segmentation accuracy as micro-sam reports it (mSA), on overlaps.py's matching."""
from __future__ import annotations

import numpy as np

from samlora.metrics.overlaps import max_iou_matching, overlap_table
from samlora.metrics.scores import check_inputs

#: micro-sam's (elf's) mSA thresholds, exactly as it makes them: ``np.arange(0.5, 1.0, 0.05)``
#: (0.5, 0.55, 0.6000000000000001, ...), compared as ``IoU >= t`` in floating point.
MSA_THRESHOLDS: tuple[float, ...] = tuple(float(t) for t in np.arange(0.5, 1.0, 0.05))


def segmentation_accuracies(gt: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None = None) -> np.ndarray:
    """(10,) TP / (TP + FP + FN) at each of :data:`MSA_THRESHOLDS`, as micro-sam's evaluation
    (elf's ``mean_segmentation_accuracy``) counts them.

    TP at t is the largest number of one-to-one (gt, pred) pairs of IoU >= t (for t >= 0.5 the
    summed-IoU matching of overlaps.py gives it: such pairs are unique but for exact halves);
    FP = predictions - TP, FN = ground-truth objects - TP. Unlike this module's other scores, and
    as elf, a threshold with no TP scores 0.0, also when gt and pred are both empty.
    """
    gt, pred, ignore = check_inputs(gt, pred, ignore)
    table = overlap_table(gt, pred, None if ignore is None else ~ignore)
    n_gt, n_pred = len(table.area_a), len(table.area_b)
    iou = table.iou
    out = np.zeros(len(MSA_THRESHOLDS))
    for i, t in enumerate(MSA_THRESHOLDS):
        good = iou >= t
        tp = len(max_iou_matching(table.pair_a[good], table.pair_b[good], iou[good], n_gt, n_pred))
        out[i] = tp / (n_gt + n_pred - tp) if tp else 0.0
    return out


def mean_segmentation_accuracy(gt: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """mSA as micro-sam reports it: the mean of :func:`segmentation_accuracies` over IoU
    thresholds 0.5, 0.55, ..., 0.95 (every non-zero value of ``gt`` / ``pred`` one object)."""
    return float(np.mean(segmentation_accuracies(gt, pred, ignore)))
