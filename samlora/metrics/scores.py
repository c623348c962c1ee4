"""Segmentation metrics: the one place where ``train``, ``evaluate`` and ``detect`` get numbers.

Two families, each with a **per-image** function and a **pooled** (dataset-level) function:

* Semantic (foreground vs background; any nonzero label is foreground):
  :func:`semantic_metrics` -> ``dice``, ``iou``, ``precision``, ``recall`` and the pixel
  counts ``tp``, ``fp``, ``fn``; :func:`pooled_semantic_metrics` sums the counts over images
  first and computes the scores once ("pooled", "aggregated", "micro-averaged").
* Instance (objects are label values): :func:`instance_metrics` -> ``aji`` (Kumar et al.
  2017), ``aji_plus`` (Graham et al. 2019, HoVer-Net), ``pq`` = ``sq`` x ``rq`` (Kirillov et al.
  2019, matching at IoU > 0.5), ``f1`` / ``precision`` / ``recall`` at IoU > 0.5,
  ``f1@0.50`` ... ``f1@0.95`` (also ``precision@t``, ``recall@t``, ``tp@t``),
  ``mean_matched_iou``, ``n_gt``, ``n_pred``, ``tp``, ``fp``, ``fn`` and the raw sums needed for
  pooling; :func:`pooled_instance_metrics` pools them over images (AJI = summed intersections
  / summed unions; PQ from summed TP / FP / FN and summed matched IoU).

micro-sam's mSA (:func:`mean_segmentation_accuracy`, with :func:`segmentation_accuracies` per
threshold) follows elf's definition and edge cases, so figures compare with micro-sam's tables.

Volumes (ZxHxW, counted section by section): :func:`volume_metrics` (voxel Dice / IoU, 3-D
precision / recall / F1 and AP) and :func:`adapted_rand_error`.

Per-image scores averaged over images and pooled scores are different numbers; report which
one you give (reports.py builds the tables with both, and bootstrap intervals of the means).

Every returned dict is flat (``str`` -> ``int`` or ``float``), so a list of them is a CSV
table; the pooled dicts have the same keys as the per-image ones.

Conventions (no NaN, no division by zero, ever)
----------------------------------------------
* **Empty inputs.** When a score's denominator is zero, the score is ``1.0`` if ground truth
  and prediction are *both* empty (nothing to find, nothing found: perfect) and ``0.0``
  otherwise. Consequences: both empty -> every score is 1; exactly one empty -> every score
  is 0 (including e.g. ``recall`` on an image without ground truth but with false positives,
  and ``sq`` / ``mean_matched_iou`` when no pair matches). The pooled functions apply the same
  rule to the summed counts, so they only reach it if the whole dataset is empty.
* **Labels.** ``gt`` and ``pred`` are HxW maps of non-negative integers (or bool); 0 is
  background. For instance metrics every distinct nonzero value is one object, whatever its
  shape: values need not be consecutive, and an object may have several connected pieces. A
  binary mask is therefore *one* object; call :func:`to_instances` first to split it into
  connected components. Scores do not depend on which values are used (up to exact ties in
  AJI's arg-max, broken towards the smallest prediction label).
* **Ignore mask.** ``ignore`` (HxW, bool or integer, nonzero = ignored; e.g. NuInsSeg's
  ambiguous regions) removes those pixels from both maps before anything is counted: they are
  never TP / FP / FN, object areas and overlaps exclude them, and an object lying entirely
  inside the ignored region does not exist (it is neither counted nor missed).
* **Matching.** IoU thresholds are strict (a pair matches at ``t`` when IoU > t) and compared
  in exact integer arithmetic (``100 * intersection > 100t * union``). For t >= 0.5 a ground-truth
  object can overlap at most one prediction that much (predictions are disjoint), so the
  matching is unique without any assignment step. ``mean_matched_iou`` is the mean IoU of the
  pairs matched at 0.5, which is by definition the same number as ``sq``.
* **AJI** (Kumar et al., IEEE TMI 2017, Algorithm 1): each ground-truth object is paired
  with the prediction of highest IoU among those it overlaps; pair intersections go to C,
  pair unions to U; a prediction may be chosen by several ground-truth objects (its area then
  enters U several times); predictions never chosen add their area to U; a ground-truth object
  that overlaps no prediction adds its own area to U (as in the MoNuSeg and HoVer-Net code).
* **AJI+** (Graham et al., Med. Image Anal. 2019, HoVer-Net ``get_fast_aji_plus``): pairs
  are a one-to-one assignment maximising the summed IoU (Hungarian, over overlapping pairs
  only); unpaired ground-truth and predicted objects add their areas to the union.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
from scipy import ndimage

from samlora.metrics.overlaps import PairCounts, average_precision, max_iou_matching, overlap_table

#: IoU thresholds 0.50, 0.55, ..., 0.95 of the ``f1@t`` family, as integer percents (exact).
IOU_THRESHOLD_PERCENTS: tuple[int, ...] = tuple(range(50, 100, 5))

#: Score keys of :func:`semantic_metrics` (counts ``tp``, ``fp``, ``fn`` come besides).
SEMANTIC_SCORE_KEYS: tuple[str, ...] = ("dice", "iou", "precision", "recall")
SEMANTIC_COUNT_KEYS: tuple[str, ...] = ("tp", "fp", "fn")

#: Headline score keys of :func:`instance_metrics`, for short tables.
INSTANCE_HEADLINE_KEYS: tuple[str, ...] = ("aji", "aji_plus", "pq", "sq", "rq", "f1", "precision", "recall",
                                           "mean_matched_iou")
#: Raw sums of :func:`instance_metrics` that :func:`pooled_instance_metrics` adds up.
INSTANCE_COUNT_KEYS: tuple[str, ...] = (
    "n_gt", "n_pred", "tp", "fp", "fn", "sum_matched_iou",
    "aji_intersection", "aji_union", "aji_plus_intersection", "aji_plus_union",
) + tuple(f"tp@{p / 100:.2f}" for p in IOU_THRESHOLD_PERCENTS)


def threshold_key(name: str, percent: int) -> str:
    """Column name of a per-threshold value, e.g. ``threshold_key("f1", 75) == "f1@0.75"``."""
    return f"{name}@{percent / 100:.2f}"


def instance_score_keys() -> tuple[str, ...]:
    """All float score keys of :func:`instance_metrics` (headline keys, then per threshold)."""
    per_threshold = tuple(
        threshold_key(name, p)
        for name in ("f1", "precision", "recall")
        for p in IOU_THRESHOLD_PERCENTS
    )
    return INSTANCE_HEADLINE_KEYS + per_threshold


# --------------------------------------------------------------------------- validation


def check_label_map(arr: np.ndarray, name: str) -> np.ndarray:
    """Return ``arr`` as an HxW non-negative integer array, or raise ``ValueError``."""
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D HxW label map, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.view(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{name} must have an integer or bool dtype, got {arr.dtype} "
            "(threshold probabilities / cast labels before computing metrics)"
        )
    if np.issubdtype(arr.dtype, np.signedinteger) and arr.size and arr.min() < 0:
        raise ValueError(f"{name} has negative labels (min {arr.min()}); labels must be >= 0")
    return arr


def check_inputs(
    gt: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate ``gt`` / ``pred`` / ``ignore``; return them with ``ignore`` as bool or None."""
    gt = check_label_map(gt, "gt")
    pred = check_label_map(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred shapes differ: gt {gt.shape} vs pred {pred.shape}")
    if ignore is not None:
        ignore = np.asarray(ignore)
        if ignore.shape != gt.shape:
            raise ValueError(
                f"ignore mask shape {ignore.shape} differs from gt/pred shape {gt.shape}"
            )
        if ignore.dtype != bool:
            if not np.issubdtype(ignore.dtype, np.integer):
                raise ValueError(f"ignore must be a bool or integer mask, got {ignore.dtype}")
            ignore = ignore != 0
    return gt, pred, ignore


def _ratio(num: float, den: float, both_empty: bool) -> float:
    """``num / den``; if ``den == 0``: 1.0 when both inputs are empty, else 0.0."""
    if den == 0:
        return 1.0 if both_empty else 0.0
    return float(num) / float(den)


# --------------------------------------------------------------------------- semantic


def _semantic_scores(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    """Scores from pixel counts; shared by the per-image and the pooled function."""
    both_empty = tp + fp + fn == 0  # no foreground in gt nor in pred
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        "precision": _ratio(tp, tp + fp, both_empty),
        "recall": _ratio(tp, tp + fn, both_empty),
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
    }


def semantic_metrics(
    gt: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None = None
) -> dict[str, float | int]:
    """Per-image foreground Dice, IoU, precision and recall (pixel level).

    Args:
        gt: HxW ground truth, integer or bool; any nonzero value is foreground.
        pred: HxW prediction, same shape and rules as ``gt``.
        ignore: optional HxW mask (bool, or integer with nonzero = ignored); those pixels
            are left out of every count.

    Returns:
        ``{"dice", "iou", "precision", "recall"}`` as floats in [0, 1] and the pixel counts
        ``{"tp", "fp", "fn"}`` as ints (feed a list of these dicts to
        :func:`pooled_semantic_metrics`). Zero denominators follow the module convention:
        1.0 if gt and pred are both empty, else 0.0.

    Raises:
        ValueError: shapes differ, not 2-D, float dtype, or negative labels.
    """
    gt, pred, ignore = check_inputs(gt, pred, ignore)
    g = gt != 0
    p = pred != 0
    if ignore is not None:
        keep = ~ignore
        g &= keep
        p &= keep
    tp = int(np.count_nonzero(g & p))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(g)) - tp
    return _semantic_scores(tp, fp, fn)


