"""Tests of metrics.py: hand-computed cases, a slow reference from the definitions, properties.

The reference implementation below loops over object pairs in plain Python, straight from the
definitions (Kumar et al. 2017 for AJI, HoVer-Net's ``get_fast_aji_plus`` for AJI+, Kirillov
et al. 2019 for PQ), and is compared with the vectorised code on crops of the real label
images in ``tests/data`` perturbed in the ways real predictions go wrong.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import f1_score, jaccard_score, precision_score, recall_score

from samlora.metrics import accuracy, overlaps
from samlora.metrics import scores as metrics
from samlora.metrics.bootstrap import summarize
from samlora.metrics.scores import (
    INSTANCE_COUNT_KEYS,
    IOU_THRESHOLD_PERCENTS,
    instance_metrics,
    instance_score_keys,
    pooled_instance_metrics,
    pooled_semantic_metrics,
    semantic_metrics,
    threshold_key,
    to_instances,
)

THRESHOLD_KEYS = [f"f1@{t:.2f}" for t in np.arange(50, 100, 5) / 100]


# --------------------------------------------------------------------------- reference


def ref_instance(gt: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None = None) -> dict:
    """Instance metrics by the definitions, with Python loops over every (gt, pred) pair."""
    if ignore is not None:
        gt = np.where(ignore, 0, gt)
        pred = np.where(ignore, 0, pred)
    g_ids = [int(v) for v in np.unique(gt) if v != 0]
    p_ids = [int(v) for v in np.unique(pred) if v != 0]
    g_mask = {g: gt == g for g in g_ids}
    p_mask = {p: pred == p for p in p_ids}
    inter = np.zeros((len(g_ids), len(p_ids)), dtype=np.int64)
    union = np.zeros((len(g_ids), len(p_ids)), dtype=np.int64)
    for i, g in enumerate(g_ids):
        for j, p in enumerate(p_ids):
            inter[i, j] = np.count_nonzero(g_mask[g] & p_mask[p])
            union[i, j] = np.count_nonzero(g_mask[g] | p_mask[p])
    iou = np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)
    both_empty = not g_ids and not p_ids

    # AJI, Kumar et al. Algorithm 1: each gt takes the pred of max IoU (first one on ties).
    c_sum = u_sum = 0
    used: set[int] = set()
    for i, g in enumerate(g_ids):
        best, best_iou = None, 0.0
        for j in range(len(p_ids)):
            if iou[i, j] > best_iou:
                best, best_iou = j, iou[i, j]
        if best is None:
            u_sum += int(g_mask[g].sum())
        else:
            c_sum += int(inter[i, best])
            u_sum += int(union[i, best])
            used.add(best)
    for j, p in enumerate(p_ids):
        if j not in used:
            u_sum += int(p_mask[p].sum())
    aji = c_sum / u_sum if u_sum else 1.0

    # AJI+, HoVer-Net: Hungarian on the full IoU matrix, keep pairs with IoU > 0.
    c_plus = u_plus = 0
    paired_g: set[int] = set()
    paired_p: set[int] = set()
    if g_ids and p_ids:
        rows, cols = linear_sum_assignment(-iou)
        for i, j in zip(rows, cols):
            if iou[i, j] > 0:
                c_plus += int(inter[i, j])
                u_plus += int(union[i, j])
                paired_g.add(i)
                paired_p.add(j)
    u_plus += sum(int(g_mask[g].sum()) for i, g in enumerate(g_ids) if i not in paired_g)
    u_plus += sum(int(p_mask[p].sum()) for j, p in enumerate(p_ids) if j not in paired_p)
    aji_plus = c_plus / u_plus if u_plus else 1.0

    # PQ: pairs with IoU > 0.5, checking that they are unique.
    matched = [(i, j) for i in range(len(g_ids)) for j in range(len(p_ids)) if iou[i, j] > 0.5]
    assert len({i for i, _ in matched}) == len({j for _, j in matched}) == len(matched)
    tp = len(matched)
    fp, fn = len(p_ids) - tp, len(g_ids) - tp
    if both_empty:
        sq = rq = 1.0
    else:
        sq = sum(iou[i, j] for i, j in matched) / tp if tp else 0.0
        rq = tp / (tp + 0.5 * fp + 0.5 * fn)
    out = {
        "aji": aji, "aji_plus": aji_plus, "pq": sq * rq, "sq": sq, "rq": rq,
        "mean_matched_iou": sq, "n_gt": len(g_ids), "n_pred": len(p_ids),
        "tp": tp, "fp": fp, "fn": fn,
    }
    for pct in range(50, 100, 5):
        tp_t = sum(
            1 for i in range(len(g_ids)) for j in range(len(p_ids)) if iou[i, j] > pct / 100
        )
        n = len(g_ids) + len(p_ids)
        out[f"f1@{pct / 100:.2f}"] = 2 * tp_t / n if n else 1.0
        out[f"precision@{pct / 100:.2f}"] = tp_t / len(p_ids) if p_ids else float(both_empty)
        out[f"recall@{pct / 100:.2f}"] = tp_t / len(g_ids) if g_ids else float(both_empty)
    out["f1"], out["precision"], out["recall"] = (
        out["f1@0.50"], out["precision@0.50"], out["recall@0.50"]
    )
    return out


def assert_matches_reference(gt: np.ndarray, pred: np.ndarray, ignore=None) -> dict:
    """Fast result equals the slow reference on every key the reference computes."""
    fast = instance_metrics(gt, pred, ignore)
    ref = ref_instance(gt, pred, ignore)
    for key, value in ref.items():
        assert fast[key] == pytest.approx(value, abs=1e-12), key
    return fast


# --------------------------------------------------------------------------- perturbations


def erode(lab: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Shrink every object by removing pixels that touch another label (3x3)."""
    for _ in range(iterations):
        lo = ndimage.grey_erosion(lab, size=3)
        hi = ndimage.grey_dilation(lab, size=3)
        lab = np.where(lo == hi, lab, 0)
    return lab


