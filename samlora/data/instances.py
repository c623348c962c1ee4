"""Object masks and the instance label maps painted from them (overlaps go to the higher score).

Every command that turns masks into one ``HxW`` label map (evaluate, demo, detect, training-time
validation, the box / ellipse baselines) paints them with :func:`paint_instances`, so a pixel
covered by several masks is resolved by one rule everywhere: the higher ``score`` wins, then the
higher ``confidence``, then the mask that comes later.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("box", "ellipse")


@dataclass
class Instance:
    """One object found in an image.

    ``mask`` is the bool crop of the object at ``window`` = (x0, y0, x1, y1), array-slice bounds
    in pixels of the image (max corner exclusive: ``image[y0:y1, x0:x1]``; a crop window, not a
    box prompt, see prompts.py for those). ``score`` decides overlaps (SAM's predicted IoU),
    ``confidence`` breaks ties (a detector's confidence; = score otherwise). ``label`` is the id
    to paint it with (a ground-truth object id), or None to number objects by score.
    """

    window: tuple[int, int, int, int]
    mask: np.ndarray
    score: float
    confidence: float
    label: int | None = None

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def shifted(self, dy: int, dx: int) -> "Instance":
        """The same object in a frame whose origin lies at (-dy, -dx) (a tile -> its image)."""
        x0, y0, x1, y1 = self.window
        return Instance((x0 + dx, y0 + dy, x1 + dx, y1 + dy), self.mask, self.score, self.confidence, self.label)


def instance_from_mask(mask: np.ndarray, score: float, confidence: float | None = None,
                       label: int | None = None) -> Instance | None:
    """HxW bool mask -> :class:`Instance` cropped to its extent (None for an empty mask)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    confidence = score if confidence is None else confidence
    return Instance((x0, y0, x1, y1), np.ascontiguousarray(mask[y0:y1, x0:x1]), float(score), float(confidence),
                    label)


def paint_instances(instances: list[Instance], shape: tuple[int, int],
                    min_area: int = 0) -> tuple[np.ndarray, list[Instance]]:
    """Paint instances into one ``HxW`` int32 label map (0 background).

    Where masks overlap, the higher ``score`` wins, then the higher ``confidence``, then the
    later instance. Objects left with fewer than ``min_area`` pixels (at least 1) are dropped.
    Instances with a ``label`` keep it; the others are numbered 1..K by decreasing score.
    Returns the map and the kept instances (label order for numbered ones, else input order).
    """
    order = sorted(range(len(instances)), key=lambda i: (instances[i].score, instances[i].confidence))
    painted = np.zeros(shape, np.int32)  # position in ``order`` + 1
    for value, i in enumerate(order, start=1):
        x0, y0, x1, y1 = instances[i].window
        painted[y0:y1, x0:x1][instances[i].mask] = value
    areas = np.bincount(painted.ravel(), minlength=len(order) + 1)[1:]
    keep = np.flatnonzero(areas >= max(min_area, 1))[::-1]  # painted values, highest score first
    lut = np.zeros(len(order) + 1, np.int32)
    if all(instances[i].label is not None for i in order) and order:
        lut[keep + 1] = [instances[order[v]].label for v in keep]
        kept = [instances[i] for i in sorted(order[v] for v in keep)]
    else:
        lut[keep + 1] = np.arange(1, keep.size + 1, dtype=np.int32)
        kept = [instances[order[v]] for v in keep]
    return lut[painted], kept


def ellipse_mask(height: int, width: int) -> np.ndarray:
    """``height x width`` bool: the ellipse inscribed in the rectangle of those pixels.

    A pixel belongs when its centre satisfies ((x - cx) / a)^2 + ((y - cy) / b)^2 <= 1 with
    the centre and semi-axes a = width / 2, b = height / 2 of the pixel rectangle.
    """
    yy = (np.arange(height) + 0.5 - height / 2.0) / (height / 2.0)
    xx = (np.arange(width) + 0.5 - width / 2.0) / (width / 2.0)
    return yy[:, None] ** 2 + xx[None, :] ** 2 <= 1.0


def shape_instances(boxes: np.ndarray, shape: tuple[int, int], kind: str = "box",
                    labels: np.ndarray | None = None) -> list[Instance]:
    """The trivial prediction of each box prompt: the box filled, or its inscribed ellipse.

    ``boxes``: Nx4 xyxy with inclusive max corners (prompts.py), rounded outwards to whole
    pixels and clipped to the ``HxW`` image. Scores are minus the areas, so where shapes overlap
    the smaller one wins (a small object inside a large box stays visible). ``labels``: N ids.
    """
    if kind not in SHAPES:
        raise ValueError(f"shape kind must be one of {SHAPES}, got {kind!r}")
    height, width = shape
    out = []
    for row, box in enumerate(np.asarray(boxes, np.float64).reshape(-1, 4)):
        x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
        x1, y1 = min(width - 1, int(np.ceil(box[2]))), min(height - 1, int(np.ceil(box[3])))
        if x1 < x0 or y1 < y0:
            continue
        h, w = y1 - y0 + 1, x1 - x0 + 1
        mask = np.ones((h, w), bool) if kind == "box" else ellipse_mask(h, w)
        label = None if labels is None else int(labels[row])
        out.append(Instance((x0, y0, x1 + 1, y1 + 1), mask, -float(mask.sum()), -float(mask.sum()), label))
    return out


def box_baseline(boxes: np.ndarray, shape: tuple[int, int], kind: str = "box",
                 labels: np.ndarray | None = None) -> np.ndarray:
    """``HxW`` int32 label map of :func:`shape_instances` (the box / ellipse baselines)."""
    return paint_instances(shape_instances(boxes, shape, kind, labels), shape)[0]
