"""Overlap tables of two label maps (any dimension) and the one-to-one matching of maximal summed IoU.

The counting behind every instance score (metrics.py) and behind linking sections into 3-D
objects (volumes.py): labels are compacted to 0..n, the overlapping (a, b) pairs are counted
with ``np.bincount`` (or ``np.unique`` of pair keys when the dense table would be large), never
with Python loops over pixels. :class:`PairCounts` adds the same table up section by section, so
a volume never needs to be flattened at once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

log = logging.getLogger(__name__)

# Above this many (a, b) cells the overlap table is built with np.unique instead of a dense
# bincount (memory: 8 bytes per cell).
DENSE_PAIR_LIMIT = 1 << 22
# Label maps whose largest value is below this are compacted with a lookup table (O(pixels)).
LUT_LABEL_LIMIT = 1 << 22
# PairCounts folds its per-section tables into one after this many sections (short lists, bounded memory).
FOLD_IN_SECTIONS = 64


@dataclass
class Overlaps:
    """The objects of two label maps and their overlapping pairs.

    ``area_a`` (A,) and ``area_b`` (B,) int64 object sizes of the compacted objects (index k is
    the k-th smallest non-zero value, ``ids_a`` / ``ids_b``); ``pair_a``, ``pair_b`` (K,) int64 indices of the K
    overlapping pairs, sorted by (a, b); ``inter`` (K,) int64 their intersections (all > 0).
    """

    area_a: np.ndarray
    area_b: np.ndarray
    pair_a: np.ndarray
    pair_b: np.ndarray
    inter: np.ndarray
    ids_a: np.ndarray | None = None  # (A,) the label value of each object, where known
    ids_b: np.ndarray | None = None

    @property
    def union(self) -> np.ndarray:
        """(K,) int64 union of each overlapping pair."""
        return self.area_a[self.pair_a] + self.area_b[self.pair_b] - self.inter

    @property
    def iou(self) -> np.ndarray:
        """(K,) float64 IoU of each overlapping pair."""
        return self.inter / np.maximum(self.union, 1)


def compact_labels(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Map the non-zero values of a flat label array onto 1..n (0 stays 0), keeping their order.

    Args:
        labels: flat (N,) non-negative integer array.

    Returns:
        ``(idx, n)``: (N,) int64 compact labels and the number of objects n.
    """
    if labels.size == 0:
        return labels.astype(np.int64), 0
    top = int(labels.max())
    if top < LUT_LABEL_LIMIT:
        labels = labels.astype(np.intp, copy=False)  # uint64 cannot index / bincount safely
        present = np.bincount(labels, minlength=top + 1) > 0
        present[0] = False
        lut = np.cumsum(present, dtype=np.int64)
        lut[0] = 0
        return lut[labels], int(lut[-1])
    values, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.astype(np.int64).ravel()
    if values[0] == 0:
        return inverse, len(values) - 1
    return inverse + 1, len(values)


def overlap_table(a: np.ndarray, b: np.ndarray, keep: np.ndarray | None = None) -> Overlaps:
    """The :class:`Overlaps` of two label maps of one shape (any dimension; 0 is background).

    ``keep`` (same shape, bool) leaves the other pixels out of areas and overlaps alike.
    """
    g, p = a.ravel(), b.ravel()
    if keep is not None:
        g, p = g[keep.ravel()], p[keep.ravel()]
    gi, n_a = compact_labels(g)
    pi, n_b = compact_labels(p)
    area_a = np.bincount(gi, minlength=n_a + 1)[1:]
    area_b = np.bincount(pi, minlength=n_b + 1)[1:]
    empty = np.zeros(0, dtype=np.int64)
    if n_b == 0:
        return Overlaps(area_a, area_b, empty, empty, empty)
    both = (gi > 0) & (pi > 0)
    keys = (gi[both] - 1) * n_b + (pi[both] - 1)
    if n_a * n_b <= DENSE_PAIR_LIMIT:
        table = np.bincount(keys, minlength=n_a * n_b)
        cells = np.flatnonzero(table)
        inter = table[cells]
    else:
        cells, inter = np.unique(keys, return_counts=True)
    return Overlaps(area_a, area_b, cells // n_b, cells % n_b, inter.astype(np.int64))


def max_iou_matching(pair_a: np.ndarray, pair_b: np.ndarray, iou: np.ndarray, n_a: int, n_b: int) -> np.ndarray:
    """The one-to-one matching of maximal summed IoU among the given pairs.

    Args:
        pair_a, pair_b: (K,) indices (0..n_a-1, 0..n_b-1) of the candidate pairs, each pair once.
        iou: (K,) their weights (IoU > 0).
        n_a, n_b: the number of objects on each side.

    Returns:
        The indices (into the K pairs) of the chosen pairs. The assignment decomposes over the
        connected components of the candidate graph, so the Hungarian algorithm
        (scipy's ``linear_sum_assignment``) only runs on components of more than one pair.
    """
    if len(pair_a) == 0:
        return np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(pair_a)), (pair_a, n_a + pair_b)), shape=(n_a + n_b,) * 2)
    _, component = connected_components(graph, directed=False)
    pair_component = component[pair_a]
    pairs_per_component = np.bincount(pair_component)
    single = pairs_per_component[pair_component] == 1
    chosen = [np.flatnonzero(single)]  # components with one pair: that pair is the match
    multi = np.flatnonzero(~single)
    if len(multi):
        multi = multi[np.argsort(pair_component[multi], kind="stable")]
        bounds = np.flatnonzero(np.diff(pair_component[multi])) + 1
        log.debug("Hungarian matching on %d overlap components (largest %d pairs)", len(bounds) + 1,
                  int(pairs_per_component.max()))
        for block in np.split(multi, bounds):
            rows, row_idx = np.unique(pair_a[block], return_inverse=True)
            cols, col_idx = np.unique(pair_b[block], return_inverse=True)
            cost = np.zeros((len(rows), len(cols)))
            cost[row_idx, col_idx] = -iou[block]
            pair_of_cell = np.full((len(rows), len(cols)), -1, dtype=np.int64)
            pair_of_cell[row_idx, col_idx] = block
            r, c = linear_sum_assignment(cost)
            picked = pair_of_cell[r, c]
            chosen.append(picked[picked >= 0])  # drop assignments of cells that are no pair
    return np.sort(np.concatenate(chosen))