def _sum_counts(rows: Iterable[Mapping[str, float]], keys: tuple[str, ...], what: str) -> dict:
    """Sum ``keys`` over ``rows``; ValueError on no rows or a missing key."""
    totals = dict.fromkeys(keys, 0)
    n_rows = 0
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(
                f"row {i} lacks {missing}: pool the dicts returned by {what}, not a summary"
            )
        for k in keys:
            totals[k] += row[k]
        n_rows += 1
    if n_rows == 0:
        raise ValueError(f"nothing to pool: no per-image results of {what} were given")
    return totals


def pooled_semantic_metrics(rows: Iterable[Mapping[str, float]]) -> dict[str, float | int]:
    """Dataset-level (pooled) scores: sum TP / FP / FN over images, then compute once.

    This is not the mean of the per-image scores: large objects and images weigh more, and
    images without foreground do not count as perfect or failed images.

    Args:
        rows: the dicts returned by :func:`semantic_metrics`, one per image.

    Returns:
        The same keys as :func:`semantic_metrics`, counts summed over images.

    Raises:
        ValueError: ``rows`` is empty or a row lacks ``tp`` / ``fp`` / ``fn``.
    """
    totals = _sum_counts(rows, SEMANTIC_COUNT_KEYS, "semantic_metrics")
    return _semantic_scores(totals["tp"], totals["fp"], totals["fn"])


