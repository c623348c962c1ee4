"""YOLO boxes -> SAM masks -> one instance label map: the library half of ``detect``.

The pieces are separate functions so that each model part can be timed alone (``bench.py``):

    boxes, confidences = yolo_boxes(yolo, image, conf=0.1, iou=0.7)     # YOLO forward
    embedding = encode_image(sam, image)                                 # one encoder pass
    instances = decode_boxes(sam, image, embedding, boxes, confidences)  # decoder, boxes in batches
    labels, kept = paint_instances(instances, image.shape[:2])           # overlaps by predicted IoU

:func:`segment_with_boxes` composes the last three (used by ``evaluate --prompt yolo`` and with
ground-truth boxes), :class:`Segmenter` adds tiling of large images and SAM's automatic mask
generator (``--mode amg``).

ultralytics is imported only through :func:`import_ultralytics`, which makes it work without a
network: ``YOLO_OFFLINE`` (no online check, no update check, no telemetry, no pip auto-install),
integrations and platform uploads off for this process, and a local TTF font installed as its
``Arial.ttf`` (it downloads one otherwise, on every dataset check and plot).
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

from errors import UserError
from model import autocast, decode, encode_images, make_prompts, postprocess_logits, prepare_image, preprocess_shape

log = logging.getLogger(__name__)

# Settings that could make ultralytics reach the network during a run; overridden in memory only
# (the user's settings.json is not rewritten).
OFFLINE_SETTINGS = {"sync": False, "api_key": "", "clearml": False, "comet": False, "dvc": False,
                    "mlflow": False, "raytune": False, "tensorboard": False, "wandb": False}
# Modules that copy ultralytics.utils.ONLINE at import time.
_ONLINE_FLAGS = ("ultralytics.utils", "ultralytics.utils.checks", "ultralytics.utils.events")
FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")  # the fonts ultralytics looks for, else downloads


# --------------------------------------------------------------------------------------------
# ultralytics, offline
# --------------------------------------------------------------------------------------------
def _local_font() -> Path | None:
    """A TTF file on this machine: matplotlib's DejaVuSans (ultralytics depends on matplotlib)."""
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return path
        from matplotlib import font_manager

        found = [Path(f) for f in font_manager.findSystemFonts(fontext="ttf") if f.lower().endswith(".ttf")]
        return found[0] if found else None
    except ImportError:
        return None


def install_fonts(config_dir: Path) -> None:
    """Put a local TTF into ultralytics' config dir as ``Arial.ttf`` / ``Arial.Unicode.ttf``."""
    missing = [config_dir / name for name in FONT_NAMES if not (config_dir / name).is_file()]
    if not missing:
        return
    source = _local_font()
    if source is None:
        raise UserError(f"no TTF font found on this machine; ultralytics would download Arial.ttf: "
                        f"copy any .ttf file to {config_dir / 'Arial.ttf'}")
    try:
        config_dir.mkdir(parents=True, exist_ok=True)
        for target in missing:
            shutil.copyfile(source, target)
            log.debug("installed %s as %s for ultralytics (offline)", source, target)
    except OSError as exc:
        raise UserError(f"cannot write the font {missing[0]} ({exc}); set YOLO_CONFIG_DIR to a "
                        "writable folder") from exc


def import_ultralytics() -> Any:
    """Import ultralytics so that it never touches the network; returns the module.

    Sets ``YOLO_OFFLINE=1`` and ``YOLO_AUTOINSTALL=false`` before the import (``ONLINE`` is
    computed at import time), forces the ``ONLINE`` flags off in case ultralytics was imported
    earlier, removes ``ULTRALYTICS_API_KEY`` from this process' environment and turns sync,
    platform uploads and logging integrations off in memory, and installs a local font as
    ``Arial.ttf`` in ``ultralytics.utils.USER_CONFIG_DIR`` (``$YOLO_CONFIG_DIR/Ultralytics`` when
    that is set). AMP checks (which download weights on CUDA) are avoided by training with
    ``amp=False``; weights are only ever loaded from local files (:func:`load_yolo`).
    """
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    if os.environ.pop("ULTRALYTICS_API_KEY", None):
        log.warning("ULTRALYTICS_API_KEY ignored: detect runs offline and uploads nothing")
    import ultralytics
    import ultralytics.utils.checks  # noqa: F401 - imported so its ONLINE flag can be set
    import ultralytics.utils.events  # noqa: F401

    for name in _ONLINE_FLAGS:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "ONLINE", False):
            module.ONLINE = False
    events = getattr(sys.modules["ultralytics.utils.events"], "events", None)
    if events is not None:
        events.enabled = False
    settings = ultralytics.utils.SETTINGS
    dict.update(settings, {k: v for k, v in OFFLINE_SETTINGS.items() if k in settings})
    install_fonts(Path(ultralytics.utils.USER_CONFIG_DIR))
    return ultralytics