class PairCounts:
    """The contingency table of two label volumes, added up one section at a time.

    ``add(a, b)`` counts the (value of a, value of b) pairs of one section (background included);
    :meth:`overlaps` gives the :class:`Overlaps` of the whole volume, :attr:`pairs` the raw table.
    Memory: one section and the distinct pairs seen, never the volume.
    """

    def __init__(self) -> None:
        self._keys: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        self._pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        """Count one pair of same-shaped label sections (non-negative integers below 2**32)."""
        if a.shape != b.shape:
            raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
        if max(int(a.max(initial=0)), int(b.max(initial=0))) >= 1 << 32:
            raise ValueError("label values must be below 2**32")
        self._pairs = None
        keys = (a.astype(np.uint64).ravel() << np.uint64(32)) | b.astype(np.uint64).ravel()
        keys, counts = np.unique(keys, return_counts=True)
        self._keys.append(keys)
        self._counts.append(counts)
        if len(self._keys) >= FOLD_IN_SECTIONS:
            va, vb, counts = self.pairs
            self._keys, self._counts = [(va << np.uint64(32)) | vb], [counts]

    @property
    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(value_a, value_b, count)``: (K,) uint64, uint64, int64 of every distinct pair."""
        if self._pairs is None:
            keys = np.concatenate(self._keys) if self._keys else np.zeros(0, np.uint64)
            keys, inverse = np.unique(keys, return_inverse=True)
            weights = np.concatenate(self._counts) if self._counts else np.zeros(0)
            counts = np.bincount(inverse.ravel(), weights=weights, minlength=len(keys)).astype(np.int64)
            self._pairs = (keys >> np.uint64(32), keys & np.uint64(0xFFFFFFFF), counts)
        return self._pairs

    def overlaps(self) -> Overlaps:
        """The :class:`Overlaps` of everything added (objects compacted in value order)."""
        va, vb, counts = self.pairs
        ids_a, ia = np.unique(va[va > 0], return_inverse=True)
        ids_b, ib = np.unique(vb[vb > 0], return_inverse=True)
        area_a = np.bincount(ia.ravel(), weights=counts[va > 0], minlength=len(ids_a)).astype(np.int64)
        area_b = np.bincount(ib.ravel(), weights=counts[vb > 0], minlength=len(ids_b)).astype(np.int64)
        both = (va > 0) & (vb > 0)
        pair_a = np.searchsorted(ids_a, va[both]).astype(np.int64)
        pair_b = np.searchsorted(ids_b, vb[both]).astype(np.int64)
        order = np.lexsort((pair_b, pair_a))
        return Overlaps(area_a, area_b, pair_a[order], pair_b[order], counts[both][order], ids_a, ids_b)


def average_precision(matched: np.ndarray, n_gt: int) -> float:
    """COCO's 101-point interpolated average precision of predictions in ranking order.

    ``matched``: (P,) bool, whether each prediction (best ranked first) is a true positive.
    The precision is made non-increasing in recall, then averaged at recall 0, 0.01, ..., 1
    (0 where that recall is never reached). No ground truth: 1.0 without predictions, else 0.0.
    """
    if n_gt == 0 or len(matched) == 0:
        return float(n_gt == len(matched) == 0)
    tp = np.cumsum(matched)
    precision = np.maximum.accumulate((tp / np.arange(1, len(matched) + 1))[::-1])[::-1]
    at = np.searchsorted(tp / n_gt, np.linspace(0.0, 1.0, 101), side="left")
    return float(np.where(at < len(matched), precision[np.minimum(at, len(matched) - 1)], 0.0).mean())