# --------------------------------------------------------------------------- instance


def to_instances(mask: np.ndarray, connectivity: int = 8) -> np.ndarray:
    """Connected components of the foreground: one object per component.

    Use this for binary predictions or masks; on a label map, touching objects with different
    labels are merged (only foreground vs background is looked at).

    Args:
        mask: HxW integer or bool array; nonzero is foreground.
        connectivity: 4 (edge neighbours) or 8 (edge and corner neighbours).

    Returns:
        HxW int32 label map, background 0, components numbered 1..N.

    Raises:
        ValueError: not 2-D, float dtype, negative values, or a bad ``connectivity``.
    """
    mask = check_label_map(mask, "mask")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    labels, _ = ndimage.label(mask != 0, structure=structure, output=np.int32)
    return labels


def _overlaps(
    gt: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Object areas and the sparse table of overlapping (gt, pred) pairs (overlaps.py).

    Returns:
        ``(area_gt, area_pred, pair_gt, pair_pred, inter)``: (G,) and (P,) int64 areas of the
        compacted objects; (K,) int64 indices (0-based, in label order) of the K overlapping
        pairs and their (K,) int64 intersections (all > 0), sorted by (gt, pred).
    """
    table = overlap_table(gt, pred, None if ignore is None else ~ignore)
    return table.area_a, table.area_b, table.pair_a, table.pair_b, table.inter


def _aji_sums(
    area_gt: np.ndarray, area_pred: np.ndarray,
    pair_gt: np.ndarray, pair_pred: np.ndarray, inter: np.ndarray, union: np.ndarray,
) -> tuple[int, int]:
    """Kumar et al.'s AJI intersection and union sums (see the module docstring)."""
    if len(inter) == 0:
        return 0, int(area_gt.sum() + area_pred.sum())
    # Best prediction per gt object: sort by gt, IoU descending, pred index ascending (ties go
    # to the smallest prediction label) and take the first pair of each gt. IoU as a double is
    # exact enough: equal fractions give equal doubles, and distinct fractions with
    # denominators below 2**26 differ by far more than the rounding error.
    iou = inter / union
    order = np.lexsort((pair_pred, -iou, pair_gt))
    sorted_gt = pair_gt[order]
    first = order[np.r_[True, sorted_gt[1:] != sorted_gt[:-1]]]
    total_inter = int(inter[first].sum())
    total_union = int(union[first].sum())
    gt_paired = np.zeros(len(area_gt), dtype=bool)
    gt_paired[pair_gt[first]] = True
    pred_used = np.zeros(len(area_pred), dtype=bool)
    pred_used[pair_pred[first]] = True
    total_union += int(area_gt[~gt_paired].sum()) + int(area_pred[~pred_used].sum())
    return total_inter, total_union


def _aji_plus_sums(
    area_gt: np.ndarray, area_pred: np.ndarray,
    pair_gt: np.ndarray, pair_pred: np.ndarray, inter: np.ndarray, union: np.ndarray,
) -> tuple[int, int]:
    """AJI+ intersection and union sums: one-to-one pairs of maximal summed IoU.

    The assignment decomposes over connected components of the overlap graph, so the
    Hungarian algorithm only runs on the (small) components with more than one pair.
    """
    n_gt, n_pred = len(area_gt), len(area_pred)
    if len(inter) == 0:
        return 0, int(area_gt.sum() + area_pred.sum())
    sel = max_iou_matching(pair_gt, pair_pred, inter / union, n_gt, n_pred)
    total_inter = int(inter[sel].sum())
    total_union = int(union[sel].sum())
    gt_paired = np.zeros(n_gt, dtype=bool)
    gt_paired[pair_gt[sel]] = True
    pred_paired = np.zeros(n_pred, dtype=bool)
    pred_paired[pair_pred[sel]] = True
    total_union += int(area_gt[~gt_paired].sum()) + int(area_pred[~pred_paired].sum())
    return total_inter, total_union


def _instance_scores(counts: Mapping[str, float]) -> dict[str, float | int]:
    """Scores from the raw sums of :data:`INSTANCE_COUNT_KEYS` (per image or pooled)."""
    n_gt, n_pred = int(counts["n_gt"]), int(counts["n_pred"])
    both_empty = n_gt == 0 and n_pred == 0
    tp, fp, fn = int(counts["tp"]), int(counts["fp"]), int(counts["fn"])
    sq = _ratio(counts["sum_matched_iou"], tp, both_empty)
    rq = _ratio(tp, tp + 0.5 * fp + 0.5 * fn, both_empty)
    out: dict[str, float | int] = {
        "aji": _ratio(counts["aji_intersection"], counts["aji_union"], both_empty),
        "aji_plus": _ratio(counts["aji_plus_intersection"], counts["aji_plus_union"], both_empty),
        "pq": sq * rq,
        "sq": sq,
        "rq": rq,
        "f1": _ratio(2 * tp, n_gt + n_pred, both_empty),
        "precision": _ratio(tp, n_pred, both_empty),
        "recall": _ratio(tp, n_gt, both_empty),
        "mean_matched_iou": sq,
    }
    for p in IOU_THRESHOLD_PERCENTS:
        tp_t = int(counts[threshold_key("tp", p)])
        out[threshold_key("f1", p)] = _ratio(2 * tp_t, n_gt + n_pred, both_empty)
        out[threshold_key("precision", p)] = _ratio(tp_t, n_pred, both_empty)
        out[threshold_key("recall", p)] = _ratio(tp_t, n_gt, both_empty)
    for key in INSTANCE_COUNT_KEYS:
        value = counts[key]
        out[key] = float(value) if key == "sum_matched_iou" else int(value)
    return out


def instance_metrics(
    gt: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None = None
) -> dict[str, float | int]:
    """Per-image instance metrics: AJI, AJI+, PQ / SQ / RQ, F1 at IoU 0.5 ... 0.95.

    Args:
        gt: HxW ground-truth label map, integer or bool; 0 is background, every other value
            is one object (values need not be consecutive; a binary mask is one object, use
            :func:`to_instances` to split it into connected components).
        pred: HxW predicted label map, same shape and rules as ``gt``.
        ignore: optional HxW mask (bool, or integer with nonzero = ignored) of pixels removed
            from both maps before counting.

    Returns:
        A flat dict (see the module docstring for definitions and conventions):

        * floats in [0, 1]: ``aji``, ``aji_plus``, ``pq``, ``sq``, ``rq``, ``f1``,
          ``precision``, ``recall`` (matching at IoU > 0.5; ``f1 == rq``),
          ``mean_matched_iou`` (== ``sq``), and ``f1@t``, ``precision@t``, ``recall@t`` for
          t in 0.50, 0.55, ..., 0.95 (keys like ``"f1@0.75"``);
        * ints: ``n_gt``, ``n_pred``, ``tp``, ``fp``, ``fn`` (at IoU > 0.5), ``tp@t``,
          ``aji_intersection``, ``aji_union``, ``aji_plus_intersection``, ``aji_plus_union``
          (pixel sums); float ``sum_matched_iou``. These make
          :func:`pooled_instance_metrics` possible.

    Raises:
        ValueError: shapes differ, not 2-D, float dtype, or negative labels.
    """
    gt, pred, ignore = check_inputs(gt, pred, ignore)
    area_gt, area_pred, pair_gt, pair_pred, inter = _overlaps(gt, pred, ignore)
    union = area_gt[pair_gt] + area_pred[pair_pred] - inter
    n_gt, n_pred = len(area_gt), len(area_pred)

    counts: dict[str, float] = {"n_gt": n_gt, "n_pred": n_pred}
    for p in IOU_THRESHOLD_PERCENTS:
        counts[threshold_key("tp", p)] = int(np.count_nonzero(100 * inter > p * union))
    matched = 2 * inter > union  # IoU > 0.5: unique pairs
    tp = int(np.count_nonzero(matched))
    counts.update(
        tp=tp, fp=n_pred - tp, fn=n_gt - tp,
        sum_matched_iou=float(np.sum(inter[matched] / union[matched])),
    )
    counts["aji_intersection"], counts["aji_union"] = _aji_sums(
        area_gt, area_pred, pair_gt, pair_pred, inter, union
    )
    counts["aji_plus_intersection"], counts["aji_plus_union"] = _aji_plus_sums(
        area_gt, area_pred, pair_gt, pair_pred, inter, union
    )
    return _instance_scores(counts)


def pooled_instance_metrics(rows: Iterable[Mapping[str, float]]) -> dict[str, float | int]:
    """Dataset-level (pooled, "aggregated") instance metrics from per-image results.

    AJI and AJI+ are summed intersections over summed unions across images (the way AJI is
    defined on a dataset in the literature); PQ, SQ, RQ, F1, precision and recall come from
    summed TP / FP / FN / matched IoU. Not the mean of the per-image scores.

    Args:
        rows: the dicts returned by :func:`instance_metrics`, one per image.

    Returns:
        The same keys as :func:`instance_metrics`, counts summed over images.

    Raises:
        ValueError: ``rows`` is empty or a row lacks one of :data:`INSTANCE_COUNT_KEYS`.
    """
    totals = _sum_counts(rows, INSTANCE_COUNT_KEYS, "instance_metrics")
    return _instance_scores(totals)


# --------------------------------------------------------------------------- volumes

#: Keys of :func:`volume_metrics`, in its order: the scores, then the counts.
VOLUME_SCORE_KEYS: tuple[str, ...] = ("dice", "iou", "precision50", "recall50", "f1_50", "ap50", "ap75")
VOLUME_COUNT_KEYS: tuple[str, ...] = ("n_gt", "n_pred", "tp50", "tp75")


def _volume_counts(gt: np.ndarray, pred: np.ndarray) -> PairCounts:
    """The contingency table of two ZxHxW label volumes (numpy arrays, or zarr / dask arrays read
    one section at a time), counted section by section."""
    shape_gt, shape_pred = tuple(gt.shape), tuple(pred.shape)
    if len(shape_gt) != 3 or shape_gt != shape_pred:
        raise ValueError(f"gt and pred must be ZxHxW volumes of one shape, got {shape_gt} and {shape_pred}")
    counts = PairCounts()
    for z in range(shape_gt[0]):
        counts.add(check_label_map(np.asarray(gt[z]), "gt"), check_label_map(np.asarray(pred[z]), "pred"))
    return counts


def volume_metrics(gt: np.ndarray, pred: np.ndarray,
                   scores: Mapping[int, float] | None = None) -> dict[str, float | int]:
    """3-D scores of a ZxHxW prediction against ZxHxW ground truth (every non-zero value one 3-D object).

    * ``dice``, ``iou``: of the foreground voxels over the whole volume (the EPFL/Lucchi convention).
    * ``precision50``, ``recall50``, ``f1_50``: 3-D objects matched one to one at IoU > 0.5 (unique,
      as in 2-D: objects are disjoint), over ``n_pred`` / ``n_gt`` / their mean.
    * ``ap50``, ``ap75``: average precision at 3-D IoU > 0.5 and > 0.75 (the MitoEM convention: COCO's
      101-point AP, :func:`overlaps.average_precision`), predictions ranked by ``scores`` ({label: score},
      higher first) or, without them, by size in voxels as MitoEM's evaluation ranks them; ties by
      label. Thresholds are strict (IoU > t), as everywhere in this module; COCO uses >=.

    Counted section by section (:class:`overlaps.PairCounts`), never the whole volume at once;
    empty volumes follow the module convention. Also returns ``n_gt``, ``n_pred``, ``tp50``, ``tp75``
    (keys in the order of :data:`VOLUME_SCORE_KEYS` then :data:`VOLUME_COUNT_KEYS`).
    """
    counts = _volume_counts(gt, pred)
    va, vb, voxels = counts.pairs
    tp, fp, fn = (int(voxels[((va > 0) == g) & ((vb > 0) == p)].sum()) for g, p in ((1, 1), (0, 1), (1, 0)))
    out: dict[str, float | int] = {k: v for k, v in _semantic_scores(tp, fp, fn).items() if k in ("dice", "iou")}
    table = counts.overlaps()
    n_gt, n_pred = len(table.area_a), len(table.area_b)
    both_empty = n_gt == 0 and n_pred == 0
    key = table.area_b if scores is None else np.array([scores[int(i)] for i in table.ids_b], float)
    rank = np.lexsort((table.ids_b, -key))
    for t in (50, 75):
        good = 100 * table.inter > t * table.union  # exact: IoU > t / 100
        matched = np.zeros(n_pred, bool)
        matched[table.pair_b[good]] = True
        out[f"tp{t}"], out[f"ap{t}"] = int(good.sum()), average_precision(matched[rank], n_gt)
    out |= dict(precision50=_ratio(out["tp50"], n_pred, both_empty), recall50=_ratio(out["tp50"], n_gt, both_empty),
                f1_50=_ratio(2 * out["tp50"], n_gt + n_pred, both_empty), n_gt=n_gt, n_pred=n_pred)
    return {key: out[key] for key in (*VOLUME_SCORE_KEYS, *VOLUME_COUNT_KEYS)}  # a fixed order: report columns


def adapted_rand_error(gt: np.ndarray, pred: np.ndarray) -> float:
    """The adapted Rand error (CREMI, SNEMI3D) of a ZxHxW or HxW segmentation; 0 is perfect.

    Over the pairs of ground-truth foreground voxels (gt != 0; ``pred`` background is a segment):
    precision = the share of pairs in one ``pred`` segment that share a ``gt`` object, recall = the
    share of pairs in one ``gt`` object that share a ``pred`` segment; error = 1 - their F-score.
    From the contingency table n_ij: (sum n_ij^2 - N) / (sum b_j^2 - N), resp. (sum a_i^2 - N).
    """
    if len(gt.shape) == 2:  # one section: small enough to hold
        gt, pred = np.asarray(gt)[None], np.asarray(pred)[None]
    va, vb, n = _volume_counts(gt, pred).pairs
    fg = va > 0
    n = n[fg].astype(np.float64)
    a, b = (np.bincount(np.unique(v[fg], return_inverse=True)[1].ravel(), weights=n) for v in (va, vb))
    both, split, merge = float(n @ n - n.sum()), float(a @ a - n.sum()), float(b @ b - n.sum())
    if split == 0 or merge == 0:  # no pair of foreground voxels in one gt object or one pred segment
        return 0.0 if split == merge else 1.0
    precision, recall = both / merge, both / split
    return 1.0 - (2 * precision * recall / (precision + recall) if both else 0.0)
