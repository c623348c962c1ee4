"""``python main.py detect train|predict``: automatic instance segmentation, YOLOv8 boxes -> SAM.

``detect train`` exports any dataset that dataset.py reads as a YOLO dataset (``images/``,
``labels/*.txt``, ``data.yaml``) with the same grouped split the SAM trainer uses (patches of one
image and blocks of neighbouring slices never straddle it), trains a YOLOv8 detector offline with
ultralytics and reports box precision and recall at IoU 0.5 on the validation split.

``detect predict`` segments an image, a folder of images or a 3-D TIFF stack (slice by slice):
YOLO boxes prompt (LoRA-)SAM, or SAM's automatic mask generator does (``--mode amg``). Per input
it writes ``<stem>_labels.tif`` (uint16/uint32 instance labels, same Z/Y/X shape as the input),
``<stem>_overlay.png``, and for the run one ``coco.json`` (RLE or polygons), the config and a
log. Images larger than ``--tile_size`` are segmented in overlapping tiles, then merged.

The model code lives one level down in :mod:`yolo_sam` (offline ultralytics, boxes, SAM
decoding, tiling), which ``evaluate --prompt yolo`` uses too.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import cv2
import numpy as np
import tifffile
from scipy import ndimage
from tqdm import tqdm

from dataset import (
    IMAGE_EXTS,
    TIFF_EXTS,
    add_data_arguments,
    load_folds,
    load_from_args,
    load_or_make_folds,
    read_image_file,
    scale_to_uint8,
    to_rgb,
)
from errors import UserError
from lora import load_adapter, read_adapter
from model import add_model_arguments, build_model, resolve_checkpoint, resolve_device
from yolo_sam import (
    BoxCounts,
    Instance,
    Segmenter,
    SegmentOptions,
    import_ultralytics,
    label_boxes,
    load_yolo,
    match_boxes,
    yolo_boxes,
    yolo_device,
    yolo_imgsz,
)

log = logging.getLogger(__name__)

DATASET_DIR, YOLO_RUN = "yolo_dataset", "yolo"  # inside --output_dir of detect train
CLASS_NAME = "object"
REPORT_CONFS = (0.05, 0.1, 0.25, 0.5)  # validation precision / recall are also shown at these
RESERVED_YOLO_ARGS = ("data", "project", "name", "amp", "exist_ok", "resume")


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Copy this module's and ultralytics' log records to ``path`` while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(), logging.getLogger("ultralytics")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    except Exception as exc:
        handler.handle(logging.makeLogRecord({"name": __name__, "levelno": logging.ERROR,
                                              "levelname": "ERROR", "msg": f"stopped: {exc}"}))
        raise
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def args_record(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options as JSON-ready values (written next to every output)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not callable(v)}


def refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UserError(f"{existing[0]} already exists{more}: pass --overwrite to replace it, or "
                        "choose another --output_dir")


# --------------------------------------------------------------------------------------------
# detect train: YOLO dataset export, training, validation
# --------------------------------------------------------------------------------------------
def yolo_label_lines(labels: np.ndarray) -> list[str]:
    """HxW instance labels -> YOLO lines ``0 cx cy w h`` normalised to 0..1, one per object."""
    height, width = labels.shape
    lines = []
    for x0, y0, x1, y1 in label_boxes(labels):
        cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
        lines.append(f"0 {cx:.6f} {cy:.6f} {(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}")
    return lines


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
            if not cv2.imwrite(str(image_dir / f"{name}.png"), cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR)):
                raise UserError(f"cannot write {image_dir / name}.png: is {out_dir} writable?")
            lines = yolo_label_lines(sample.labels)
            (label_dir / f"{name}.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            index[f"{split}/{name}"] = {"key": sample.key, "group": sample.group, "objects": len(lines)}
    write_json(out_dir / "samples.json", index)
    data_yaml = out_dir / "data.yaml"
    # JSON strings are valid YAML scalars, whatever the path holds.
    data_yaml.write_text(f"path: {json.dumps(str(out_dir.resolve()))}\ntrain: images/train\n"
                         f"val: images/val\nnames:\n  0: {CLASS_NAME}\n", encoding="utf-8")
    return data_yaml


def detector_split(args: argparse.Namespace, samples: Sequence, output_dir: Path) -> tuple[list[int], list[int]]:
    """The grouped (train, val) split: from ``--folds_file``, else ``output_dir/folds.json``
    (made with dataset.make_holdout / make_folds when missing); fixed test samples are left out."""
    if args.folds_file is not None:
        folds = load_folds(args.folds_file, samples)
        log.info("data: using the folds in %s", args.folds_file)
    else:
        folds = load_or_make_folds(output_dir, samples, args.num_folds, args.seed, args.slice_block,
                                   args.val_fraction)
    if not 0 <= args.fold < len(folds):
        raise UserError(f"--fold {args.fold} does not exist: the split has {len(folds)} fold(s), "
                        f"numbered 0..{len(folds) - 1}")
    train, val = folds[args.fold]
    if not train or not val:
        raise UserError(f"fold {args.fold} has {len(train)} training and {len(val)} validation samples; "
                        "both are needed to train a detector")
    return list(train), list(val)


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
        gt = label_boxes(sample.labels)
        for conf in confs:
            counts[conf] += match_boxes(gt, boxes[scores >= conf], iou_threshold)
    return counts


def train_detector(yolo: Any, data_yaml: Path, args: argparse.Namespace, device: str) -> Path:
    """Train ``yolo`` on ``data_yaml`` offline (no AMP check); returns the best weights' path."""
    train_args = dict(data=str(data_yaml), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch_size,
                      device=device, workers=args.num_workers, project=str(args.output_dir.resolve()),
                      name=YOLO_RUN, exist_ok=True, amp=False, plots=not args.no_plots, seed=args.seed,
                      deterministic=True, patience=args.patience, flipud=0.5, verbose=True)
    train_args.update(parse_yolo_args(args.yolo_args))
    write_json(args.output_dir / "detect_train_config.json", {**args_record(args), "ultralytics": train_args})
    yolo.train(**train_args)
    weights = Path(yolo.trainer.best)
    return weights if weights.is_file() else Path(yolo.trainer.last)