def yolo_device(device: torch.device) -> str:
    """A torch device -> the device string ultralytics expects (``cpu``, ``0``, ``mps``)."""
    if device.type == "cuda":
        return str(device.index or 0)
    return device.type


def load_yolo(path: str | os.PathLike) -> Any:
    """Load a trained YOLO detector (``best.pt`` from ``detect train``) from a local file.

    Raises :class:`UserError` when the file is missing, is not a YOLO model or not a detector.
    ultralytics unpickles the file: load only files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"YOLO model {path} not found: give the best.pt written by `python main.py "
                        "detect train` (nothing is downloaded)")
    YOLO = import_ultralytics().YOLO
    try:
        yolo = YOLO(str(path), task="detect")
    except Exception as exc:  # noqa: BLE001 - a wrong file fails in many ways inside ultralytics
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"{path} is not a YOLO model file ({type(exc).__name__}: {first}); give the "
                        "best.pt written by `python main.py detect train`") from None
    if getattr(yolo, "task", None) != "detect":
        raise UserError(f"{path} is a YOLO {yolo.task} model, not a detector: give the best.pt "
                        "written by `python main.py detect train`")
    return yolo


def yolo_imgsz(yolo: Any) -> int | None:
    """The input size a YOLO detector was trained at (None when unknown)."""
    for args in (getattr(yolo, "overrides", None), (getattr(yolo, "ckpt", None) or {}).get("train_args")):
        size = (args or {}).get("imgsz")
        if isinstance(size, int):
            return size
    return None


@torch.no_grad()
def yolo_boxes(yolo: Any, image: np.ndarray, conf: float = 0.1, iou: float = 0.7,
               imgsz: int | None = None, device: str | None = None,
               max_det: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Run the detector on one HxWx3 uint8 RGB image.

    Returns ``(boxes, confidences)``: Nx4 float32 xyxy pixel boxes of the image and N float32
    confidences >= ``conf``, after NMS at ``iou``.
    """
    kwargs: dict[str, Any] = {"conf": conf, "iou": iou, "max_det": max_det, "verbose": False}
    if imgsz:
        kwargs["imgsz"] = imgsz
    if device is not None:
        kwargs["device"] = device
    bgr = np.ascontiguousarray(image[..., ::-1])  # ultralytics takes numpy images as OpenCV BGR
    threads = torch.get_num_threads()
    try:
        result = yolo.predict(bgr, **kwargs)[0]
    finally:  # its CPU device setup sets torch to cpu_count - 1 threads: SAM would run on fewer
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    boxes = result.boxes.xyxy.float().cpu().numpy().reshape(-1, 4).astype(np.float32)
    return boxes, result.boxes.conf.float().cpu().numpy().astype(np.float32)


