"""The YOLO detector behind ``detect`` and ``evaluate --prompt yolo``: offline ultralytics, boxes, matching.

ultralytics is imported only through :func:`import_ultralytics`, which makes it work without a
network: ``YOLO_OFFLINE`` (no online check, no update check, no telemetry, no pip auto-install),
integrations and platform uploads off for this process, and a local TTF font installed as its
``Arial.ttf`` (it downloads one otherwise, on every dataset check and plot).

Boxes follow prompts.py (inclusive max corners); YOLO's own files and outputs use pixel edges,
converted at this module's boundary (:func:`yolo_label_lines`, :func:`yolo_boxes`).
"""
from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from samlora.core import runfiles
from samlora.core.errors import UserError
from samlora.data.coco import CLASS_NAME
from samlora.data.prompts import label_boxes

log = logging.getLogger(__name__)

DETECTION_IOU = 0.5  # box IoU above which a detection matches a ground-truth object
RESERVED_YOLO_ARGS = ("data", "project", "name", "amp", "exist_ok", "resume")

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
        raise UserError(f"{path} is not a YOLO model file (ultralytics cannot load it: {type(exc).__name__}); give "
                        "the best.pt written by `python main.py detect train`") from None
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

    Returns ``(boxes, confidences)``: Nx4 float32 xyxy pixel boxes of the image (inclusive max
    corners, see prompts.py) and N float32 confidences >= ``conf``, after NMS at ``iou``.
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
    # ultralytics gives pixel edges; our boxes have inclusive max corners (a sub-pixel box: one pixel)
    boxes[:, 2:] = np.maximum(boxes[:, 2:] - 1.0, boxes[:, :2])
    return boxes, result.boxes.conf.float().cpu().numpy().astype(np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box pair: Nx4 and Mx4 xyxy, inclusive max corners -> NxM (vectorised).

    A box covers the pixels x0..x1 and y0..y1, so its width is x1 - x0 + 1.
    """
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    wh = np.clip(np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2]) + 1, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2] + 1, 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2] + 1, 0, None), axis=1)
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


def yolo_label_lines(labels: np.ndarray) -> list[str]:
    """HxW instance labels -> YOLO lines ``0 cx cy w h`` (pixel edges normalised to 0..1), one per object."""
    height, width = labels.shape
    lines = []
    for x0, y0, x1, y1 in label_boxes(labels)[1]:
        x1, y1 = x1 + 1, y1 + 1  # inclusive max corner -> pixel edge
        cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
        lines.append(f"0 {cx:.6f} {cy:.6f} {(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}")
    return lines


@dataclass
class DetectorOptions:
    """How the YOLO detector proposes boxes (the ``--conf``, ``--iou``, ``--imgsz``, ``--max_det`` options)."""

    conf: float = 0.1  # confidence threshold (low: tuned for recall, SAM cleans up the masks)
    iou: float = 0.7  # NMS IoU
    imgsz: int | None = None  # input size; None = as trained
    max_det: int = 1000

    def __post_init__(self) -> None:
        for flag, value in (("--conf", self.conf), ("--iou", self.iou)):
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{flag} must be in 0..1, got {value}")
        if self.max_det < 1:
            raise UserError(f"--max_det must be at least 1, got {self.max_det}")


@dataclass
class Detector:
    """A loaded YOLO detector with its options; called on an image it gives (boxes, confidences).

    ``boxes_of(i, image)`` remembers each image's boxes, so several models (and the box-only
    baseline) are prompted with the very same proposals.
    """

    yolo: Any
    path: Path
    options: DetectorOptions
    device: str = "cpu"
    found: dict[Any, tuple[np.ndarray, np.ndarray, float]] = field(default_factory=dict)
    counts: dict[Any, BoxCounts] = field(default_factory=dict)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        o = self.options
        return yolo_boxes(self.yolo, image, o.conf, o.iou, o.imgsz, self.device, o.max_det)

    def boxes_of(self, key: Any, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """``(boxes, confidences, seconds)`` of the image ``key``, detected once."""
        if key not in self.found:
            tick = time.perf_counter()
            boxes, confidences = self(image)
            self.found[key] = (boxes, confidences, time.perf_counter() - tick)
        return self.found[key]

    def counts_of(self, key: Any, labels: np.ndarray) -> BoxCounts:
        """The boxes of image ``key`` (found before) matched one to one to the HxW ground-truth
        objects' boxes at IoU > :data:`DETECTION_IOU`."""
        if key not in self.counts:
            self.counts[key] = match_boxes(label_boxes(labels)[1], self.found[key][0], DETECTION_IOU)
        return self.counts[key]

    def record(self) -> dict[str, Any]:
        """What defines the proposals (for config and summary files)."""
        return {"yolo_model": str(self.path), "conf": self.options.conf, "iou": self.options.iou,
                "imgsz": self.options.imgsz, "max_det": self.options.max_det, "match_iou": DETECTION_IOU}


