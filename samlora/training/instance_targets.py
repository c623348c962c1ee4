"""Training targets of the AIS decoder: instance labels -> foreground, centre and boundary distances.

The same numbers as micro-sam's training (``train_sam(with_segmentation_decoder=True)``), whose
label transform is torch_em's ``PerObjectDistanceTransform(distances=True,
boundary_distances=True, directed_distances=False, foreground=True, instances=True,
min_size=...)`` (micro-sam's default ``min_size`` is 25); the ``instances`` channel it puts first
is the label image itself, returned here by :func:`prepare_labels`. Per object, inside its
bounding box:

* **labels**: connected components of equal-valued pixels (8-connected), objects under
  ``min_size`` pixels removed, renumbered 1..n (:func:`prepare_labels`).
* **foreground**: 1 on objects, 0 on background.
* **centre distance**: the Euclidean distance to the object's centre, divided by its largest
  value on the object (+1e-7), so 0 at the centre and ~1 at the farthest pixel. The centre is the
  centroid rounded to a pixel (numpy's round-half-to-even); when that pixel is not on the object,
  the pixel farthest from the boundary (below) is used.
* **boundary distance**: with d = the Euclidean distance to the nearest *inner boundary* pixel in
  the bounding box (pixels of an object with a 4-neighbour of another value, as skimage's
  ``find_boundaries(mode="inner")``; boundary pixels of other objects in the box count too), and
  m = the first pixel of largest d on the object (row-major), the map is ``(d[m] - d)`` divided
  by its largest value on the object (+1e-7): 0 at the most inner pixel, ~1 on the boundary.
* Both distances are 1.0 on the background (torch_em's ``distance_fill_value``).

Computed with scipy.ndimage only: one pass over the objects' bounding boxes
(``find_objects``), an exact EDT per box, centroids from ``bincount``.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from samlora.metrics.scores import check_label_map

#: The three target channels, in the order of the decoder's output (instance_decoder.MAP_NAMES).
TARGET_NAMES: tuple[str, ...] = ("foreground", "center_distance", "boundary_distance")
EPS = 1e-7  # torch_em's PerObjectDistanceTransform.eps
FILL_VALUE = 1.0  # the distances on the background
MICRO_SAM_MIN_SIZE = 25  # micro-sam's default min_size of train_sam's datasets
_EIGHT = np.ones((3, 3), dtype=bool)
_CROSS = ndimage.generate_binary_structure(2, 1)


def prepare_labels(labels: np.ndarray, min_size: int = 0) -> np.ndarray:
    """HxW labels -> HxW int64: one object per 8-connected piece of one value, objects of fewer
    than ``min_size`` pixels removed, numbered 1..n in row-major order of first appearance.

    Two touching objects of different values stay two objects; a value in two pieces becomes two.
    """
    labels = check_label_map(labels, "labels").astype(np.int64)
    out = np.zeros(labels.shape, dtype=np.int64)
    n = 0
    for value, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        pieces, count = ndimage.label(labels[box] == value, structure=_EIGHT)
        out[box][pieces > 0] = pieces[pieces > 0] + n
        n += count
    if min_size > 0 and n:
        sizes = np.bincount(out.ravel(), minlength=n + 1)
        small = sizes < min_size
        small[0] = True
        out[small[out]] = 0
    return _renumber_by_appearance(out)


def _renumber_by_appearance(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..n in row-major order of each object's first pixel (0 stays 0)."""
    flat = labels.ravel()
    values, first = np.unique(flat, return_index=True)
    keep = values > 0
    values, first = values[keep], first[keep]
    lut = np.zeros(int(flat.max(initial=0)) + 1, dtype=np.int64)
    lut[values[np.argsort(first)]] = np.arange(1, len(values) + 1)
    return lut[labels]


def inner_boundaries(labels: np.ndarray) -> np.ndarray:
    """HxW bool: object pixels with a 4-neighbour of another value (the image edge is no
    neighbour), as skimage's ``find_boundaries(labels, mode="inner")``."""
    upper = ndimage.grey_dilation(labels, footprint=_CROSS, mode="reflect")
    lower = ndimage.grey_erosion(labels, footprint=_CROSS, mode="reflect")
    return (upper != lower) & (labels != 0)


def _centroids(labels: np.ndarray, n: int) -> np.ndarray:
    """(n, 2) int64 centroids (row, col) of objects 1..n, rounded half to even."""
    rows, cols = np.indices(labels.shape)
    flat = labels.ravel()
    count = np.bincount(flat, minlength=n + 1)[1:]
    mean_r = np.bincount(flat, weights=rows.ravel(), minlength=n + 1)[1:] / count
    mean_c = np.bincount(flat, weights=cols.ravel(), minlength=n + 1)[1:] / count
    return np.round(np.stack([mean_r, mean_c], axis=1)).astype(np.int64)


def _object_distances(mask: np.ndarray, boundary: np.ndarray, centre: tuple[int, int]) -> np.ndarray:
    """One object's 2xhxw normalised (centre, boundary) distances in its box (0 off the object).

    ``mask``, ``boundary``: hxw bool of the object and of all inner boundaries in the box;
    ``centre``: its rounded centroid in box coordinates.
    """
    if boundary.any():
        to_boundary = ndimage.distance_transform_edt(~boundary).astype(np.float32)
    else:  # no boundary in the box: the whole image is one object
        to_boundary = np.zeros(mask.shape, dtype=np.float32)
    to_boundary[~mask] = 0
    inner = np.unravel_index(np.argmax(to_boundary), to_boundary.shape)
    if not mask[centre]:
        centre = inner
    rows, cols = np.indices(mask.shape, dtype=np.float32)
    out = np.stack([np.sqrt((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2), to_boundary[inner] - to_boundary])
    out[:, ~mask] = 0
    out /= np.abs(out).reshape(2, -1).max(axis=1)[:, None, None] + np.float32(EPS)
    return out


def instance_targets(labels: np.ndarray, min_size: int = 0) -> np.ndarray:
    """HxW instance labels -> 3xHxW float32 targets: foreground, centre distance, boundary distance.

    Args:
        labels: HxW integer (or bool) instance labels, 0 background; prepared with
            :func:`prepare_labels` first (connected pieces, ``min_size``).
        min_size: objects of fewer pixels become background (micro-sam trains with 25,
            :data:`MICRO_SAM_MIN_SIZE`).

    Returns:
        3xHxW float32 in [0, 1]; the distances are 1.0 on the background (module docstring).
    """
    labels = prepare_labels(labels, min_size)
    n = int(labels.max(initial=0))
    targets = np.full((3,) + labels.shape, FILL_VALUE, dtype=np.float32)
    targets[0] = labels > 0
    if n == 0:
        return targets
    boundaries = inner_boundaries(labels)
    centroids = _centroids(labels, n)
    for index, box in enumerate(ndimage.find_objects(labels)):
        mask = labels[box] == index + 1
        centre = tuple(int(c) - s.start for c, s in zip(centroids[index], box))
        distances = _object_distances(mask, boundaries[box], centre)
        view = targets[(slice(1, 3),) + box]
        view[:, mask] = distances[:, mask]
    return targets