# --------------------------------------------------------------------------------------------
# Boxes: ground truth, IoU, matching
# --------------------------------------------------------------------------------------------
def label_boxes(labels: np.ndarray) -> np.ndarray:
    """HxW instance labels -> Mx4 float32 xyxy boxes (max corner exclusive: pixel edges)."""
    slices = ndimage.find_objects(labels.astype(np.int32, copy=False)) if labels.size else []
    boxes = [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in slices if s is not None]
    return np.array(boxes, np.float32).reshape(-1, 4)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box pair: Nx4 and Mx4 xyxy -> NxM (vectorised)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    wh = np.clip(np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


@dataclass
class BoxCounts:
    """Matched detections of one or more images at one IoU threshold."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou_sum: float = 0.0

    def __iadd__(self, other: "BoxCounts") -> "BoxCounts":
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou_sum += other.iou_sum
        return self

    def scores(self) -> dict[str, float | int]:
        """precision, recall, f1 and counts. As in metrics.py, a zero denominator gives 1.0
        when nothing was to be found and nothing was found, else 0.0."""
        both_empty = self.tp + self.fp + self.fn == 0

        def ratio(num: int, den: int) -> float:
            return float(num / den) if den else float(both_empty)

        precision, recall = ratio(self.tp, self.tp + self.fp), ratio(self.tp, self.tp + self.fn)
        f1 = ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)
        return {"precision": precision, "recall": recall, "f1": f1, "tp": self.tp, "fp": self.fp,
                "fn": self.fn, "mean_matched_iou": self.iou_sum / self.tp if self.tp else 0.0}


def match_boxes(gt: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> BoxCounts:
    """One-to-one matching of predicted to ground-truth boxes at IoU > ``threshold`` (strict,
    as metrics.py matches masks).

    The most pairs above the threshold are matched (ties broken by higher IoU) with the
    Hungarian algorithm on the vectorised IoU matrix; unmatched predictions are false positives,
    unmatched ground-truth boxes false negatives.
    """
    iou = box_iou(gt, pred)
    if iou.size == 0:
        return BoxCounts(0, len(pred), len(gt))
    good = iou > threshold
    rows, cols = linear_sum_assignment(-(good + 1e-3 * iou))
    hit = good[rows, cols]
    tp = int(hit.sum())
    return BoxCounts(tp, iou.shape[1] - tp, iou.shape[0] - tp, float(iou[rows, cols][hit].sum()))


# --------------------------------------------------------------------------------------------
# SAM: one encoder pass, boxes decoded in batches, overlaps painted by predicted IoU
# --------------------------------------------------------------------------------------------
@dataclass
class Instance:
    """One object: ``mask`` is the (y1-y0)x(x1-x0) bool crop at ``box`` = (x0, y0, x1, y1),
    max corner exclusive, in pixels of the image; ``score`` SAM's predicted IoU (decides
    overlaps), ``confidence`` the detector's confidence (= score for AMG)."""

    box: tuple[int, int, int, int]
    mask: np.ndarray
    score: float
    confidence: float

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def shifted(self, dy: int, dx: int) -> "Instance":
        x0, y0, x1, y1 = self.box
        return Instance((x0 + dx, y0 + dy, x1 + dx, y1 + dy), self.mask, self.score, self.confidence)


def instance_from_mask(mask: np.ndarray, score: float, confidence: float) -> Instance | None:
    """HxW bool mask -> :class:`Instance` cropped to its extent (None for an empty mask)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return Instance((x0, y0, x1, y1), np.ascontiguousarray(mask[y0:y1, x0:x1]), float(score), float(confidence))


def sam_device(sam: nn.Module) -> torch.device:
    return next(sam.parameters()).device


@torch.no_grad()
def encode_image(sam: nn.Module, image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB -> its 1x256x(S/16)x(S/16) image embedding (the one encoder pass)."""
    prepared = prepare_image(image, sam.image_encoder.img_size)
    return encode_images(sam, prepared.tensor[None].to(sam_device(sam)))


def full_size_masks(low_res: torch.Tensor, image_size: int, input_size: tuple[int, int],
                    original_size: tuple[int, int]) -> np.ndarray:
    """Nx1x(S/4)x(S/4) mask logits -> NxHxW bool masks at the original size.

    The same as :func:`model.postprocess_logits` then ``> 0`` (what ``model.predict`` does),
    without its second full-size resize when the resized input already has the original size
    (an image or tile of exactly the model's input size): that resize is an identity that costs
    as much as the first one (~30 ms for 16 masks of 1024x1024 on 2 CPU cores).
    """
    if tuple(input_size) != tuple(original_size):
        return (postprocess_logits(low_res, image_size, input_size, original_size)[:, 0] > 0).cpu().numpy()
    logits = F.interpolate(low_res, (image_size, image_size), mode="bilinear", align_corners=False)
    return (logits[:, 0, :input_size[0], :input_size[1]] > 0).cpu().numpy()