def dilate(lab: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Grow objects into the background (3x3; the larger label wins where two meet)."""
    for _ in range(iterations):
        lab = np.where(lab == 0, ndimage.grey_dilation(lab, size=3), lab)
    return lab


def drop(lab: np.ndarray, rng: np.random.Generator, frac: float = 0.3) -> np.ndarray:
    """Delete a random fraction of the objects."""
    ids = np.unique(lab)[1:]
    gone = rng.choice(ids, size=int(len(ids) * frac), replace=False)
    return np.where(np.isin(lab, gone), 0, lab)


def shift(lab: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate with zero fill."""
    out = np.zeros_like(lab)
    h, w = lab.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = lab[
        max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)
    ]
    return out


def merge_neighbours(lab: np.ndarray, n_merges: int = 2) -> np.ndarray:
    """Give pairs of horizontally or vertically touching objects one label."""
    lab = lab.copy()
    for _ in range(n_merges):
        a = np.concatenate([lab[:, :-1].ravel(), lab[:-1, :].ravel()])
        b = np.concatenate([lab[:, 1:].ravel(), lab[1:, :].ravel()])
        touching = (a != 0) & (b != 0) & (a != b)
        if touching.any():
            k = np.flatnonzero(touching)[0]
            lab[lab == b[k]] = a[k]
        else:  # nothing touches: merge two distant objects into one two-piece object
            ids = np.unique(lab)[1:]
            if len(ids) >= 2:
                lab[lab == ids[1]] = ids[0]
    return lab


def add_blobs(lab: np.ndarray, rng: np.random.Generator, n: int = 4) -> np.ndarray:
    """Paint ``n`` false-positive discs with new labels (over background only)."""
    lab = lab.copy()
    h, w = lab.shape
    yy, xx = np.mgrid[:h, :w]
    top = int(lab.max())
    for k in range(n):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(2, 6)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (lab == 0)
        lab[disc] = top + 1 + k
    return lab