def load_detector(path: str | os.PathLike, options: DetectorOptions, device: torch.device) -> Detector:
    """The detector in ``path`` (``detect train``'s best.pt) at the size it was trained at
    unless ``options.imgsz`` says otherwise."""
    yolo = load_yolo(path)
    if options.imgsz is None:
        options.imgsz = yolo_imgsz(yolo)
    log.info("detector %s (input %s px, --conf %g, --iou %g)", path, options.imgsz or "default",
             options.conf, options.iou)
    return Detector(yolo, Path(path), options, yolo_device(device))


# --------------------------------------------------------------------------------------------
# Training a detector: the YOLO dataset, the model, its validation
# --------------------------------------------------------------------------------------------
def export_yolo_dataset(samples: Sequence, train: Sequence[int], val: Sequence[int], out_dir: Path) -> Path:
    """Write ``images/{train,val}/*.png``, ``labels/{train,val}/*.txt`` and ``data.yaml``.

    Files are named by sample index; ``samples.json`` maps them back to sample keys. Returns the
    path of ``data.yaml``. (No ``masks/`` folder at the root: ultralytics would read it as a
    semantic-segmentation dataset.)
    """
    index = {}
    for split, indices in (("train", train), ("val", val)):
        image_dir, label_dir = out_dir / "images" / split, out_dir / "labels" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        for i in indices:
            sample = samples[i]
            name = f"{i:06d}"
            runfiles.write_png(image_dir / f"{name}.png", sample.image)
            lines = yolo_label_lines(sample.labels)
            runfiles.write_text(label_dir / f"{name}.txt", "".join(line + "\n" for line in lines))
            index[f"{split}/{name}"] = {"key": sample.key, "group": sample.group, "objects": len(lines)}
    runfiles.write_json(out_dir / "samples.json", index)
    data_yaml = out_dir / "data.yaml"
    # JSON strings are valid YAML scalars, whatever the path holds.
    runfiles.write_text(data_yaml, f"path: {json.dumps(str(out_dir.resolve()))}\ntrain: images/train\n"
                                   f"val: images/val\nnames:\n  0: {CLASS_NAME}\n")
    return data_yaml


def parse_yolo_args(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` strings -> ultralytics train overrides (values parsed as Python literals)."""
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"--yolo_args expects key=value (e.g. mosaic=0.5), got {item!r}")
        if key in RESERVED_YOLO_ARGS:
            raise UserError(f"--yolo_args {key}=... is set by detect itself (amp stays off: its check "
                            "downloads weights); use the detect options instead")
        try:
            overrides[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[key] = text
    return overrides


def build_yolo(spec: str) -> Any:
    """``yolov8n.yaml`` etc. (random init, shipped with ultralytics), a local .yaml, or a local
    .pt (fine-tuned from those weights)."""
    suffix = Path(spec).suffix.lower()
    if suffix == ".pt":
        return load_yolo(spec)
    if suffix not in (".yaml", ".yml"):
        raise UserError(f"--yolo_model {spec!r} is neither a model config (.yaml, e.g. yolov8n.yaml) "
                        "nor weights (.pt)")
    YOLO = import_ultralytics().YOLO
    try:
        return YOLO(spec, task="detect")
    except FileNotFoundError:
        raise UserError(f"YOLO model config {spec} not found: use one shipped with ultralytics "
                        "(yolov8n.yaml, yolov8s.yaml, yolov8m.yaml) or a local .yaml file") from None
    except Exception as exc:  # noqa: BLE001 - a broken config fails in many ways
        raise UserError(f"{spec} is not a valid YOLO model config ({type(exc).__name__}: {exc})") from None


def validate_detector(yolo: Any, samples: Sequence, confs: Sequence[float], iou: float,
                      imgsz: int | None, device: str, iou_threshold: float = 0.5) -> dict[float, BoxCounts]:
    """Box matches on ``samples`` at IoU > ``iou_threshold``, for each confidence in ``confs``.

    The detector runs once at the lowest confidence; higher thresholds filter its boxes (the same
    boxes NMS keeps when run at that threshold)."""
    counts = {conf: BoxCounts() for conf in confs}
    for sample in tqdm(samples, desc="validation", leave=False, disable=None):
        boxes, scores = yolo_boxes(yolo, sample.image, min(confs), iou, imgsz, device)
        gt = label_boxes(sample.labels)[1]
        for conf in confs:
            counts[conf] += match_boxes(gt, boxes[scores >= conf], iou_threshold)
    return counts


def report_validation(counts: dict[float, BoxCounts], conf: float, images: int, weights: Path,
                      path: Path) -> None:
    """Log the precision / recall table and write it to ``path`` (JSON)."""
    report = {"weights": str(weights), "iou_threshold": 0.5, "conf": conf, "validation_samples": images,
              **counts[conf].scores(), "by_conf": {str(c): n.scores() for c, n in counts.items()}}
    runfiles.write_json(path, report)
    log.info("detector: %s", weights)
    log.info("validation boxes at IoU 0.5 (matched when IoU > 0.5), %d images:", images)
    log.info("   conf  precision  recall     f1     tp     fp     fn")
    for c, n in counts.items():
        s = n.scores()
        log.info("%7.3f  %9.3f  %6.3f  %5.3f  %5d  %5d  %5d%s", c, s["precision"], s["recall"], s["f1"],
                 s["tp"], s["fp"], s["fn"], "  <- --conf" if c == conf else "")