@torch.no_grad()
def decode_boxes(sam: nn.Module, image: np.ndarray, embedding: torch.Tensor, boxes: np.ndarray,
                 confidences: np.ndarray | None = None, batch: int = 32) -> list[Instance]:
    """Decode Nx4 xyxy pixel ``boxes`` of ``image`` against its 1x256x(S/16)x(S/16)
    ``embedding``, ``batch`` boxes per decoder call; returns the non-empty masks as cropped
    :class:`Instance` objects (masks as ``model.predict`` gives them)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    confidences = np.ones(len(boxes), np.float32) if confidences is None else np.asarray(confidences)
    image_size, original_size = sam.image_encoder.img_size, tuple(image.shape[:2])
    input_size = preprocess_shape(original_size, image_size)
    instances = []
    for start in range(0, len(boxes), batch):
        prompts = make_prompts(original_size, image_size, boxes[start:start + batch], device=embedding.device)
        low_res, ious = decode(sam, embedding[0], prompts)
        masks = full_size_masks(low_res, image_size, input_size, original_size)
        for mask, iou, confidence in zip(masks, ious[:, 0].float().cpu().numpy(), confidences[start:start + batch]):
            instance = instance_from_mask(mask, iou, confidence)
            if instance is not None:
                instances.append(instance)
    return instances


def paint_instances(instances: Sequence[Instance], shape: tuple[int, int],
                    min_area: int = 0) -> tuple[np.ndarray, list[Instance]]:
    """Paint instances into one HxW int32 label map; where they overlap the higher ``score``
    (predicted IoU, then confidence) wins. Objects left with fewer than ``min_area`` pixels
    (at least 1) are dropped. Labels are 1..K by decreasing score; returns the map and the K
    kept instances in label order."""
    order = sorted(range(len(instances)), key=lambda i: (instances[i].score, instances[i].confidence))
    labels = np.zeros(shape, np.int32)
    for value, i in enumerate(order, start=1):
        x0, y0, x1, y1 = instances[i].box
        labels[y0:y1, x0:x1][instances[i].mask] = value
    areas = np.bincount(labels.ravel(), minlength=len(order) + 1)[1:]
    keep = np.flatnonzero(areas >= max(min_area, 1))[::-1]  # painted values, highest score first
    lut = np.zeros(len(order) + 1, np.int32)
    lut[keep + 1] = np.arange(1, keep.size + 1, dtype=np.int32)
    return lut[labels], [instances[order[v]] for v in keep]


def segment_with_boxes(sam: nn.Module, image: np.ndarray, boxes: np.ndarray,
                       scores: np.ndarray | None = None, batch: int = 32, min_area: int = 0,
                       precision: str = "fp32") -> np.ndarray:
    """Box prompts -> one HxW int32 instance label map (0 background).

    One encoder pass for the image, the Nx4 xyxy pixel ``boxes`` decoded ``batch`` at a time;
    ``scores`` (N detector confidences) break ties between equal predicted IoUs.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros(image.shape[:2], np.int32)
    with autocast(sam_device(sam), precision):
        embedding = encode_image(sam, image)
        instances = decode_boxes(sam, image, embedding, boxes, scores, batch)
    return paint_instances(instances, image.shape[:2], min_area)[0]