def report_validation(counts: dict[float, BoxCounts], conf: float, images: int, weights: Path,
                      path: Path) -> None:
    """Log the precision / recall table and write it to ``path`` (JSON)."""
    report = {"weights": str(weights), "iou_threshold": 0.5, "conf": conf, "validation_samples": images,
              **counts[conf].scores(), "by_conf": {str(c): n.scores() for c, n in counts.items()}}
    write_json(path, report)
    log.info("detector: %s", weights)
    log.info("validation boxes at IoU 0.5 (matched when IoU > 0.5), %d images:", images)
    log.info("   conf  precision  recall     f1     tp     fp     fn")
    for c, n in counts.items():
        s = n.scores()
        log.info("%7.3f  %9.3f  %6.3f  %5.3f  %5d  %5d  %5d%s", c, s["precision"], s["recall"], s["f1"],
                 s["tp"], s["fp"], s["fn"], "  <- --conf" if c == conf else "")


def run_train(args: argparse.Namespace) -> int:
    """Export the YOLO dataset, train the detector offline, report validation box P/R."""
    if args.epochs < 1 or args.batch_size < 1 or args.imgsz < 32:
        raise UserError("--epochs and --batch_size must be >= 1 and --imgsz >= 32")
    if not 0.0 <= args.conf <= 1.0:
        raise UserError(f"--conf must be in 0..1, got {args.conf}")
    parse_yolo_args(args.yolo_args)  # bad overrides fail before any work
    ours = [args.output_dir / DATASET_DIR, args.output_dir / YOLO_RUN, args.output_dir / "val_metrics.json"]
    refuse_existing(ours, args.overwrite)
    device = yolo_device(resolve_device(args.device))
    yolo = build_yolo(args.yolo_model)  # imports ultralytics offline
    samples = load_from_args(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for path in ours:  # only what an earlier detect train wrote (--overwrite)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    with log_to_file(args.output_dir / "detect_train.log"):
        train, val = detector_split(args, samples, args.output_dir)
        data_yaml = export_yolo_dataset(samples, train, val, args.output_dir / DATASET_DIR)
        log.info("YOLO dataset: %d training and %d validation images in %s", len(train), len(val),
                 data_yaml.parent)
        weights = train_detector(yolo, data_yaml, args, device)
        confs = sorted({args.conf, *REPORT_CONFS})
        counts = validate_detector(load_yolo(weights), [samples[i] for i in val], confs, args.iou,
                                   args.imgsz, device)
        report_validation(counts, args.conf, len(val), weights, args.output_dir / "val_metrics.json")
    return 0


# --------------------------------------------------------------------------------------------
# detect predict: inputs
# --------------------------------------------------------------------------------------------
def find_inputs(path: Path) -> list[Path]:
    """``--input``: one image or stack file, or the image / stack files of a folder (sorted)."""
    if not path.exists():
        raise UserError(f"--input {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise UserError(f"folder {path} holds no images ({', '.join(IMAGE_EXTS)})")
    elif path.suffix.lower() in IMAGE_EXTS:
        files = [path]
    else:
        raise UserError(f"--input {path} is neither an image ({', '.join(IMAGE_EXTS)}), a folder of "
                        "images nor a TIFF stack")
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise UserError(f"{stems[f.stem].name} and {f.name} would write the same outputs; "
                            "rename one or segment them separately")
        stems[f.stem] = f
    return files


def read_planes(path: Path) -> tuple[np.ndarray, bool]:
    """An image file -> ``(planes, is_stack)``: ``ZxHxW`` or ``ZxHxWx3`` uint8 (Z = 1 for 2-D).

    A multi-page TIFF (ZYX, optionally with RGB samples) is a stack; 16-bit and float volumes are
    scaled to uint8 with percentiles of the whole volume, so all slices share one scale.
    """
    if path.suffix.lower() not in TIFF_EXTS:
        return to_rgb(read_image_file(path), path)[None], False
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            array, axes = series.asarray(), series.axes
    except Exception as exc:  # noqa: BLE001 - tifffile / imagecodecs raise many kinds
        raise UserError(f"cannot read {path}: {exc}; the file is corrupt or not a TIFF image") from exc
    if array.ndim == 3 and axes.startswith("S") and not axes.endswith("S"):
        array, axes = np.moveaxis(array, 0, -1), axes[1:] + "S"  # planar RGB
    if "C" in axes:
        raise UserError(f"{path} has {array.shape[axes.index('C')]} channels (axes {axes}): save the "
                        "channel to segment as a gray image or stack, or the image as RGB")
    spatial = array.ndim - (1 if axes.endswith("S") else 0)
    if spatial == 2:
        return to_rgb(array, path)[None], False
    if spatial != 3 or (axes.endswith("S") and array.shape[-1] not in (1, 3, 4)):
        raise UserError(f"{path} has shape {array.shape} (axes {axes}): only 2-D images and 3-D "
                        "stacks (ZYX, gray or RGB) are supported")
    if array.shape[0] == 0:
        raise UserError(f"{path} is an empty stack")
    return scale_to_uint8(array), True


# --------------------------------------------------------------------------------------------
# detect predict: outputs
# --------------------------------------------------------------------------------------------
def _rle_string(counts: Sequence[int]) -> str:
    """pycocotools' compressed RLE string (LEB128-like, 5 bits a char, deltas from the 3rd run).

    Vectorised over the runs: group ``j`` (5 bits) of every value at once, a value's groups
    ending after the first one whose sign bit matches the rest (0 or -1) of the value.
    """
    counts = np.asarray(counts, np.int64)
    values = counts.copy()
    values[3:] -= counts[1:-2]
    groups, emitted = [], []
    alive = np.ones(values.shape, bool)  # values with groups still to write
    while alive.any():
        c = values & 0x1F
        values = values >> 5  # arithmetic shift, as pycocotools' C code
        more = np.where(c & 0x10, values != -1, values != 0)
        groups.append(c | np.where(more, 0x20, 0))
        emitted.append(alive.copy())
        alive &= more
    if not groups:
        return ""
    chars = np.stack(groups, axis=1)[np.stack(emitted, axis=1)] + 48  # row-major: value by value
    return chars.astype(np.uint8).tobytes().decode("ascii")


def rle_encode(crop: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int]) -> dict:
    """A bool mask ``crop`` placed at ``box`` = (x0, y0, x1, y1) in an HxW image -> COCO
    compressed RLE ``{"size": [H, W], "counts": str}`` (column-major, background first)."""
    height, width = shape
    x0, y0, x1, y1 = box
    columns = np.zeros((x1 - x0, height), np.uint8)  # only the columns the object spans
    columns[:, y0:y1] = crop.T
    flat = columns.ravel()
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]]).astype(np.int64))
    if flat[0]:
        runs = np.concatenate([[0], runs])
    runs[0] += x0 * height  # the empty columns left of the object
    if flat[-1]:
        runs = np.append(runs, 0)
    runs[-1] += (width - x1) * height  # and right of it
    return {"size": [height, width], "counts": _rle_string(runs)}