def perturbations(gt: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Predictions made from ``gt`` the ways a segmentation model gets them wrong."""
    rng = np.random.default_rng(seed)
    return {
        "perfect": gt.copy(),
        "eroded": erode(gt, 2),
        "dilated": dilate(gt, 2),
        "dropped": drop(gt, rng),
        "shifted": shift(gt, 3, -2),
        "merged": merge_neighbours(dilate(gt, 1), 3),
        "blobs": add_blobs(gt, rng),
        "mixed": add_blobs(shift(drop(erode(gt, 1), rng, 0.2), -1, 2), rng, 3),
    }


def real_crops(root: Path) -> dict[str, np.ndarray]:
    """Crops (~150 px, 10-40 nuclei) of real label images from the three nuclei sets."""
    files = {
        "cpm15_20x": sorted((root / "nuclei_cpm15" / "cpm15 20x" / "label masks").glob("*.tif"))[0],
        "cpm15_40x": sorted((root / "nuclei_cpm15" / "cpm15 40x" / "label masks").glob("*.tif"))[0],
        "dsb": root / "nuclei_dsb_fluo" / "masks" / "img2d.tif",
        "monuseg": sorted((root / "nuclei_monuseg_train" / "masks").glob("*.tif"))[1],
    }
    crops = {}
    for name, path in files.items():
        lab = tifffile.imread(path)
        crops[name] = np.ascontiguousarray(lab[100:260, 100:250])
    return crops


# --------------------------------------------------------------------------- hand cases

# gt: A = label 1 (4 px), B = label 2 (2 px).   pred: P5 covers 3/4 of A, P7 is a false positive.
#   gt          pred
#   1 1 0 0     5 5 0 7
#   1 1 0 0     5 0 0 7
#   0 0 0 0     0 0 0 0
#   0 0 2 2     0 0 0 0
GT_HAND = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 2, 2]], dtype=np.uint16)
PRED_HAND = np.array([[5, 5, 0, 7], [5, 0, 0, 7], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=np.int32)


def test_semantic_hand_case():
    # foreground: gt 6 px, pred 5 px, overlap 3 -> tp 3, fp 2, fn 3
    # dice = 2*3 / (2*3 + 2 + 3) = 6/11; iou = 3 / 8; precision = 3/5; recall = 3/6
    r = semantic_metrics(GT_HAND, PRED_HAND)
    assert (r["tp"], r["fp"], r["fn"]) == (3, 2, 3)
    assert r["dice"] == pytest.approx(6 / 11)
    assert r["iou"] == pytest.approx(3 / 8)
    assert r["precision"] == pytest.approx(3 / 5)
    assert r["recall"] == pytest.approx(1 / 2)


def test_instance_hand_case():
    # IoU(A, P5) = |{3 px}| / |A u P5| = 3 / 4 = 0.75; B and P7 overlap nothing.
    # Matching at IoU > 0.5: tp 1 (A-P5), fp 1 (P7), fn 1 (B).
    # precision = recall = 1/2; f1 = 2*1 / (2 + 2) = 1/2; RQ = 1 / (1 + .5 + .5) = 1/2
    # SQ = 0.75 (= mean matched IoU); PQ = 0.75 * 0.5 = 0.375
    # AJI: A -> P5: C = 3, U = 4; B unmatched: U += 2; P7 unused: U += 2 -> 3/8. AJI+ the same.
    # f1@t: 0.75 > t for t = 0.50 ... 0.70 -> 1/2; strict, so f1@0.75 ... f1@0.95 = 0.
    r = instance_metrics(GT_HAND, PRED_HAND)
    assert (r["n_gt"], r["n_pred"], r["tp"], r["fp"], r["fn"]) == (2, 2, 1, 1, 1)
    assert r["precision"] == r["recall"] == r["f1"] == r["rq"] == pytest.approx(0.5)
    assert r["sq"] == r["mean_matched_iou"] == pytest.approx(0.75)
    assert r["pq"] == pytest.approx(0.375)
    assert (r["aji_intersection"], r["aji_union"]) == (3, 8)
    assert r["aji"] == pytest.approx(3 / 8)
    assert r["aji_plus"] == pytest.approx(3 / 8)
    assert r["sum_matched_iou"] == pytest.approx(0.75)
    for pct in IOU_THRESHOLD_PERCENTS:
        expected = 0.5 if pct < 75 else 0.0
        assert r[threshold_key("f1", pct)] == pytest.approx(expected), pct
        assert r[threshold_key("precision", pct)] == pytest.approx(expected)
        assert r[threshold_key("recall", pct)] == pytest.approx(expected)
        assert r[threshold_key("tp", pct)] == (1 if pct < 75 else 0)
    assert [k for k in r if k.startswith("f1@")] == THRESHOLD_KEYS


def test_merged_prediction_aji_vs_aji_plus():
    # gt: two 2x2 objects side by side; pred: one 2x4 object covering both.
    #   1 1 2 2      3 3 3 3
    #   1 1 2 2      3 3 3 3
    # IoU(1,3) = IoU(2,3) = 4/8 = 0.5 -> not > 0.5: tp 0, fp 1, fn 2, SQ = RQ = PQ = 0.
    # AJI: both gt pick pred 3: C = 4 + 4, U = 8 + 8 -> 0.5 (the pred's area counted twice).
    # AJI+: one-to-one, 3 pairs with one gt only: C = 4, U = 8 + 4 (other gt) -> 1/3.
    gt = np.zeros((4, 4), np.uint8)
    gt[:2, :2], gt[:2, 2:] = 1, 2
    pred = np.zeros((4, 4), np.uint8)
    pred[:2, :] = 3
    r = instance_metrics(gt, pred)
    assert r["aji"] == pytest.approx(0.5)
    assert r["aji_plus"] == pytest.approx(1 / 3)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 1, 2)
    assert r["pq"] == r["sq"] == r["rq"] == r["f1"] == 0.0


def test_split_prediction():
    # gt: one 2x4 object (8 px); pred: its left half = label 9, right half = label 4.
    # IoU = 4/8 = 0.5 for both (tie) -> no match at > 0.5: tp 0, fp 2, fn 1.
    # AJI: gt takes the smallest label on the tie (4): C = 4, U = 8, unused pred 9 adds 4 -> 1/3.
    # AJI+: one pair: C = 4, U = 8 + 4 -> 1/3.
    gt = np.zeros((4, 4), np.uint8)
    gt[:2, :] = 1
    pred = np.zeros((4, 4), np.uint8)
    pred[:2, :2], pred[:2, 2:] = 9, 4
    r = instance_metrics(gt, pred)
    assert r["aji"] == pytest.approx(1 / 3)
    assert r["aji_plus"] == pytest.approx(1 / 3)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 2, 1)
    assert r["precision"] == r["recall"] == 0.0


def test_aji_plus_uses_optimal_not_greedy_assignment():
    # gt 1 (cols 0-3) and gt 2 (cols 4-5) on one row; pred 7 covers cols 1-5, pred 8 col 0.
    #   gt   1 1 1 1 2 2       pred 8 7 7 7 7 7
    # IoU(1,7) = 3/6 = .5, IoU(2,7) = 2/5 = .4, IoU(1,8) = 1/4 = .25, IoU(2,8) = 0.
    # Greedy by IoU would pair 1-7 (.5) and leave 2 alone: total .5.
    # Hungarian maximises the sum: 1-8 (.25) + 2-7 (.4) = .65.
    # AJI+: C = 1 + 2 = 3, U = 4 + 5 = 9 -> 1/3.
    # AJI: gt1 -> 7 (C 3, U 6), gt2 -> 7 (C 2, U 5), pred 8 unused (U 1): 5/12.
    gt = np.array([[1, 1, 1, 1, 2, 2]], np.uint8)
    pred = np.array([[8, 7, 7, 7, 7, 7]], np.uint8)
    r = instance_metrics(gt, pred)
    assert r["aji_plus"] == pytest.approx(1 / 3)
    assert r["aji"] == pytest.approx(5 / 12)
    assert_matches_reference(gt, pred)


# --------------------------------------------------------------------------- pooled


def test_pooled_semantic_differs_from_mean_and_equals_hand_value():
    # image 1: gt one foreground pixel, pred empty -> tp 0, fp 0, fn 1, dice 0
    # image 2: gt = pred = 3x3 square -> tp 9, dice 1
    # mean of per-image dice = 0.5; pooled: tp 9, fp 0, fn 1 -> dice 18/19, iou 9/10,
    # precision 9/9, recall 9/10.
    gt1 = np.zeros((5, 5), bool)
    gt1[0, 0] = True
    pred1 = np.zeros((5, 5), bool)
    gt2 = np.zeros((5, 5), bool)
    gt2[1:4, 1:4] = True
    rows = [semantic_metrics(gt1, pred1), semantic_metrics(gt2, gt2.copy())]
    assert np.mean([r["dice"] for r in rows]) == pytest.approx(0.5)
    pooled = pooled_semantic_metrics(rows)
    assert (pooled["tp"], pooled["fp"], pooled["fn"]) == (9, 0, 1)
    assert pooled["dice"] == pytest.approx(18 / 19)
    assert pooled["iou"] == pytest.approx(9 / 10)
    assert pooled["precision"] == pytest.approx(1.0)
    assert pooled["recall"] == pytest.approx(9 / 10)


def test_pooled_instance_differs_from_mean_and_equals_hand_value():
    # image 1: the hand case (AJI C 3 / U 8, tp 1 fp 1 fn 1, matched IoU sum .75)
    # image 2: one 2x2 object predicted perfectly (C 4 / U 4, tp 1, IoU 1)
    # mean AJI = (3/8 + 1) / 2 = 0.6875; pooled AJI = (3 + 4) / (8 + 4) = 7/12
    # pooled: tp 2, fp 1, fn 1, SQ = 1.75 / 2 = .875, RQ = 2 / (2 + .5 + .5) = 2/3,
    # PQ = .875 * 2/3 = 7/12; mean PQ = (.375 + 1) / 2 = .6875
    # pooled f1@0.75: tp@0.75 = 0 + 1 -> 2*1 / (4 + 2) = 1/3
    gt2 = np.zeros((4, 4), np.uint8)
    gt2[1:3, 1:3] = 3
    rows = [instance_metrics(GT_HAND, PRED_HAND), instance_metrics(gt2, gt2 * 2)]
    assert np.mean([r["aji"] for r in rows]) == pytest.approx(0.6875)
    assert np.mean([r["pq"] for r in rows]) == pytest.approx(0.6875)
    pooled = pooled_instance_metrics(rows)
    assert pooled["aji"] == pytest.approx(7 / 12)
    assert pooled["aji_plus"] == pytest.approx(7 / 12)
    assert (pooled["tp"], pooled["fp"], pooled["fn"]) == (2, 1, 1)
    assert (pooled["n_gt"], pooled["n_pred"]) == (3, 3)
    assert pooled["sq"] == pytest.approx(0.875)
    assert pooled["rq"] == pytest.approx(2 / 3)
    assert pooled["pq"] == pytest.approx(7 / 12)
    assert pooled["f1@0.75"] == pytest.approx(1 / 3)
    assert set(pooled) == set(rows[0])


def test_pooled_errors():
    with pytest.raises(ValueError, match="nothing to pool"):
        pooled_semantic_metrics([])
    with pytest.raises(ValueError, match="nothing to pool"):
        pooled_instance_metrics(iter([]))
    with pytest.raises(ValueError, match="lacks"):
        pooled_instance_metrics([{"aji": 1.0}])


# --------------------------------------------------------------------------- conventions


def _all_finite(r: dict) -> bool:
    return all(np.isfinite(v) for v in r.values())


def test_both_empty_is_perfect():
    z = np.zeros((6, 7), np.uint16)
    sem = semantic_metrics(z, z)
    assert all(sem[k] == 1.0 for k in ("dice", "iou", "precision", "recall"))
    inst = instance_metrics(z, z)
    assert all(inst[k] == 1.0 for k in instance_score_keys())
    assert all(inst[k] == 0 for k in INSTANCE_COUNT_KEYS)
    assert _all_finite(sem) and _all_finite(inst)


@pytest.mark.parametrize("empty_side", ["gt", "pred"])
def test_one_side_empty_is_zero(empty_side):
    z = np.zeros((8, 8), np.int32)
    full = np.zeros((8, 8), np.int32)
    full[1:4, 1:4], full[5:7, 5:8] = 3, 11
    gt, pred = (z, full) if empty_side == "gt" else (full, z)
    sem = semantic_metrics(gt, pred)
    assert all(sem[k] == 0.0 for k in ("dice", "iou", "precision", "recall"))
    inst = instance_metrics(gt, pred)
    assert all(inst[k] == 0.0 for k in instance_score_keys())
    assert (inst["n_gt"], inst["n_pred"]) == ((0, 2) if empty_side == "gt" else (2, 0))
    assert inst["aji_union"] == 9 + 6
    assert _all_finite(sem) and _all_finite(inst)


def test_no_match_but_both_nonempty_is_zero_not_nan():
    gt = np.zeros((6, 6), np.uint8)
    gt[0:2, 0:2] = 1
    pred = np.zeros((6, 6), np.uint8)
    pred[3:6, 3:6] = 2
    inst = instance_metrics(gt, pred)
    assert all(inst[k] == 0.0 for k in instance_score_keys())
    assert _all_finite(inst)


def test_perfect_prediction_on_real_crops(shared_data):
    for name, gt in real_crops(shared_data).items():
        inst = instance_metrics(gt, gt.copy())
        assert all(inst[k] == pytest.approx(1.0) for k in instance_score_keys()), name
        sem = semantic_metrics(gt, gt)
        assert all(sem[k] == 1.0 for k in ("dice", "iou", "precision", "recall")), name


def test_disjoint_prediction_is_zero(shared_data):
    gt = real_crops(shared_data)["cpm15_20x"]
    pred = to_instances(gt == 0)  # the background, as objects
    inst = instance_metrics(gt, pred)
    assert all(inst[k] == 0.0 for k in instance_score_keys())
    sem = semantic_metrics(gt, pred)
    assert all(sem[k] == 0.0 for k in ("dice", "iou", "precision", "recall"))


def test_relabelling_invariance(shared_data):
    rng = np.random.default_rng(7)
    crops = real_crops(shared_data)
    for name in ("cpm15_40x", "dsb"):
        gt = crops[name]
        pred = perturbations(gt, 3)["mixed"]
        base = instance_metrics(gt, pred)

        def permute(lab: np.ndarray) -> np.ndarray:
            ids = np.unique(lab)[1:]
            # non-consecutive, huge values (takes the np.unique path) in a random order
            new = rng.choice(np.arange(1, 2**40, 2**20, dtype=np.int64), len(ids), replace=False)
            lut = dict(zip(ids.tolist(), new.tolist()))
            out = np.zeros(lab.shape, np.int64)
            for old, value in lut.items():
                out[lab == old] = value
            return out

        other = instance_metrics(permute(gt), permute(pred))
        for key, value in base.items():
            assert other[key] == pytest.approx(value, abs=1e-12), (name, key)
        assert semantic_metrics(permute(gt), pred) == semantic_metrics(gt, pred)


def test_ignore_mask_excludes_pixels():
    # Ignore P7's two pixels: fp 0 -> semantic tp 3, fp 0, fn 3: dice 6/9, precision 1.
    # Instance: n_pred 1, AJI = 3 / (4 + 2) = 1/2, precision 1, recall 1/2.
    ignore = np.zeros((4, 4), bool)
    ignore[:2, 3] = True
    sem = semantic_metrics(GT_HAND, PRED_HAND, ignore)
    assert (sem["tp"], sem["fp"], sem["fn"]) == (3, 0, 3)
    assert sem["dice"] == pytest.approx(6 / 9)
    inst = instance_metrics(GT_HAND, PRED_HAND, ignore)
    assert (inst["n_gt"], inst["n_pred"]) == (2, 1)
    assert inst["aji"] == pytest.approx(0.5)
    assert inst["precision"] == 1.0 and inst["recall"] == 0.5
    # Also ignore B (integer mask, nonzero = ignored): nothing missed any more.
    # AJI = 3/4, recall 1, PQ = .75 * 1.
    ignore_int = ignore.astype(np.uint8) * 255
    ignore_int[3, 2:] = 255
    inst = instance_metrics(GT_HAND, PRED_HAND, ignore_int)
    assert (inst["n_gt"], inst["n_pred"], inst["tp"]) == (1, 1, 1)
    assert inst["aji"] == pytest.approx(0.75)
    assert inst["pq"] == pytest.approx(0.75)
    # Ignoring a pixel inside a matched pair changes the IoU: ignore (0, 0) -> IoU 2/3.
    ignore_in = np.zeros((4, 4), bool)
    ignore_in[0, 0] = True
    assert instance_metrics(GT_HAND, PRED_HAND, ignore_in)["sq"] == pytest.approx(2 / 3)


def test_ignore_mask_real_data_matches_reference(shared_data):
    gt = real_crops(shared_data)["monuseg"]
    pred = perturbations(gt, 5)["mixed"]
    ignore = np.zeros(gt.shape, bool)
    ignore[40:90, 30:100] = True
    fast = assert_matches_reference(gt, pred, ignore)
    assert fast != instance_metrics(gt, pred)
    assert semantic_metrics(gt, pred, ignore) == semantic_metrics(
        np.where(ignore, 0, gt), np.where(ignore, 0, pred)
    )


# --------------------------------------------------------------------------- reference checks


def test_instance_matches_reference_on_real_data(shared_data):
    n_cases = 0
    for name, gt in real_crops(shared_data).items():
        assert len(np.unique(gt)) > 8, name  # the crops hold real objects
        for kind, pred in perturbations(gt, seed=len(name)).items():
            fast = assert_matches_reference(gt, pred)
            assert _all_finite(fast), (name, kind)
            n_cases += 1
    assert n_cases == 32


def _random_rectangles(rng: np.random.Generator, shape=(24, 24), n: int = 8) -> np.ndarray:
    """Overlapping rectangles painted in order: irregular, sometimes multi-piece, objects."""
    lab = np.zeros(shape, np.int64)
    values = rng.choice(np.arange(1, 1000), n, replace=False)
    for v in values:
        y, x = rng.integers(0, shape[0], 2)
        h, w = rng.integers(2, 9, 2)
        lab[y:y + h, x:x + w] = v
    return lab


def test_instance_matches_reference_on_random_maps():
    rng = np.random.default_rng(0)
    for _ in range(40):
        gt = _random_rectangles(rng)
        pred = _random_rectangles(rng) if rng.random() < 0.5 else dilate(erode(gt, 1), 2)
        assert_matches_reference(gt, pred)
    for _ in range(20):  # pixel noise: many overlapping pairs, big assignment problems
        gt = rng.integers(0, 6, (10, 10))
        pred = rng.integers(0, 6, (10, 10)) * 3
        assert_matches_reference(gt, pred)


def test_semantic_matches_sklearn():
    rng = np.random.default_rng(1)
    for _ in range(10):
        gt = rng.integers(0, 4, (20, 30))
        pred = rng.random((20, 30)) < 0.6
        r = semantic_metrics(gt, pred)
        y, p = (gt != 0).ravel(), pred.ravel()
        assert r["dice"] == pytest.approx(f1_score(y, p))
        assert r["iou"] == pytest.approx(jaccard_score(y, p))
        assert r["precision"] == pytest.approx(precision_score(y, p))
        assert r["recall"] == pytest.approx(recall_score(y, p))


def test_sparse_code_paths_agree(shared_data, monkeypatch):
    """The np.unique paths (huge labels, many objects) give the same numbers as the dense ones."""
    gt = real_crops(shared_data)["cpm15_20x"]
    pred = perturbations(gt, 11)["mixed"]
    dense = instance_metrics(gt, pred)
    monkeypatch.setattr(overlaps, "DENSE_PAIR_LIMIT", 0)
    monkeypatch.setattr(overlaps, "LUT_LABEL_LIMIT", 0)
    assert instance_metrics(gt.astype(np.uint64), pred) == dense


def test_non_consecutive_real_labels(shared_data):
    lab = tifffile.imread(shared_data / "nuclei_dsb_fluo" / "masks" / "img2d.tif")
    ids = np.unique(lab)[1:]
    assert ids[-1] > len(ids)  # really non-consecutive
    r = instance_metrics(lab, lab)
    assert r["n_gt"] == len(ids) and r["aji"] == 1.0


def test_speed_512_with_500_objects():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:512, :512]
    gt = np.zeros((512, 512), np.int32)
    centres = [(y, x) for y in range(11, 512, 22) for x in range(11, 512, 22)][:500]
    for k, (y, x) in enumerate(centres, start=1):
        gt[(yy - y) ** 2 + (xx - x) ** 2 <= rng.integers(5, 11) ** 2] = k
    pred = shift(dilate(gt, 1), 2, 1)
    assert len(np.unique(gt)) - 1 == 500 and len(np.unique(pred)) - 1 == 500
    start = time.perf_counter()
    r = instance_metrics(gt, pred)
    elapsed = time.perf_counter() - start
    assert r["n_gt"] == 500 and 0 < r["aji"] < 1
    assert elapsed < 1.0, f"instance_metrics took {elapsed:.3f} s on 512x512 / 500 objects"


# --------------------------------------------------------------------------- to_instances


def test_to_instances_connectivity():
    mask = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]], bool)
    assert to_instances(mask, connectivity=4).max() == 3
    eight = to_instances(mask)
    assert eight.max() == 2 and eight.dtype == np.int32
    assert set(np.unique(eight[mask])) == {1, 2}
    # a binary mask given directly is one object; after to_instances it is two
    assert instance_metrics(mask, mask)["n_gt"] == 1
    assert instance_metrics(eight, eight)["n_gt"] == 2
    with pytest.raises(ValueError, match="connectivity"):
        to_instances(mask, connectivity=6)


# --------------------------------------------------------------------------- summarize


def test_summarize_values():
    x = np.linspace(0.2, 0.9, 40)
    s = summarize(x)
    assert s["n"] == 40
    assert s["mean"] == pytest.approx(x.mean())
    assert s["std"] == pytest.approx(x.std(ddof=1))
    assert x.min() <= s["ci_low"] < s["mean"] < s["ci_high"] <= x.max()
    assert summarize(list(x)) == s  # seeded: same numbers every time
    assert summarize(x, seed=1) != s
    # the percentile interval of a mean is about mean +- 1.96 sd / sqrt(n)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert (s["ci_high"] - s["ci_low"]) / 2 == pytest.approx(half, rel=0.15)


def test_summarize_conventions_and_errors():
    assert summarize([]) == {"mean": 0.0, "std": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 0, "n_groups": 0}
    assert summarize([0.4]) == {"mean": 0.4, "std": 0.0, "ci_low": 0.4, "ci_high": 0.4, "n": 1, "n_groups": 1}
    same = summarize([0.7] * 5)
    assert same["ci_low"] == pytest.approx(0.7) and same["ci_high"] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="NaN"):
        summarize([0.1, float("nan")])
    with pytest.raises(ValueError, match="n_boot"):
        summarize([0.1, 0.2], n_boot=0)
    with pytest.raises(ValueError, match="confidence"):
        summarize([0.1, 0.2], confidence=95)
    with pytest.raises(ValueError, match="one group per value"):
        summarize([0.1, 0.2], groups=["a"])
    one = summarize([0.1, 0.3], groups=["a", "a"])  # one group: nothing to resample
    assert one["n_groups"] == 1 and one["ci_low"] == one["ci_high"] == pytest.approx(0.2)
    big = summarize(np.random.default_rng(0).random(20000))  # chunked resampling
    assert big["ci_low"] < big["mean"] < big["ci_high"]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fn", [semantic_metrics, instance_metrics])
def test_input_errors(fn):
    a = np.zeros((4, 5), np.uint8)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
        fn(a, np.zeros((5, 4), np.uint8))
    with pytest.raises(ValueError, match="float"):
        fn(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="float"):
        fn(a, a.astype(float))
    neg = a.astype(np.int16)
    neg[0, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        fn(a, neg)
    with pytest.raises(ValueError, match="2-D"):
        fn(np.zeros((2, 4, 5), np.uint8), np.zeros((2, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="ignore"):
        fn(a, a, np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="ignore"):
        fn(a, a, np.zeros((4, 5), float))
    with pytest.raises(ValueError, match="float"):
        to_instances(np.zeros((3, 3)))


def test_bool_and_wide_integer_inputs():
    gt = np.zeros((5, 5), bool)
    gt[1:3, 1:3] = True
    assert instance_metrics(gt, gt.astype(np.uint64) * (2**63))["aji"] == 1.0
    assert semantic_metrics(gt, gt.astype(np.int8))["dice"] == 1.0
    assert metrics.instance_metrics(gt, np.zeros((5, 5), np.uint32))["n_pred"] == 0


# --------------------------------------------------------------------------- micro-sam's mSA


def ref_segmentation_accuracies(gt: np.ndarray, pred: np.ndarray) -> list[float]:
    """micro-sam's (elf's) definition, slowly: at each t in np.arange(0.5, 1.0, 0.05), TP = the
    largest number of one-to-one pairs with IoU >= t (an assignment maximising the count of such
    pairs over the full IoU matrix); SA = TP / (TP + FP + FN), 0 without TP."""
    g_ids = [v for v in np.unique(gt) if v != 0]
    p_ids = [v for v in np.unique(pred) if v != 0]
    iou = np.zeros((len(g_ids), len(p_ids)))
    for i, g in enumerate(g_ids):
        for j, p in enumerate(p_ids):
            a, b = gt == g, pred == p
            iou[i, j] = np.count_nonzero(a & b) / np.count_nonzero(a | b)
    out = []
    for t in np.arange(0.5, 1.0, 0.05):
        tp = 0
        if iou.size:
            rows, cols = linear_sum_assignment(-(iou >= t).astype(float))
            tp = int(np.count_nonzero(iou[rows, cols] >= t))
        fp, fn = len(p_ids) - tp, len(g_ids) - tp
        out.append(tp / (tp + fp + fn) if tp > 0 else 0.0)
    return out


def test_msa_matches_the_definition_on_real_labels(shared_data):
    for name, gt in real_crops(shared_data).items():
        for kind, pred in perturbations(gt, seed=5).items():
            expected = ref_segmentation_accuracies(gt, pred)
            got = accuracy.segmentation_accuracies(gt, pred)
            assert got.tolist() == pytest.approx(expected, abs=1e-12), (name, kind)
            assert accuracy.mean_segmentation_accuracy(gt, pred) == pytest.approx(np.mean(expected), abs=1e-12)
    assert accuracy.mean_segmentation_accuracy(gt, gt) == 1.0


def test_msa_thresholds_are_micro_sams_floats():
    """elf compares IoU >= np.arange(0.5, 1.0, 0.05) as floats: 0.6000000000000001, not 0.6, so an
    IoU of exactly 3/5 does not count at the third threshold (the strict integer thresholds of
    instance_metrics are another convention)."""
    assert accuracy.MSA_THRESHOLDS == tuple(np.arange(0.5, 1.0, 0.05))
    assert len(accuracy.MSA_THRESHOLDS) == 10 and accuracy.MSA_THRESHOLDS[2] > 0.6
    gt = np.zeros((1, 5), np.int32)
    gt[0, :5] = 1
    pred = np.zeros((1, 5), np.int32)
    pred[0, :3] = 1  # IoU exactly 3/5
    assert accuracy.segmentation_accuracies(gt, pred).tolist() == [1.0, 1.0] + [0.0] * 8


def test_msa_exact_halves_count_once():
    """A gt object split into two halves: both halves have IoU exactly 0.5 with it, one pair counts
    at t = 0.5 (TP 1, FP 1, FN 0: 1/2); nothing at higher thresholds."""
    gt = np.ones((2, 4), np.int32)
    pred = np.array([[1, 1, 2, 2], [1, 1, 2, 2]], np.int32)
    assert accuracy.segmentation_accuracies(gt, pred).tolist() == [0.5] + [0.0] * 9
    assert accuracy.mean_segmentation_accuracy(gt, pred) == pytest.approx(0.05)


def test_msa_empty_cases_follow_elf():
    """elf scores 0 whenever nothing matches, also when both images are empty (unlike the other
    scores of metrics.py, which call that perfect)."""
    empty = np.zeros((6, 6), np.int32)
    one = empty.copy()
    one[1:4, 1:4] = 3
    assert accuracy.mean_segmentation_accuracy(empty, empty) == 0.0
    assert accuracy.mean_segmentation_accuracy(one, empty) == 0.0
    assert accuracy.mean_segmentation_accuracy(empty, one) == 0.0
    assert accuracy.mean_segmentation_accuracy(one, one) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        accuracy.mean_segmentation_accuracy(one, one[:3])