def boxes_to_labels(boxes: np.ndarray, scores: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """The box-only baseline: each Nx4 xyxy box filled as its own mask, higher score on top."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.ones(len(boxes)) if scores is None else np.asarray(scores)
    height, width = shape
    instances = []
    for box, score in zip(boxes, scores):
        x0, y0 = int(np.clip(np.floor(box[0]), 0, width)), int(np.clip(np.floor(box[1]), 0, height))
        x1, y1 = int(np.clip(np.ceil(box[2]), 0, width)), int(np.clip(np.ceil(box[3]), 0, height))
        if x1 > x0 and y1 > y0:
            instances.append(Instance((x0, y0, x1, y1), np.ones((y1 - y0, x1 - x0), bool), float(score), float(score)))
    return paint_instances(instances, shape)[0]


# --------------------------------------------------------------------------------------------
# Tiling of large images
# --------------------------------------------------------------------------------------------
def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the fewest tiles of side ``tile`` that cover ``length`` with neighbours
    sharing at least ``overlap`` pixels (spread evenly)."""
    if tile <= 0 or length <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in 0..{tile - 1}, got {overlap}")
    count = -(-(length - overlap) // (tile - overlap))  # fewest tiles with at least that overlap
    return np.linspace(0, length - tile, count).round().astype(int).tolist()


def tile_windows(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(y0, x0, y1, x1) windows covering an HxW image; one window when it fits in ``tile``."""
    return [(y, x, min(y + tile, height) if tile > 0 else height, min(x + tile, width) if tile > 0 else width)
            for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap)]


def _mask_in(inst: Instance, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    """The instance's mask inside the window (y0, x0, y1, x1) of the image, window-sized."""
    out = np.zeros((y1 - y0, x1 - x0), bool)
    ax0, ay0, ax1, ay1 = max(inst.box[0], x0), max(inst.box[1], y0), min(inst.box[2], x1), min(inst.box[3], y1)
    if ax1 > ax0 and ay1 > ay0:
        out[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0] = inst.mask[ay0 - inst.box[1]:ay1 - inst.box[1],
                                                              ax0 - inst.box[0]:ax1 - inst.box[0]]
    return out


def _same_object(a: Instance, b: Instance, shared: tuple[int, int, int, int], threshold: float) -> bool:
    """Whether two tiles' objects are one: their masks agree (IoU >= ``threshold``) inside the
    window both tiles saw."""
    ma, mb = _mask_in(a, *shared), _mask_in(b, *shared)
    union = np.count_nonzero(ma | mb)
    return union > 0 and np.count_nonzero(ma & mb) >= threshold * union


def _union(a: Instance, b: Instance) -> Instance:
    x0, y0 = min(a.box[0], b.box[0]), min(a.box[1], b.box[1])
    x1, y1 = max(a.box[2], b.box[2]), max(a.box[3], b.box[3])
    mask = np.zeros((y1 - y0, x1 - x0), bool)
    for part in (a, b):
        mask[part.box[1] - y0:part.box[3] - y0, part.box[0] - x0:part.box[2] - x0] |= part.mask
    return Instance((x0, y0, x1, y1), mask, max(a.score, b.score), max(a.confidence, b.confidence))


def merge_tiles(instances: Sequence[Instance], tiles: Sequence[int],
                windows: Sequence[tuple[int, int, int, int]], threshold: float = 0.5) -> list[Instance]:
    """Merge the objects that neighbouring tiles found twice.

    ``tiles[i]`` is the index into ``windows`` ((y0, x0, y1, x1)) of the tile instance i came
    from. Highest score first, an instance is united with an already kept object from another
    tile when, inside the window the two tiles share, their masks have IoU >= ``threshold``:
    both tiles saw those pixels, so the same object looks the same there, however much of it
    each tile cut off. Box overlaps are tested vectorised; masks only for touching boxes.
    """
    order = sorted(range(len(instances)), key=lambda i: -instances[i].score)
    kept: list[Instance] = []
    kept_tiles: list[set[int]] = []
    kept_boxes = np.zeros((0, 4), np.int64)
    for i in order:
        inst, tile = instances[i], tiles[i]
        box = np.array(inst.box)
        touching = np.flatnonzero((np.minimum(kept_boxes[:, 2], box[2]) > np.maximum(kept_boxes[:, 0], box[0]))
                                  & (np.minimum(kept_boxes[:, 3], box[3]) > np.maximum(kept_boxes[:, 1], box[1])))
        target = None
        for k in touching:
            if tile in kept_tiles[k]:
                continue
            for other in kept_tiles[k]:
                (ay0, ax0, ay1, ax1), (by0, bx0, by1, bx1) = windows[tile], windows[other]
                shared = (max(ay0, by0), max(ax0, bx0), min(ay1, by1), min(ax1, bx1))
                if shared[2] > shared[0] and shared[3] > shared[1] and \
                        _same_object(inst, kept[k], shared, threshold):
                    target = k
                    break
            if target is not None:
                break
        if target is None:
            kept.append(inst)
            kept_tiles.append({tile})
            kept_boxes = np.vstack([kept_boxes, box[None]])
        else:
            kept[target] = _union(kept[target], inst)
            kept_tiles[target].add(tile)
            kept_boxes[target] = kept[target].box
    return kept


# --------------------------------------------------------------------------------------------
# The whole pipeline for one 2-D image
# --------------------------------------------------------------------------------------------
@dataclass
class SegmentOptions:
    """How :class:`Segmenter` turns an image into instances (the ``detect predict`` options)."""

    mode: str = "yolo"  # yolo | amg
    conf: float = 0.1  # YOLO confidence threshold (low: tuned for recall)
    iou: float = 0.7  # YOLO NMS IoU
    imgsz: int | None = None  # YOLO input size; None = as trained
    max_det: int = 1000
    box_batch: int = 32  # boxes per SAM decoder call
    tile_size: int = 1024  # tile images larger than this (0 = never)
    tile_overlap: int = 128
    merge_threshold: float = 0.5  # mask IoU, inside the window two tiles share, that merges objects
    min_area: int = 10  # objects with fewer pixels are dropped
    precision: str = "fp32"
    points_per_side: int = 32  # AMG
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95

    def __post_init__(self) -> None:
        if self.mode not in ("yolo", "amg"):
            raise UserError(f"unknown mode {self.mode!r}: use yolo or amg")
        if not 0.0 <= self.conf <= 1.0 or not 0.0 <= self.iou <= 1.0:
            raise UserError(f"--conf and --iou must be in 0..1, got {self.conf} and {self.iou}")
        if self.box_batch < 1 or self.points_per_batch < 1 or self.points_per_side < 1:
            raise UserError("--box_batch, --points_per_batch and --points_per_side must be >= 1")
        if self.tile_size < 0 or (self.tile_size and not 0 <= self.tile_overlap < self.tile_size):
            raise UserError(f"--tile_overlap must be in 0..tile_size-1 and --tile_size >= 0 (0 = no "
                            f"tiling), got {self.tile_overlap} and {self.tile_size}")
        if not 0.0 < self.merge_threshold <= 1.0:
            raise UserError(f"--merge_threshold must be in (0, 1], got {self.merge_threshold}")


class Segmenter:
    """One HxWx3 uint8 image -> (HxW int32 instance labels, kept instances), tile by tile."""

    def __init__(self, sam: nn.Module, options: SegmentOptions, yolo: Any = None) -> None:
        if options.mode == "yolo" and yolo is None:
            raise ValueError("mode yolo needs a YOLO model")
        self.sam, self.options, self.yolo = sam, options, yolo
        self.device = sam_device(sam)
        self.amg = None
        if options.mode == "amg":
            from segment_anything import SamAutomaticMaskGenerator

            self.amg = SamAutomaticMaskGenerator(
                sam, points_per_side=options.points_per_side, points_per_batch=options.points_per_batch,
                pred_iou_thresh=options.pred_iou_thresh,
                stability_score_thresh=options.stability_score_thresh)

    def tile_instances(self, tile: np.ndarray) -> list[Instance]:
        """The objects of one tile (or a whole small image), in its pixel coordinates."""
        o = self.options
        if self.amg is not None:
            found = (instance_from_mask(r["segmentation"], r["predicted_iou"], r["predicted_iou"])
                     for r in self.amg.generate(tile))
            return [inst for inst in found if inst is not None]
        boxes, confidences = yolo_boxes(self.yolo, tile, o.conf, o.iou, o.imgsz, yolo_device(self.device), o.max_det)
        if len(boxes) == 0:
            return []
        embedding = encode_image(self.sam, tile)
        return decode_boxes(self.sam, tile, embedding, boxes, confidences, o.box_batch)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, list[Instance]]:
        o = self.options
        windows = tile_windows(image.shape[0], image.shape[1], o.tile_size, o.tile_overlap)
        instances: list[Instance] = []
        tiles: list[int] = []
        with autocast(self.device, o.precision):
            for index, (y0, x0, y1, x1) in enumerate(windows):
                found = self.tile_instances(np.ascontiguousarray(image[y0:y1, x0:x1]))
                instances += [inst.shifted(y0, x0) for inst in found]
                tiles += [index] * len(found)
        if len(windows) > 1:
            instances = merge_tiles(instances, tiles, windows, o.merge_threshold)
        return paint_instances(instances, image.shape[:2], o.min_area)
