"""metrics.volume_metrics and metrics.adapted_rand_error against slow references written from
their definitions (explicit masks per object, COCO's greedy matching and interpolated precision
as defined, every pair of voxels enumerated), on crops of the real EM ground truth
(tests/data/em_vnc, 20 sections) and their perturbations."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from samlora.metrics import overlaps
from samlora.metrics.scores import VOLUME_SCORE_KEYS, adapted_rand_error, volume_metrics


# --------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------
def ref_volume(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Voxel Dice / IoU; 3-D objects matched as COCO does (predictions by decreasing size, each
    taking the unmatched ground-truth object of highest IoU above t); AP as the mean over
    recall r = 0, 0.01, ..., 1 of the highest precision reached at a recall >= r."""
    g, p = gt > 0, pred > 0
    tp, fp, fn = np.sum(g & p), np.sum(~g & p), np.sum(g & ~p)
    out = {"dice": 2 * tp / (2 * tp + fp + fn), "iou": tp / (tp + fp + fn)}
    gt_ids = [int(v) for v in np.unique(gt) if v]
    pred_ids = sorted((int(v) for v in np.unique(pred) if v), key=lambda v: (-np.sum(pred == v), v))
    iou = {(a, b): np.sum((gt == a) & (pred == b)) / np.sum((gt == a) | (pred == b)) for a in gt_ids for b in pred_ids}
    for t in (0.5, 0.75):
        free, hits = set(gt_ids), []
        for b in pred_ids:
            best = max(free, key=lambda a: iou[(a, b)], default=None)
            hit = best is not None and iou[(best, b)] > t
            if hit:
                free.discard(best)
            hits.append(hit)
        points = [(sum(hits[:k + 1]) / len(gt_ids), sum(hits[:k + 1]) / (k + 1)) for k in range(len(hits))]
        ap = np.mean([max([pr for rc, pr in points if rc >= r - 1e-12], default=0.0) for r in np.linspace(0, 1, 101)])
        out[f"tp{int(t * 100)}"], out[f"ap{int(t * 100)}"] = sum(hits), ap
    out["precision50"], out["recall50"] = out["tp50"] / len(pred_ids), out["tp50"] / len(gt_ids)
    out["f1_50"] = 2 * out["tp50"] / (len(pred_ids) + len(gt_ids))
    return out


def ref_adapted_rand_error(gt: np.ndarray, pred: np.ndarray) -> float:
    """Every pair of ground-truth foreground voxels: same gt object? same pred segment?"""
    fg = np.flatnonzero(gt.ravel() > 0)
    a, b = gt.ravel()[fg], pred.ravel()[fg]
    i, j = np.triu_indices(len(fg), k=1)
    same_gt, same_pred = a[i] == a[j], b[i] == b[j]
    precision = np.sum(same_gt & same_pred) / np.sum(same_pred)
    recall = np.sum(same_gt & same_pred) / np.sum(same_gt)
    return 1 - 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------
# data: crops of the real ground truth, and changed copies
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def em_objects(em_volume) -> np.ndarray:
    """The 3-D connected components of the real mitochondria masks (conftest.py), 20x512x512 int32."""
    return ndimage.label(em_volume[1], output=np.int32)[0]


def crop(objects: np.ndarray, size: int) -> np.ndarray:
    """The size x size window (on a 64 px grid) of the volume with most objects, ids 1..N."""
    starts = range(0, objects.shape[1] - size + 1, 64)
    y, x = max(((y, x) for y in starts for x in starts),
               key=lambda yx: len(np.unique(objects[:, yx[0]:yx[0] + size, yx[1]:yx[1] + size])))
    window = objects[:, y:y + size, x:x + size]
    return np.unique(window, return_inverse=True)[1].reshape(window.shape).astype(np.int32)