def polygons(crop: np.ndarray, box: tuple[int, int, int, int]) -> list[list[float]]:
    """Outer contours of a bool mask crop as COCO polygons ``[x1, y1, x2, y2, ...]``."""
    contours, _ = cv2.findContours(crop.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for contour in contours:
        if len(contour) >= 3:
            points = contour.reshape(-1, 2).astype(np.float64) + (box[0], box[1])
            out.append(points.ravel().round(2).tolist())
    return out


class CocoWriter:
    """Collects one COCO detection/segmentation file: an image entry per 2-D image or slice."""

    def __init__(self, segmentation: str = "rle") -> None:
        if segmentation not in ("rle", "polygon"):
            raise ValueError(f"segmentation must be rle or polygon, got {segmentation!r}")
        self.segmentation = segmentation
        self.images: list[dict] = []
        self.annotations: list[dict] = []

    def add(self, file_name: str, labels: np.ndarray, instances: Sequence[Instance],
            frame: int | None = None, label_offset: int = 0) -> None:
        """One image's final HxW labels (1..K) and the K instances in label order."""
        height, width = labels.shape
        image_id = len(self.images) + 1
        entry = {"id": image_id, "file_name": file_name, "height": height, "width": width}
        if frame is not None:
            entry["frame_index"] = frame
        self.images.append(entry)
        for value, where in enumerate(ndimage.find_objects(labels), start=1):
            if where is None:
                continue
            crop = labels[where] == value
            box = (where[1].start, where[0].start, where[1].stop, where[0].stop)
            segmentation = (rle_encode(crop, box, (height, width)) if self.segmentation == "rle"
                            else polygons(crop, box))
            self.annotations.append({
                "id": len(self.annotations) + 1, "image_id": image_id, "category_id": 1,
                "segmentation": segmentation, "area": int(crop.sum()),
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "iscrowd": 0,
                "score": round(instances[value - 1].confidence, 5),
                "predicted_iou": round(instances[value - 1].score, 5), "label": value + label_offset})

    def write(self, path: Path, description: str) -> None:
        write_json(path, {"info": {"description": description}, "images": self.images,
                          "annotations": self.annotations,
                          "categories": [{"id": 1, "name": CLASS_NAME, "supercategory": CLASS_NAME}]})


def label_edges(labels: np.ndarray) -> np.ndarray:
    """HxW bool: pixels with an 8-neighbour of another label (inside the image; the same as
    comparing with 3x3 maximum and minimum filters, by four shifted comparisons)."""
    height, width = labels.shape
    edge = np.zeros(labels.shape, bool)
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = (slice(0, height - dy), slice(max(0, -dx), width - max(0, dx)))
        b = (slice(dy, height), slice(max(0, dx), width - max(0, -dx)))
        differ = labels[a] != labels[b]
        edge[a] |= differ
        edge[b] |= differ
    return edge


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """HxWx3 RGB with each instance filled in its own colour and outlined."""
    colors = np.random.default_rng(0).integers(60, 256, size=(int(labels.max()) + 1, 3)).astype(np.float32)
    out = image.astype(np.float32)
    fg = labels > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colors[labels[fg]]
    edge = fg & label_edges(labels)
    out[edge] = colors[labels[edge]]
    return out.round().astype(np.uint8)


def write_labels(path: Path, labels: np.ndarray) -> None:
    """Instance labels as a zlib TIFF (uint16 when they fit, else uint32), napari/tifffile-readable."""
    dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    axes = "ZYX" if labels.ndim == 3 else "YX"
    tifffile.imwrite(path, labels.astype(dtype), compression="zlib", photometric="minisblack",
                     metadata={"axes": axes})


def output_paths(output_dir: Path, path: Path, with_overlay: bool) -> dict[str, Path]:
    paths = {"labels": output_dir / f"{path.stem}_labels.tif"}
    if with_overlay:
        paths["overlay"] = output_dir / f"{path.stem}_overlay.png"
    return paths


def segment_file(path: Path, name: str, segmenter: Segmenter, coco: CocoWriter,
                 outputs: dict[str, Path]) -> int:
    """Segment one image or stack, write its label TIFF and overlay; returns the object count."""
    planes, is_stack = read_planes(path)
    labels = np.zeros(planes.shape[:3], np.uint32)
    offset, empty, best = 0, 0, (-1, 0)
    for z in tqdm(range(len(planes)), desc=name, unit="slice", leave=False, disable=None if is_stack else True):
        image = to_rgb(planes[z], path)
        slice_labels, kept = segmenter(image)
        count = len(kept)
        labels[z] = np.where(slice_labels > 0, slice_labels.astype(np.uint32) + offset, 0)
        coco.add(name, slice_labels, kept, frame=z if is_stack else None, label_offset=offset)
        offset += count
        empty += count == 0
        best = max(best, (count, -z))
    if offset == 0:
        log.warning("no objects found in %s: wrote an empty label map (lower --conf, or check "
                    "--yolo_model / --model_path)", name)
    elif is_stack and empty:
        log.warning("no objects found in %d of %d slices of %s", empty, len(planes), name)
    write_labels(outputs["labels"], labels if is_stack else labels[0])
    if "overlay" in outputs:
        z = -best[1]
        cv2.imwrite(str(outputs["overlay"]), cv2.cvtColor(overlay(to_rgb(planes[z]), labels[z]), cv2.COLOR_RGB2BGR))
        if is_stack:
            log.info("%s: overlay of slice %d (the one with most objects)", name, z)
    log.info("%s: %d objects%s -> %s", name, offset, f" in {len(planes)} slices" if is_stack else "",
             outputs["labels"])
    return offset


def sam_from_args(args: argparse.Namespace) -> Any:
    """The SAM model of the shared model options, with ``--model_path``'s LoRA adapter loaded.

    The adapter's model type must match ``--model_type``; its image size replaces
    ``--image_size``.
    """
    device = resolve_device(args.device)
    if args.model_path is not None:
        config, _ = read_adapter(args.model_path)
        model_type = config.get("model_type")
        if model_type and model_type != args.model_type:
            raise UserError(f"{args.model_path} is an adapter for {model_type} but --model_type is "
                            f"{args.model_type}: pass --model_type {model_type}")
        size = config.get("image_size")
        if size and int(size) != args.image_size:
            log.info("using the adapter's image size %s px (not --image_size %d)", size, args.image_size)
            args.image_size = int(size)
    checkpoint = resolve_checkpoint(args.model_type, args.checkpoint)
    sam = build_model(args.model_type, checkpoint, args.image_size)
    if args.model_path is not None:
        config = load_adapter(args.model_path, sam)
        base = next((config[k] for k in ("checkpoint_sha256", "base_checkpoint_sha256") if config.get(k)), None)
        if base and sam.checkpoint_sha256 and base != sam.checkpoint_sha256:
            log.warning("%s was trained on other base weights (sha256 %s...) than %s", args.model_path,
                        str(base)[:12], checkpoint)
    return sam.to(device).eval()


def run_predict(args: argparse.Namespace) -> int:
    """Segment ``--input`` and write label TIFFs, overlays, one COCO file, config and log."""
    options = SegmentOptions(
        mode=args.mode, conf=args.conf, iou=args.iou, imgsz=args.imgsz or None, max_det=args.max_det,
        box_batch=args.box_batch, tile_size=args.tile_size, tile_overlap=args.tile_overlap,
        merge_threshold=args.merge_threshold, min_area=args.min_area, precision=args.precision,
        points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh)
    if args.mode == "yolo" and args.yolo_model is None:
        raise UserError("--mode yolo needs --yolo_model (the best.pt of `python main.py detect train`); "
                        "or use --mode amg")
    files = find_inputs(args.input)
    output_dir: Path = args.output_dir
    outputs = {f: output_paths(output_dir, f, not args.no_overlay) for f in files}
    coco_path, config_path = output_dir / "coco.json", output_dir / "detect_predict_config.json"
    refuse_existing([coco_path, config_path, *(p for o in outputs.values() for p in o.values())], args.overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    coco = CocoWriter(args.coco_segmentation)
    root = args.input if args.input.is_dir() else args.input.parent
    with log_to_file(output_dir / "detect_predict.log"):
        yolo = load_yolo(args.yolo_model) if args.mode == "yolo" else None
        if yolo is not None and options.imgsz is None:
            options.imgsz = yolo_imgsz(yolo)
        segmenter = Segmenter(sam_from_args(args), options, yolo)
        write_json(config_path, {**args_record(args), "options": asdict(options)})
        total = 0
        for path in tqdm(files, desc="images", unit="file", disable=None if len(files) > 1 else True):
            total += segment_file(path, path.relative_to(root).as_posix(), segmenter, coco, outputs[path])
        coco.write(coco_path, f"detect predict --mode {args.mode} on {args.input}")
        log.info("%d objects in %d file(s); outputs in %s", total, len(files), output_dir)
    return 0


# --------------------------------------------------------------------------------------------
# Command-line parsers
# --------------------------------------------------------------------------------------------
def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a YOLOv8 detector on boxes derived from the masks (offline)",
        description="Export the dataset as YOLO boxes with the grouped train/validation split, train "
                    "YOLOv8 with ultralytics without any network access, and report box precision and "
                    "recall at IoU 0.5 on the validation split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_arguments(parser)
    split = parser.add_argument_group("split (the same grouped folds as the SAM trainer)")
    split.add_argument("--num_folds", type=int, default=1,
                       help="1 = one grouped train/validation split; k >= 2 = grouped k-fold, train on --fold")
    split.add_argument("--fold", type=int, default=0, help="which fold's split to train on")
    split.add_argument("--val_fraction", type=float, default=0.2,
                       help="share of the samples for validation with --num_folds 1")
    split.add_argument("--folds_file", type=Path, default=None,
                       help="reuse a folds.json (e.g. the SAM training run's) so detector and SAM "
                            "share their validation images")
    split.add_argument("--seed", type=int, default=0, help="seed of the split and of YOLO training")
    yolo = parser.add_argument_group("detector")
    yolo.add_argument("--yolo_model", default="yolov8n.yaml",
                      help="yolov8n/s/m.yaml = random init; a local .pt = fine-tune those weights "
                           "(nothing is downloaded)")
    yolo.add_argument("--epochs", type=int, default=100, help="training epochs")
    yolo.add_argument("--imgsz", type=int, default=640,
                      help="YOLO input side in px (use the patch size with --patch_size)")
    yolo.add_argument("--batch_size", type=int, default=16, help="images per training batch")
    yolo.add_argument("--patience", type=int, default=50, help="stop after this many epochs without improvement")
    yolo.add_argument("--num_workers", type=int, default=4, help="data loading workers")
    yolo.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    yolo.add_argument("--conf", type=float, default=0.1,
                      help="proposal confidence threshold the validation report is given at "
                           "(low = high recall; SAM cleans up the masks)")
    yolo.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold")
    yolo.add_argument("--no_plots", action="store_true", help="skip ultralytics' training plots")
    yolo.add_argument("--yolo_args", nargs="*", default=[], metavar="KEY=VALUE",
                      help="further ultralytics training options, e.g. mosaic=0.5 lr0=0.005")
    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", type=Path, default=Path("runs/detect_train"),
                     help="run folder: yolo_dataset/, yolo/weights/best.pt, val_metrics.json, log; "
                          "a folds.json there (e.g. the SAM run's) is reused, so both share folds")
    out.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run there")
    parser.set_defaults(func=run_train)


def _add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="segment images or 3-D TIFF stacks: YOLO boxes -> (LoRA-)SAM masks",
        description="Segment an image, a folder of images or a 3-D TIFF stack (slice by slice) into "
                    "instance labels: <stem>_labels.tif, <stem>_overlay.png, and coco.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", type=Path, required=True, help="an image, a folder of images, or a TIFF stack")
    io.add_argument("--output_dir", type=Path, default=Path("runs/detect_predict"), help="where outputs go")
    io.add_argument("--overwrite", action="store_true", help="replace existing output files")
    io.add_argument("--coco_segmentation", choices=("rle", "polygon"), default="rle",
                    help="mask encoding in coco.json: compressed RLE (exact) or polygons")
    io.add_argument("--no_overlay", action="store_true", help="skip the overlay PNGs")
    io.add_argument("--min_area", type=int, default=10, help="drop objects with fewer pixels")
    add_model_arguments(parser)
    parser.add_argument_group("LoRA adapter").add_argument(
        "--model_path", type=Path, default=None, help="LoRA adapter from `train` (omit for the base model)")
    mode = parser.add_argument_group("prompts")
    mode.add_argument("--mode", choices=("yolo", "amg"), default="yolo",
                      help="yolo = detector boxes prompt SAM; amg = SAM's automatic mask generator (zero-shot)")
    mode.add_argument("--yolo_model", type=Path, default=None, help="best.pt from `detect train` (mode yolo)")
    mode.add_argument("--conf", type=float, default=0.1, help="YOLO confidence threshold (low = high recall)")
    mode.add_argument("--iou", type=float, default=0.7, help="YOLO NMS IoU threshold")
    mode.add_argument("--imgsz", type=int, default=0, help="YOLO input side; 0 = the size it was trained at")
    mode.add_argument("--max_det", type=int, default=1000, help="most YOLO boxes per image or tile")
    mode.add_argument("--box_batch", type=int, default=32, help="boxes per SAM decoder call")
    mode.add_argument("--points_per_side", type=int, default=32, help="AMG: grid of points per image side")
    mode.add_argument("--points_per_batch", type=int, default=64, help="AMG: points per decoder call")
    mode.add_argument("--pred_iou_thresh", type=float, default=0.88, help="AMG: keep masks of higher predicted IoU")
    mode.add_argument("--stability_score_thresh", type=float, default=0.95, help="AMG: keep stabler masks")
    tiles = parser.add_argument_group("tiling of large images")
    tiles.add_argument("--tile_size", type=int, default=1024,
                       help="segment images larger than this in tiles of this side (original pixels); 0 = never")
    tiles.add_argument("--tile_overlap", type=int, default=128, help="pixels shared by neighbouring tiles")
    tiles.add_argument("--merge_threshold", type=float, default=0.5,
                       help="objects of two tiles whose masks have this IoU inside the window both "
                            "tiles saw are merged into one")
    parser.set_defaults(func=run_predict)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``detect`` (with ``train`` and ``predict``) on the top-level parser."""
    parser = subparsers.add_parser(
        "detect", help="automatic instance segmentation: YOLOv8 boxes prompt (LoRA-)SAM",
        description="Train a YOLOv8 detector on mask-derived boxes (detect train), then segment "
                    "images and 3-D stacks automatically with its boxes as SAM prompts (detect predict).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="detect_command", metavar="<train|predict>", required=True)
    _add_train_parser(commands)
    _add_predict_parser(commands)
    return parser
