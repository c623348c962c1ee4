"""Prompts for the objects of one image: the one ``Prompts`` type, and how training and evaluation make them.

Box convention, everywhere in this tool: ``x0, y0, x1, y1`` in pixels of the image with an
**inclusive** max corner (x1 is the last column the object covers), as segment-anything's
``batched_mask_to_box`` gives them and as SAM was trained. Crop windows (``image[y0:y1]``) are
not boxes (instances.py); only YOLO's files and outputs use pixel edges, converted in detector.py.

Evaluation prompts are deterministic (:func:`object_prompts`: the exact box, or the object pixel
farthest from its border); training prompts are sampled (:func:`sample_prompts`: jittered boxes,
one positive point inside and 0..k negative points near the object, as micro-sam trains). Epoch
selection prompts as evaluate does (:func:`selection_prompts`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

PROMPT_MODES = ("box", "point", "mix")  # training: mix = per object one of box / points / box + points
EVAL_PROMPTS = ("box", "point")
BOX, POINTS = 1, 2  # bits of an object's prompt kind: 1 box, 2 points, 3 both


@dataclass
class Prompts:
    """Prompts for N objects of one image, in pixel coordinates of that image.

    Attributes:
        object_ids: ``N`` int32 label values of the objects (the ids their masks are painted with).
        boxes: ``Nx4`` float32 xyxy, inclusive max corner (module docstring).
        points: ``NxKx2`` float32 (x, y): positives first, then negatives.
        point_labels: ``NxK`` int32: 1 positive, 0 negative, -1 padding (no point).
        use_boxes / use_points: which prompts the model is given.
        kinds: ``N`` uint8 per-object prompt kinds (bits ``BOX`` / ``POINTS``) when objects differ
            (training's ``mix``); None: every object takes ``use_boxes`` / ``use_points``.
        masks: ``NxHxW`` bool target masks (training), or None.
        ignore: ``HxW`` bool of pixels the metrics leave out (ambiguous regions, objects left
            out by ``max_objects``), or None.
        mask_inputs: ``Nx(S/4)x(S/4)`` float32 low-resolution mask logits given to the model
            with the other prompts (a neighbouring section's mask, inference.mask_prompt), or None.
    """

    object_ids: np.ndarray
    boxes: np.ndarray
    points: np.ndarray
    point_labels: np.ndarray
    use_boxes: bool = True
    use_points: bool = False
    masks: np.ndarray | None = None
    ignore: np.ndarray | None = None
    kinds: np.ndarray | None = None
    mask_inputs: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.object_ids.shape[0])

    def object_kinds(self) -> np.ndarray:
        """``N`` uint8 prompt kind of each object (bits ``BOX`` / ``POINTS``)."""
        if self.kinds is not None:
            return self.kinds
        return np.full(len(self), BOX * self.use_boxes + POINTS * self.use_points, np.uint8)

    def take(self, order: np.ndarray) -> "Prompts":
        """The same prompts with the objects in ``order`` (N indices)."""
        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[order]

        return Prompts(self.object_ids[order], self.boxes[order], self.points[order], self.point_labels[order],
                       self.use_boxes, self.use_points, pick(self.masks), self.ignore, pick(self.kinds),
                       pick(self.mask_inputs))


def _objects(labels: np.ndarray) -> tuple[list, np.ndarray]:
    """``ndimage.find_objects`` of an ``HxW`` label map and the ids present (ascending, int32)."""
    if labels.ndim != 2:
        raise ValueError(f"labels must be HxW, got shape {labels.shape}")
    slices = ndimage.find_objects(labels.astype(np.int64, copy=False)) if labels.size else []
    return slices, np.array([i + 1 for i, s in enumerate(slices) if s is not None], dtype=np.int32)


def _box(slices: tuple[slice, slice]) -> tuple[int, int, int, int]:
    ys, xs = slices
    return xs.start, ys.start, xs.stop - 1, ys.stop - 1


def label_boxes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``HxW`` instance labels -> (N object ids, Nx4 float32 boxes with inclusive max corners)."""
    slices, ids = _objects(np.asarray(labels))
    boxes = np.array([_box(slices[i - 1]) for i in ids], np.float32).reshape(-1, 4)
    return ids, boxes


def box_prompts(boxes: np.ndarray, object_ids: np.ndarray | None = None) -> Prompts:
    """Box prompts from Nx4 boxes (e.g. a detector's); ids 1..N unless given."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = len(boxes)
    ids = np.arange(1, n + 1, dtype=np.int32) if object_ids is None else np.asarray(object_ids, np.int32)
    return Prompts(ids, boxes, np.zeros((n, 0, 2), np.float32), np.zeros((n, 0), np.int32))


def interior_point(mask: np.ndarray) -> tuple[int, int]:
    """``(y, x)`` of the pixel of ``mask`` (HxW bool) farthest from its border.

    The Euclidean distance transform of the mask padded by one background pixel (so the
    image border counts as border); ties go to the first pixel in row-major order.
    """
    if not mask.any():
        raise ValueError("empty mask has no interior point")
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), mask.shape)
    return int(y), int(x)


def object_prompts(labels: np.ndarray, kind: str = "box", ignore: np.ndarray | None = None,
                   max_objects: int = 0, rng: np.random.Generator | None = None) -> Prompts:
    """Deterministic evaluation prompts, one per object of an ``HxW`` label map.

    Every prompt carries both the object's exact box and one positive point at its deepest pixel
    (:func:`interior_point`); ``kind`` ("box" or "point") says which the model is given.
    ``max_objects`` prompts a random subset (``rng``, default seeded with 0) of at most that many
    objects; the pixels of the others join the returned ``ignore``, so they are neither found
    nor missed. Ids need not be consecutive.
    """
    if kind not in EVAL_PROMPTS:
        raise ValueError(f"kind must be one of {EVAL_PROMPTS}, got {kind!r}")
    labels = np.asarray(labels)
    slices, ids = _objects(labels)
    if max_objects and ids.size > max_objects:
        rng = rng if rng is not None else np.random.default_rng(0)
        keep = np.sort(rng.choice(ids, size=max_objects, replace=False)).astype(np.int32)
        dropped = np.isin(labels, np.setdiff1d(ids, keep))
        ignore = dropped if ignore is None else (ignore | dropped)
        ids = keep
    boxes = np.zeros((ids.size, 4), np.float32)
    points = np.zeros((ids.size, 1, 2), np.float32)
    for row, obj in enumerate(ids):
        ys, xs = slices[obj - 1]
        boxes[row] = _box(slices[obj - 1])
        y, x = interior_point(labels[ys, xs] == obj)
        points[row, 0] = (xs.start + x, ys.start + y)
    return Prompts(ids, boxes, points, np.ones((ids.size, 1), np.int32), use_boxes=kind == "box",
                   use_points=kind == "point", ignore=ignore)


def _jittered_box(slices: tuple[slice, slice], shape: tuple[int, int], jitter: float,
                  rng: np.random.Generator) -> np.ndarray:
    """The object's box with each side moved by up to ``jitter`` x its size, kept in the image."""
    height, width = shape
    x0, y0, x1, y1 = _box(slices)
    w, h = x1 - x0 + 1, y1 - y0 + 1
    box = np.array([x0, y0, x1, y1], np.float64)
    if jitter > 0:
        box += rng.uniform(-jitter, jitter, size=4) * np.array([w, h, w, h])
    box = np.clip(box, 0, [width - 1, height - 1, width - 1, height - 1])
    box[2], box[3] = max(box[2], box[0]), max(box[3], box[1])
    return box


def _check_sampling(prompt: str, num_points: int, box_jitter: float) -> None:
    if prompt not in PROMPT_MODES:
        raise ValueError(f"prompt must be one of {PROMPT_MODES}, got {prompt!r}")
    if num_points < 0:
        raise ValueError(f"num_points (the most negative points) must be >= 0, got {num_points}")
    if not 0.0 <= box_jitter < 0.5:
        raise ValueError(f"box_jitter must be in [0, 0.5), got {box_jitter}")


def sample_prompts(labels: np.ndarray, rng: np.random.Generator, prompt: str = "box",
                   num_points: int = 1, box_jitter: float = 0.1, max_objects: int | None = None,
                   ignore: np.ndarray | None = None) -> Prompts:
    """Sample training prompts (with target masks) for the objects of one ``HxW`` label image.

    Args:
        labels: ``HxW`` integer instance labels (0 background).
        rng: a seeded ``numpy.random.Generator``.
        prompt: "box", "point" or "mix" (per object one of box / points / box + points, as
            micro-sam trains; the kinds are in ``Prompts.kinds``).
        num_points: k: each object's points are one positive point inside it and n negative
            points outside it (near the object when possible, never in ``ignore``), n drawn
            uniformly from 0..k once per image: K = 1 + n points per object. n = 0 is the single
            click users give, answered with SAM's three masks (``PromptTensors.single_click``).
        box_jitter: each box side moves by up to this fraction of the box width / height.
        max_objects: keep a random subset of at most this many objects (None or 0 = all).
        ignore: ``HxW`` bool of ambiguous pixels.
    """
    _check_sampling(prompt, num_points, box_jitter)
    slices, ids = _objects(labels)
    if max_objects and ids.size > max_objects:
        ids = np.sort(rng.choice(ids, size=max_objects, replace=False)).astype(np.int32)
    n = ids.size
    kinds = rng.integers(1, 4, size=n).astype(np.uint8) if prompt == "mix" else None
    negatives = int(rng.integers(0, num_points + 1))
    boxes = np.zeros((n, 4), np.float32)
    points = np.zeros((n, 1 + negatives, 2), np.float32)
    point_labels = np.zeros((n, 1 + negatives), np.int32)
    point_labels[:, :1] = 1
    masks = np.zeros((n, *labels.shape), bool)
    for row, obj in enumerate(ids):
        ys, xs = slices[obj - 1]
        local = labels[ys, xs] == obj
        masks[row, ys, xs] = local
        boxes[row] = _jittered_box(slices[obj - 1], labels.shape, box_jitter, rng)
        pick = int(rng.choice(np.flatnonzero(local)))
        points[row, 0] = (xs.start + pick % local.shape[1], ys.start + pick // local.shape[1])
        if negatives:
            bounds = (ys.start, ys.stop - 1, xs.start, xs.stop - 1)
            points[row, 1:], point_labels[row, 1:] = _negative_points(labels, obj, bounds, negatives, rng, ignore)
    return Prompts(ids, boxes, points, point_labels, use_boxes=prompt != "point", use_points=prompt != "box",
                   masks=masks, ignore=ignore, kinds=kinds)


def evaluation_kind(prompt: str) -> str:
    """The prompt ``evaluate`` gives by default to a model trained with ``--prompt`` ``prompt``:
    one click per object for "point", else one box ("box", "mix")."""
    return "point" if prompt == "point" else "box"


def selection_prompts(labels: np.ndarray, prompt: str, ignore: np.ndarray | None = None) -> Prompts:
    """The prompts epoch selection scores with: :func:`object_prompts` of :func:`evaluation_kind`
    (what ``evaluate`` gives), with the objects' ``NxHxW`` target masks."""
    prompts = object_prompts(labels, evaluation_kind(prompt), ignore)
    prompts.masks = np.asarray(labels)[None] == prompts.object_ids[:, None, None]
    return prompts


def _negative_points(labels: np.ndarray, obj: int, bounds: tuple[int, int, int, int], k: int,
                     rng: np.random.Generator, ignore: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """k points outside object ``obj``: in its box grown by half its size, else anywhere."""
    height, width = labels.shape
    y0, y1, x0, x1 = bounds
    my, mx = max(2, (y1 - y0 + 1) // 2), max(2, (x1 - x0 + 1) // 2)
    ya, yb, xa, xb = max(0, y0 - my), min(height, y1 + my + 1), max(0, x0 - mx), min(width, x1 + mx + 1)
    for window in ((slice(ya, yb), slice(xa, xb)), (slice(0, height), slice(0, width))):
        allowed = labels[window] != obj
        if ignore is not None:
            allowed &= ~ignore[window]
        candidates = np.flatnonzero(allowed)
        if candidates.size:
            pick = rng.choice(candidates, size=k, replace=candidates.size < k)
            w = window[1].stop - window[1].start
            xy = np.stack([window[1].start + pick % w, window[0].start + pick // w], axis=1)
            return xy.astype(np.float32), np.zeros(k, np.int32)
    return np.zeros((k, 2), np.float32), np.full(k, -1, np.int32)  # the object fills the image