def changed(gt: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    eroded = np.where(ndimage.grey_erosion(gt, size=(1, 5, 5)) == gt, gt, 0)
    shifted = np.roll(gt, (1, 3, -2), axis=(0, 1, 2))
    dropped = np.where(np.isin(gt, rng.choice(np.arange(1, gt.max() + 1), gt.max() // 3)), 0, gt)
    merged = np.where(gt == 2, 1, gt)
    split = gt.copy()
    split[: gt.shape[0] // 2][split[: gt.shape[0] // 2] > 0] += 1000  # every object cut in two along z
    extra = gt.copy()
    extra[:3, :6, :6] = 77
    return {"same": gt * 3, "eroded": eroded, "shifted": shifted, "dropped": dropped, "merged": merged,
            "split": split, "extra": extra}


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
def test_volume_metrics_equal_the_reference(em_objects) -> None:
    gt = crop(em_objects, 128)
    assert gt.max() == 6
    for name, pred in changed(gt, 0).items():
        got, want = volume_metrics(gt, pred), ref_volume(gt, pred)
        assert set(VOLUME_SCORE_KEYS) <= set(got)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (name, key)


def test_scores_rank_the_predictions() -> None:
    """A small true object ranked first by its score gives a higher AP than ranked by size."""
    gt = np.zeros((2, 10, 10), np.int32)
    gt[:, :2, :2] = 1
    pred = np.zeros_like(gt)
    pred[:, :2, :2] = 1  # true, small
    pred[:, 5:, 5:] = 2  # false, large
    by_size = volume_metrics(gt, pred)["ap50"]
    assert by_size == pytest.approx(ref_volume(gt, pred)["ap50"])
    assert volume_metrics(gt, pred, scores={1: 0.9, 2: 0.1})["ap50"] == 1.0 > by_size


def test_average_precision_edges() -> None:
    assert overlaps.average_precision(np.array([True, True]), 2) == 1.0
    assert overlaps.average_precision(np.zeros(0, bool), 0) == 1.0
    assert overlaps.average_precision(np.zeros(0, bool), 3) == 0.0
    assert overlaps.average_precision(np.array([False]), 0) == 0.0
    empty = np.zeros((2, 5, 5), np.int32)
    assert volume_metrics(empty, empty)["ap75"] == 1.0 and volume_metrics(empty, empty)["dice"] == 1.0


def test_adapted_rand_error_equals_the_reference(em_objects) -> None:
    gt = crop(em_objects, 128)[4:10, ::3, ::3]  # about 2,000 foreground voxels: 2 million pairs
    for name, pred in changed(gt, 1).items():
        assert adapted_rand_error(gt, pred) == pytest.approx(ref_adapted_rand_error(gt, pred), abs=1e-12), name
    assert adapted_rand_error(gt, gt * 7) == 0.0
    assert adapted_rand_error(gt[0], gt[0]) == 0.0  # a single section


class SectionsOnly:
    """A ZxHxW volume that can only be read one section at a time (as a zarr or dask array is
    meant to be): turning it whole into a numpy array fails the test."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.dtype = array, array.shape, array.dtype
        self.reads: list[int] = []

    def __getitem__(self, z: int) -> np.ndarray:
        assert isinstance(z, (int, np.integer)), z
        self.reads.append(int(z))
        return self.array[z]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole volume was loaded at once")


def test_the_volume_is_counted_section_by_section(em_objects, monkeypatch) -> None:
    """Whole real volume (20 sections); folding the per-section tables in every 2 sections gives
    what folding them in once at the end gives, and the volume is read section by section."""
    pred = changed(em_objects, 2)["eroded"]
    scores = volume_metrics(em_objects, pred)
    assert len(em_objects) < overlaps.FOLD_IN_SECTIONS  # above: no fold-in before the end
    monkeypatch.setattr(overlaps, "FOLD_IN_SECTIONS", 2)
    assert volume_metrics(em_objects, pred) == scores
    assert 0.5 < scores["dice"] < 1.0 and scores["n_gt"] == em_objects.max()
    gt, lazy_pred = SectionsOnly(em_objects), SectionsOnly(pred)
    assert volume_metrics(gt, lazy_pred) == scores
    assert gt.reads == lazy_pred.reads == list(range(len(em_objects)))
    small = crop(em_objects, 128)[4:10, ::3, ::3]
    assert adapted_rand_error(SectionsOnly(small), SectionsOnly(small * 7)) == 0.0


@pytest.mark.parametrize("fold_in", [1, 3, 64])
def test_pair_counts_over_sections_equal_the_table_of_the_volume(em_objects, monkeypatch, fold_in) -> None:
    """overlaps.PairCounts added up over 20 real sections (folded in every ``fold_in``) is
    overlaps.overlap_table of the whole 3-D arrays."""
    monkeypatch.setattr(overlaps, "FOLD_IN_SECTIONS", fold_in)
    gt, pred = em_objects[:, :512, :512], changed(em_objects[:, :512, :512], 3)["shifted"]
    counts = overlaps.PairCounts()
    for z in range(len(gt)):
        counts.add(gt[z], pred[z])
    got, want = counts.overlaps(), overlaps.overlap_table(gt, pred)
    for field in ("area_a", "area_b", "pair_a", "pair_b", "inter"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    np.testing.assert_array_equal(got.ids_a, np.unique(gt[gt > 0]))
    assert counts.pairs[2].sum() == gt.size and len(want.inter) > len(want.area_a) / 2


def test_bad_volumes() -> None:
    with pytest.raises(ValueError, match="ZxHxW"):
        volume_metrics(np.zeros((4, 4), np.int32), np.zeros((4, 4), np.int32))
    with pytest.raises(ValueError, match="ZxHxW"):
        volume_metrics(np.zeros((2, 4, 4), np.int32), np.zeros((3, 4, 4), np.int32))
    with pytest.raises(ValueError, match="integer"):
        volume_metrics(np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4), np.int32))
