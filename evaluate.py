"""``python main.py evaluate``: score the base model, LoRA adapters and trivial baselines.

Which models (``--model_path``, ``--compare NAME=SOURCE ...``, ``--cv_run``)
    A source is ``base`` (the zero-shot base model), an adapter file written by ``train``
    (``fold_k/best.pt``), or a training run directory: then every image of ``--split val`` is
    scored by the adapter of the fold that held it out (``fold_k/best.pt`` on fold k's
    validation images, as seed 002 reports per fold). Every model sees the same images and the
    same prompts. Adapters are checked against the flags: another ``model_type`` or
    ``image_size`` is refused, another base checkpoint (SHA-256) gives a warning. Left out,
    ``--model_type`` / ``--image_size`` come from the adapters (or the run's config.json).

Which images (``--split``)
    ``test``: the data's fixed test split (``test/`` folder, ``testing*`` volume); ``val``: the
    validation folds of a training run; ``all``: every sample. Default: ``val`` with a run,
    else ``test`` when the data has one, else ``all``. With box or point prompts, images without
    objects are skipped (nothing to prompt: every model would score a trivial 1.0 there).

Prompts (``--prompt``), one per ground-truth object
    ``box``: the object's bounding box (x0, y0, x1, y1, inclusive pixel corners). ``point``:
    one positive point at the object pixel farthest from the object's border (Euclidean
    distance transform; the first such pixel in row-major order), deterministic. ``auto``: SAM's
    automatic mask generator (a grid of points, no ground truth used). ``yolo``: the automatic
    pipeline of ``detect predict`` (see below). ``--max_objects N``
    prompts a seeded random subset of N objects per image and ignores the pixels of the others.
    Each image is encoded once per model; its prompts are decoded in chunks of
    ``--batch_prompts``.

From masks to an instance map
    Each object's mask is pasted with the ground-truth object's id (box / point prompts, so
    colours correspond in the figures; automatic masks are numbered 1..N). Where masks overlap
    the pixel goes to the mask with the higher predicted IoU score (equal scores: the later
    prompt), as in the trainer's validation.

Honest baselines (box prompts)
    ``baseline_box`` (the prompt box filled) and ``baseline_ellipse`` (the ellipse inscribed in
    the prompt box), scored with the same metrics on the same images; where two overlap, the
    smaller shape wins. A box-prompted score means little until it is set beside these.

Detector prompts (``--prompt yolo --yolo_model best.pt``)
    A YOLO detector (``detect train``) proposes boxes (``--conf``, NMS at ``--iou``, at the size
    it was trained at), once per image; they prompt each model (one encoder pass, boxes decoded
    in chunks, overlaps to the higher predicted IoU). Every model gets three kinds of row on the
    same images: ``yolo+sam`` (``yolo+NAME`` when several models are compared) with the
    detector's boxes, the model's own name with the ground-truth boxes (the upper bound a perfect
    detector would reach), and the box-only detection masks ``baseline_yolo_box`` (each YOLO box
    filled, higher confidence on top) beside the ground-truth ``baseline_box`` /
    ``baseline_ellipse``. summary.json adds the detector's box precision / recall / F1 at IoU >
    0.5 against the ground-truth objects' boxes (one-to-one matching, counts pooled over images).

Metrics (metrics.py), pixels in ``Sample.ignore`` left out
    Semantic (foreground = label > 0): ``dice``, ``iou``, ``pixel_precision``,
    ``pixel_recall`` (and the counts ``pixel_tp`` / ``pixel_fp`` / ``pixel_fn``). Instance:
    ``aji``, ``aji_plus``, ``pq``, ``sq``, ``rq``, ``f1``, ``precision``, ``recall`` (objects
    matched at IoU > 0.5), ``mean_matched_iou``, ``f1@0.50`` ... ``f1@0.95`` and counts.
    Two kinds of aggregate, always named: ``per_image_mean`` (mean of per-image scores, with
    standard deviation and a 95 % percentile-bootstrap interval of the mean) and ``pooled``
    (counts summed over all images first; AJI = summed intersections / summed unions).

Outputs in ``--output_dir``
    ``per_image.csv`` (a row per image and model), ``per_group.csv`` (per model and tag:
    tissue / organ / volume, plus ``(all)``), ``per_fold.csv`` (``--split val``),
    ``summary.json``, ``config.json``, ``evaluate.log``; ``comparison.png`` (with ``--compare``
    or ``--plot``), ``plots/`` (``--plot``) and ``visualizations/`` (``--visualize``).
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import io
import json
import logging
import os
import re
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from tqdm import tqdm

import dataset as data
import figures
import lora
import metrics
import model as sam_model
import yolo_sam
from errors import UserError
from runlog import log_to_file

log = logging.getLogger(__name__)

PROMPTS = ("box", "point", "auto", "yolo")
SPLITS = ("test", "val", "all")
BASELINE_BOX = "baseline_box"
BASELINE_ELLIPSE = "baseline_ellipse"
BASELINES = (BASELINE_BOX, BASELINE_ELLIPSE)
BASELINE_YOLO_BOX = "baseline_yolo_box"  # --prompt yolo: the detector's boxes filled
YOLO_PREFIX = "yolo+"  # --prompt yolo: rows of a model prompted by the detector's boxes
DETECTION_IOU = 0.5  # box IoU above which a detection matches a ground-truth object
OUTPUT_FORMAT = "samlora-evaluation"
LOG_FILE = "evaluate.log"
RUN_DATA_OPTIONS = ("data_dir", "data_format", "patch_size", "patch_overlap", "drop_empty_patches",
                    "slice_block", "nifti_axis")
SHA_KEYS = ("base_checkpoint_sha256", "checkpoint_sha256")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")

# Semantic keys of metrics.semantic_metrics -> our column names (instance keys keep theirs).
SEMANTIC_COLUMNS = {"dice": "dice", "iou": "iou", "precision": "pixel_precision",
                    "recall": "pixel_recall", "tp": "pixel_tp", "fp": "pixel_fp", "fn": "pixel_fn"}
SCORE_COLUMNS: tuple[str, ...] = tuple(SEMANTIC_COLUMNS[k] for k in metrics.SEMANTIC_SCORE_KEYS) \
    + metrics.instance_score_keys()
# The metrics of the group tables and the printed table, in display order.
GROUP_METRICS: tuple[str, ...] = ("dice", "iou", "pixel_precision", "pixel_recall", "aji", "aji_plus",
                                  "pq", "sq", "rq", "f1", "precision", "recall")
FIGURE_METRICS = {"dice": "Dice", "iou": "IoU", "aji": "AJI", "pq": "PQ", "f1": "F1@0.5"}
ID_COLUMNS = ("model", "kind", "fold", "image", "path", "tag", "group", "split", "height", "width",
              "n_objects", "n_prompts", "seconds")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _retune(parser: argparse.ArgumentParser, dest: str, default: Any, help_text: str) -> None:
    """Change the default and help of an option another module added (shared option groups)."""
    for action in parser._actions:  # noqa: SLF001 - argparse has no public accessor
        if action.dest == dest:
            action.default = default
            action.help = help_text
            return
    raise ValueError(f"no option with dest {dest!r}")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``evaluate`` subcommand."""
    parser = subparsers.add_parser(
        "evaluate", help="score the base model, adapters and trivial baselines on labelled data",
        description="Score SAM / MobileSAM zero-shot, LoRA adapters or a cross-validated run on "
                    "labelled images with box / point / automatic prompts, beside the trivial "
                    "box and ellipse baselines. Example: python main.py evaluate --data_dir data/em "
                    "--compare base=base lora=runs/train/fold_0/best.pt --plot --visualize",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data.add_data_arguments(parser, required=False)
    _retune(parser, "data_dir", None,
            "data directory (images/ + masks/, NuInsSeg organ folders, EPFL TIFF stacks, COCO "
            "annotations.json or NIfTI volumes); default with --cv_run: the run's")
    _retune(parser, "max_objects", 0,
            "prompt at most this many objects per image (a seeded random subset; the pixels of "
            "the others are ignored by the metrics); 0 = all")
    sam_model.add_model_arguments(parser)
    _retune(parser, "model_type", None,
            f"{', '.join(sam_model.MODEL_REGISTRY)} (vit_t = MobileSAM); default: the adapters' "
            "model type, else vit_t")
    _retune(parser, "image_size", None,
            "model input side in px (1024, 512 or 256); default: the adapters' image size, else 1024")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--model_path", type=Path, default=None,
                    help="a LoRA adapter from train (fold_k/best.pt), reported as 'finetuned'; "
                         "omitted: the zero-shot base model")
    ev.add_argument("--compare", nargs="+", metavar="NAME=SOURCE", default=None,
                    help="several models on the same images and prompts, one table and one figure; "
                         "SOURCE is 'base', an adapter file or a training run directory, e.g. "
                         "--compare base=base lora=runs/train")
    ev.add_argument("--cv_run", type=Path, default=None,
                    help="a training run directory: score each fold's best.pt on its own validation "
                         "fold (data options from the run's config.json, folds from folds.json)")
    ev.add_argument("--split", choices=SPLITS, default=None,
                    help="test = the data's fixed test split, val = the validation folds of "
                         "--cv_run, all = every sample; default: val with a run, else test when "
                         "the data has one, else all")
    ev.add_argument("--prompt", choices=PROMPTS, default="box",
                    help="box = ground-truth box per object, point = one interior point per object, "
                         "auto = SAM's automatic mask generator (no ground truth used), yolo = the "
                         "boxes of a YOLO detector (--yolo_model), beside ground-truth boxes")
    ev.add_argument("--batch_prompts", type=int, default=64,
                    help="prompts decoded together (also the automatic generator's points per batch)")
    ev.add_argument("--output_dir", type=Path, default=Path("runs/evaluate"),
                    help="where the tables, summary.json, log and figures go")
    ev.add_argument("--overwrite", action="store_true",
                    help="write into a non-empty --output_dir (replaces a previous evaluation's files)")
    ev.add_argument("--seed", type=int, default=0,
                    help="seed for --max_objects subsets, bootstrap intervals and random base weights")
    ev.add_argument("--bootstrap", type=int, default=2000,
                    help="bootstrap resamples for the 95 %% intervals")
    auto = parser.add_argument_group("automatic mask generator (--prompt auto)")
    auto.add_argument("--points_per_side", type=int, default=32, help="point grid side")
    auto.add_argument("--pred_iou_thresh", type=float, default=0.88,
                      help="drop masks whose predicted IoU is below this")
    auto.add_argument("--stability_score_thresh", type=float, default=0.95,
                      help="drop masks whose stability score is below this")
    det = parser.add_argument_group("detector (--prompt yolo)")
    det.add_argument("--yolo_model", type=Path, default=None,
                     help="the YOLO detector's best.pt written by `python main.py detect train`")
    det.add_argument("--conf", type=float, default=0.1,
                     help="YOLO confidence threshold for the proposals (low = high recall)")
    det.add_argument("--iou", type=float, default=0.7, help="YOLO NMS IoU threshold")
    det.add_argument("--max_det", type=int, default=1000, help="most YOLO boxes per image")
    fig = parser.add_argument_group("figures")
    fig.add_argument("--visualize", action="store_true",
                     help="per image: image | ground truth | prediction of each model (contours)")
    fig.add_argument("--max_visualize", type=int, default=20,
                     help="at most this many images get a --visualize figure (0 = all)")
    fig.add_argument("--plot", action="store_true",
                     help="bar charts per tag (and per fold) and a box plot of per-image Dice")
    parser.set_defaults(func=run)
    return parser


# --------------------------------------------------------------------------------------------
# Configuration and model sources
# --------------------------------------------------------------------------------------------
@dataclass
class ModelSource:
    """One model to score: ``kind`` is base, adapter or run (per-fold adapters)."""

    name: str
    kind: str
    path: Path | None = None

    @property
    def spec(self) -> str:
        return "base" if self.path is None else str(self.path)


@dataclass
class EvaluateConfig:
    """Everything that defines an evaluation; written to ``config.json``."""

    data: dict[str, Any]
    split: str
    prompt: str
    models: dict[str, str]
    model_type: str
    image_size: int
    checkpoint: str | None
    checkpoint_sha256: str | None
    random_weights: bool
    precision: str
    max_objects: int
    batch_prompts: int
    seed: int
    bootstrap: int
    cv_run: str | None = None
    auto: dict[str, float] | None = None
    detector: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_sources(args: argparse.Namespace) -> list[ModelSource]:
    """The models to score, from ``--compare`` / ``--model_path`` / ``--cv_run``."""
    if args.compare and args.model_path is not None:
        raise UserError("give either --model_path (one adapter) or --compare (several models), not both")
    if args.compare:
        entries = []
        for item in args.compare:
            name, sep, spec = item.partition("=")
            if not sep or not name or not spec:
                raise UserError(f"--compare {item!r}: write NAME=SOURCE, e.g. base=base or "
                                "lora=runs/train/fold_0/best.pt")
            entries.append((name.strip(), spec.strip()))
    elif args.model_path is not None:
        entries = [("finetuned", str(args.model_path))]
    elif args.cv_run is not None:
        entries = [("finetuned", str(args.cv_run))]
    else:
        entries = [("base", "base")]
    sources, seen = [], set()
    for name, spec in entries:
        if not NAME_PATTERN.fullmatch(name):
            raise UserError(f"model name {name!r}: use letters, digits and _ . + - only")
        if name in seen:
            raise UserError(f"model name {name!r} is given twice in --compare; names must differ")
        if name.startswith("baseline"):
            raise UserError(f"model name {name!r}: names starting with 'baseline' are reserved for "
                            "the trivial box / ellipse baselines")
        if name.startswith(YOLO_PREFIX):
            raise UserError(f"model name {name!r}: names starting with {YOLO_PREFIX!r} are reserved for "
                            "the detector-prompted rows of --prompt yolo")
        seen.add(name)
        sources.append(_source(name, spec))
    return sources


def _source(name: str, spec: str) -> ModelSource:
    if spec == "base":
        return ModelSource(name, "base")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / data.FOLDS_FILE).is_file():
            raise UserError(f"{path} is a directory but not a training run (no {data.FOLDS_FILE}); "
                            "give an adapter file such as RUN/fold_0/best.pt, a run directory or 'base'")
        return ModelSource(name, "run", path)
    if not path.is_file():
        raise UserError(f"model {name!r}: {path} does not exist (give 'base', an adapter file from "
                        "train such as RUN/fold_0/best.pt, or a run directory)")
    lora.read_adapter(path)  # refuses files that are not adapters, with the file name
    return ModelSource(name, "adapter", path)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """A training run's ``config.json`` (flat ``TrainConfig`` fields)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} has no config.json: is it a run directory written by train?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise UserError(f"{path} does not hold a run configuration (a JSON object)")
    return config


def fold_adapters(run_dir: Path, num_folds: int) -> list[Path]:
    """``run_dir/fold_k/best.pt`` for every fold, or a UserError naming the missing one."""
    paths = [run_dir / f"fold_{k}" / "best.pt" for k in range(num_folds)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{missing[0]} does not exist: fold {missing[0].parent.name} of {run_dir} has no "
                        "best adapter yet; finish the training (train --resume) first")
    return paths


def _adapter_sha(config: Mapping[str, Any]) -> str | None:
    return next((config[k] for k in SHA_KEYS if config.get(k)), None)


def resolve_model_options(args: argparse.Namespace, adapter_configs: Mapping[Path, Mapping[str, Any]],
                          run_config: Mapping[str, Any] | None) -> tuple[str, int]:
    """``(model_type, image_size)``: the flag, else the adapters' common value, else the run's,
    else vit_t / 1024; an adapter that disagrees with the flag or with another is refused."""
    chosen = []
    for key, flag, fallback in (("model_type", "--model_type", "vit_t"), ("image_size", "--image_size", 1024)):
        explicit = getattr(args, key)
        found = {}
        for path, config in adapter_configs.items():
            if config.get(key) is not None:
                found.setdefault(config[key], path)
        if explicit is not None:
            for value, path in found.items():
                if value != explicit:
                    raise UserError(f"{path} is an adapter for {key} {value} but {flag} is {explicit}: "
                                    f"pass {flag} {value} (or leave it out to take it from the adapter)")
            chosen.append(explicit)
        elif len(found) > 1:
            (a, pa), (b, pb) = list(found.items())[:2]
            raise UserError(f"the adapters disagree on {key}: {pa} has {a}, {pb} has {b}; "
                            "evaluate them in separate runs")
        elif found:
            chosen.append(next(iter(found)))
        elif run_config and run_config.get(key) is not None:
            chosen.append(run_config[key])
        else:
            chosen.append(fallback)
    return str(chosen[0]), int(chosen[1])


# --------------------------------------------------------------------------------------------
# Prompts, instance maps, baselines
# --------------------------------------------------------------------------------------------
@dataclass
class ObjectPrompts:
    """The prompts of one image, one per prompted ground-truth object (N of them).

    ids: N int32 label values; boxes: Nx4 float32 (x0, y0, x1, y1), inclusive pixel corners;
    points: Nx2 float32 (x, y) interior points; ignore: HxW bool of ignored pixels (the
    sample's ambiguous regions plus objects left out by ``max_objects``) or None.
    """

    ids: np.ndarray
    boxes: np.ndarray
    points: np.ndarray
    ignore: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


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


def object_prompts(labels: np.ndarray, ignore: np.ndarray | None = None, max_objects: int = 0,
                   rng: np.random.Generator | None = None) -> ObjectPrompts:
    """Box and interior-point prompts for the objects of an ``HxW`` label map.

    Args:
        labels: ``HxW`` integer instance labels (0 background; ids need not be consecutive).
        ignore: ``HxW`` bool of pixels the metrics ignore, or None.
        max_objects: prompt a random subset of at most this many objects (0 = all); the pixels
            of the others are added to the returned ``ignore`` so they are neither found nor
            missed.
        rng: generator for that subset (default: seeded with 0).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be HxW, got shape {labels.shape}")
    slices = ndimage.find_objects(labels.astype(np.int64, copy=False)) if labels.size else []
    ids = np.array([i + 1 for i, s in enumerate(slices) if s is not None], dtype=np.int64)
    if max_objects and ids.size > max_objects:
        rng = rng if rng is not None else np.random.default_rng(0)
        keep = np.sort(rng.choice(ids, size=max_objects, replace=False))
        dropped = np.isin(labels, np.setdiff1d(ids, keep))
        ignore = dropped if ignore is None else (ignore | dropped)
        ids = keep
    boxes = np.zeros((ids.size, 4), np.float32)
    points = np.zeros((ids.size, 2), np.float32)
    for row, obj in enumerate(ids):
        ys, xs = slices[obj - 1]
        boxes[row] = (xs.start, ys.start, xs.stop - 1, ys.stop - 1)
        y, x = interior_point(labels[ys, xs] == obj)
        points[row] = (xs.start + x, ys.start + y)
    return ObjectPrompts(ids.astype(np.int32), boxes, points, ignore)


class InstanceCanvas:
    """Pastes object masks into an ``HxW`` int32 instance map; overlaps go to the higher score.

    A pixel covered by several masks keeps the label of the one with the highest score; equal
    scores go to the mask pasted later. The result does not depend on chunking.
    """

    def __init__(self, shape: tuple[int, int]) -> None:
        self.labels = np.zeros(shape, np.int32)
        self.score = np.full(shape, -np.inf, np.float32)

    def paste(self, mask: np.ndarray, score: float, label: int,
              offset: tuple[int, int] = (0, 0)) -> None:
        """Paste ``mask`` (bool, the full map's shape or a window at ``offset`` (y, x))."""
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            return
        cols = np.flatnonzero(mask.any(axis=0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        region = mask[y0:y1, x0:x1]
        window = (slice(offset[0] + y0, offset[0] + y1), slice(offset[1] + x0, offset[1] + x1))
        wins = region & (np.float32(score) >= self.score[window])
        self.labels[window][wins] = label
        self.score[window][wins] = score


def ellipse_mask(height: int, width: int) -> np.ndarray:
    """``height x width`` bool: the ellipse inscribed in the rectangle of those pixels.

    A pixel belongs when its centre satisfies ((x - cx) / a)^2 + ((y - cy) / b)^2 <= 1 with
    the centre and semi-axes a = width / 2, b = height / 2 of the pixel rectangle.
    """
    yy = (np.arange(height) + 0.5 - height / 2.0) / (height / 2.0)
    xx = (np.arange(width) + 0.5 - width / 2.0) / (width / 2.0)
    return yy[:, None] ** 2 + xx[None, :] ** 2 <= 1.0


def baseline_instances(shape: tuple[int, int], prompts: ObjectPrompts, shape_kind: str) -> np.ndarray:
    """The trivial prediction of each prompt box: filled (``box``) or its inscribed ellipse.

    Returns an ``HxW`` int32 instance map with the objects' ids; where shapes overlap, the
    smaller one wins (so a small object inside a large box stays visible).
    """
    if shape_kind not in ("box", "ellipse"):
        raise ValueError(f"shape_kind must be box or ellipse, got {shape_kind!r}")
    canvas = InstanceCanvas(shape)
    for obj, box in zip(prompts.ids, prompts.boxes):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        h, w = y1 - y0 + 1, x1 - x0 + 1
        mask = np.ones((h, w), bool) if shape_kind == "box" else ellipse_mask(h, w)
        canvas.paste(mask, -float(mask.sum()), int(obj), offset=(y0, x0))
    return canvas.labels


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_instances(sam: nn.Module, image: np.ndarray, prompts: ObjectPrompts, prompt: str,
                      chunk: int = 64, precision: str = "fp32") -> np.ndarray:
    """One encoder pass, prompts decoded in chunks of ``chunk`` -> ``HxW`` int32 instance map."""
    canvas = InstanceCanvas(image.shape[:2])
    if len(prompts) == 0:
        return canvas.labels
    device = next(sam.parameters()).device
    with sam_model.autocast(device, precision):
        prepared = sam_model.prepare_image(image, sam.image_encoder.img_size)
        embedding = sam_model.encode_images(sam, prepared.tensor[None].to(device))
        for start in range(0, len(prompts), chunk):
            part = slice(start, start + chunk)
            if prompt == "box":
                masks, scores, _ = sam_model.predict(sam, image, boxes=prompts.boxes[part],
                                                     image_embedding=embedding)
            else:
                points = prompts.points[part, None, :]
                masks, scores, _ = sam_model.predict(sam, image, points=points,
                                                     point_labels=np.ones(points.shape[:2], np.int64),
                                                     image_embedding=embedding)
            for mask, score, obj in zip(masks, scores, prompts.ids[part]):
                canvas.paste(mask, float(score), int(obj))
    return canvas.labels


def automatic_generator(sam: nn.Module, args: argparse.Namespace):
    """segment_anything's automatic mask generator on ``sam`` (any Sam, MobileSAM included)."""
    from segment_anything import SamAutomaticMaskGenerator

    return SamAutomaticMaskGenerator(sam, points_per_side=args.points_per_side,
                                     points_per_batch=args.batch_prompts,
                                     pred_iou_thresh=args.pred_iou_thresh,
                                     stability_score_thresh=args.stability_score_thresh)


@torch.no_grad()
def automatic_instances(generator, image: np.ndarray, precision: str = "fp32") -> np.ndarray:
    """The generator's masks pasted into an instance map (1..N; overlaps: higher predicted IoU)."""
    device = next(generator.predictor.model.parameters()).device
    with sam_model.autocast(device, precision):
        records = generator.generate(image)
    canvas = InstanceCanvas(image.shape[:2])
    for i, record in enumerate(records):
        canvas.paste(np.asarray(record["segmentation"], bool), float(record["predicted_iou"]), i + 1)
    return canvas.labels


# --------------------------------------------------------------------------------------------
# Scores and tables
# --------------------------------------------------------------------------------------------
def score_image(gt: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None = None) -> dict[str, float | int]:
    """Semantic (renamed, see :data:`SEMANTIC_COLUMNS`) and instance metrics of one image."""
    semantic = metrics.semantic_metrics(gt, pred, ignore)
    row: dict[str, float | int] = {SEMANTIC_COLUMNS[k]: v for k, v in semantic.items()}
    row.update(metrics.instance_metrics(gt, pred, ignore))
    return row


def pooled_scores(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | int]:
    """Dataset-level (pooled) semantic and instance scores of per-image rows."""
    back = {v: k for k, v in SEMANTIC_COLUMNS.items()}
    semantic = metrics.pooled_semantic_metrics(
        [{back[c]: r[c] for c in ("pixel_tp", "pixel_fp", "pixel_fn")} for r in rows])
    pooled: dict[str, float | int] = {SEMANTIC_COLUMNS[k]: v for k, v in semantic.items()}
    pooled.update(metrics.pooled_instance_metrics(rows))
    return pooled


def summarize_rows(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], n_boot: int,
                   seed: int) -> dict[str, dict[str, float | int]]:
    """``{key: metrics.summarize(per-image values)}`` (mean, std, 95 % CI, n)."""
    return {k: metrics.summarize([float(r[k]) for r in rows], n_boot=n_boot, seed=seed) for k in keys}


def group_rows(rows: Sequence[Mapping[str, Any]], by: str, n_boot: int, seed: int,
               include_all: bool = True) -> list[dict[str, Any]]:
    """One row per (model, value of ``by``): per-image mean, std, CI and pooled of
    :data:`GROUP_METRICS`; ``include_all`` adds the ``(all)`` group per model."""
    buckets: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    models: dict[str, str] = {}
    for r in rows:
        models.setdefault(r["model"], r["kind"])
        buckets[(r["model"], str(r[by]))].append(r)
        if include_all:
            buckets[(r["model"], "(all)")].append(r)
    out = []
    for model_name in models:
        keys = sorted((g for m, g in buckets if m == model_name), key=lambda g: (g == "(all)", _natural(g)))
        for value in keys:
            members = buckets[(model_name, value)]
            row: dict[str, Any] = {"model": model_name, "kind": models[model_name], by: value,
                                   "n_images": len(members)}
            summary = summarize_rows(members, GROUP_METRICS, n_boot, seed)
            pooled = pooled_scores(members)
            for key in GROUP_METRICS:
                s = summary[key]
                row.update({f"{key}_mean": s["mean"], f"{key}_std": s["std"], f"{key}_ci_low": s["ci_low"],
                            f"{key}_ci_high": s["ci_high"], f"{key}_pooled": pooled[key]})
            out.append(row)
    return out


def _natural(text: str) -> list[Any]:
    """Sort key that orders ``fold 10`` after ``fold 9``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def per_image_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Identity columns, headline scores, then every other key in first-seen order."""
    head = list(ID_COLUMNS) + ["dice", "iou", "pixel_precision", "pixel_recall", "aji", "aji_plus", "pq",
                               "sq", "rq", "f1", "precision", "recall", "mean_matched_iou", "n_gt",
                               "n_pred", "tp", "fp", "fn"]
    rest = []
    for r in rows:
        rest += [k for k in r if k not in head and k not in rest]
    return head + rest


def format_table(summaries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The printed table: per model the per-image mean (95 % CI) and pooled scores."""
    header = (f"{'model':<18} {'images':>6}  {'Dice mean [95% CI]':<22} {'Dice pooled':>11} "
              f"{'IoU mean':>8} {'IoU pooled':>10} {'AJI mean':>8} {'AJI pooled':>10} "
              f"{'PQ mean':>7} {'F1@0.5 mean':>11}")
    lines = [header, "-" * len(header)]
    for name, s in summaries.items():
        mean, pooled = s["per_image_mean"], s["pooled"]
        d = mean["dice"]
        lines.append(
            f"{name:<18} {d['n']:>6}  {d['mean']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]   "
            f"{pooled['dice']:>11.3f} {mean['iou']['mean']:>8.3f} {pooled['iou']:>10.3f} "
            f"{mean['aji']['mean']:>8.3f} {pooled['aji']:>10.3f} {mean['pq']['mean']:>7.3f} "
            f"{mean['f1']['mean']:>11.3f}")
    return lines


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename (never a half file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Rows as CSV (floats with 6 significant digits), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v))
                         for k, v in row.items()})
    _atomic_write(path, buffer.getvalue())
    return path


def check_output_dir(output_dir: Path, overwrite: bool, protected: Iterable[Path] = ()) -> None:
    """Refuse a non-empty ``output_dir`` unless ``overwrite``, and never write into a training
    run or into an input directory (``protected``). Changes nothing."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir} exists and is not a directory; choose another path")
    resolved = output_dir.resolve()
    for other in protected:
        other = Path(other).resolve()
        if resolved == other or other in resolved.parents:
            raise UserError(f"--output_dir {output_dir} is inside {other}, which is an input of this "
                            "evaluation; choose a directory of its own (e.g. runs/evaluate)")
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    if (output_dir / data.FOLDS_FILE).is_file() or any(output_dir.glob("fold_*")):
        raise UserError(f"--output_dir {output_dir} holds a training run; evaluation results go to a "
                        "directory of their own (nothing was written)")
    if not overwrite:
        found = ", ".join(sorted(p.name for p in output_dir.iterdir())[:5])
        raise UserError(f"--output_dir {output_dir} is not empty ({found}); choose a new directory "
                        "or pass --overwrite (nothing was written)")


def prepare_output_dir(output_dir: Path) -> None:
    """Create ``output_dir``; remove a previous evaluation's files there (only those its
    summary.json lists: other files stay). Call :func:`check_output_dir` first."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    previous = output_dir / "summary.json"
    try:
        record = json.loads(previous.read_text(encoding="utf-8")) if previous.is_file() else {}
    except (OSError, ValueError):
        record = {}
    if isinstance(record, dict) and record.get("format") == OUTPUT_FORMAT:
        resolved, removed = output_dir.resolve(), 0
        for name in record.get("files", []):
            path = (output_dir / str(name)).resolve()
            if resolved in path.parents and path.is_file():
                path.unlink()
                removed += 1
        for sub in ("plots", "visualizations"):
            if (output_dir / sub).is_dir() and not any((output_dir / sub).iterdir()):
                (output_dir / sub).rmdir()
        log.info("--overwrite: removed %d files of the previous evaluation in %s", removed, output_dir)
    elif any(output_dir.iterdir()):
        log.warning("--overwrite: writing into %s, which holds other files; files with the same "
                    "names are replaced, the others stay", output_dir)


class _Buffer(logging.Handler):
    """Keeps the records logged before the output directory (and its log file) exists."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _replay(records: Sequence[logging.LogRecord], path: Path) -> None:
    """Write ``records`` to the open log file at ``path`` (its FileHandler on the root logger)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler.baseFilename == os.path.abspath(path):
            for record in records:
                handler.handle(record)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80] or "image"


# --------------------------------------------------------------------------------------------
# Selection of images
# --------------------------------------------------------------------------------------------
def select_images(samples: Sequence[data.Sample], split: str, folds: Sequence[data.Fold] | None,
                  data_dir: Path) -> tuple[list[int], dict[int, int]]:
    """Indices of the images to score and, for ``val``, the fold of each."""
    if split == "all":
        return list(range(len(samples))), {}
    if split == "test":
        _, test = data.split_test(samples)
        if not test:
            raise UserError(f"--split test: {data_dir} has no fixed test split (no test/ folder, no "
                            "testing* volume); use --split all, or --split val with --cv_run RUN")
        return test, {}
    if folds is None:
        raise UserError("--split val needs a training run (--cv_run RUN, or a run directory in "
                        "--compare) whose folds say which images were held out")
    fold_of: dict[int, int] = {}
    for k, (_, val) in enumerate(folds):
        for i in val:
            fold_of.setdefault(int(i), k)
    return sorted(fold_of), fold_of


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One model on some images: ``adapter`` None = the base model; ``fold`` for run folds."""

    source: ModelSource
    adapter: Path | None
    fold: int | None
    indices: list[int] = field(default_factory=list)


def plan_jobs(sources: Sequence[ModelSource], indices: Sequence[int], fold_of: Mapping[int, int],
              num_folds: int) -> tuple[list[Job], dict[Path, dict[str, Any]]]:
    """The (model, images) jobs and the config of every adapter involved (read, checked)."""
    jobs: list[Job] = []
    configs: dict[Path, dict[str, Any]] = {}
    for source in sources:
        if source.kind == "run":
            for k, path in enumerate(fold_adapters(source.path, num_folds)):
                configs[path] = lora.read_adapter(path)[0]
                jobs.append(Job(source, path, k, [i for i in indices if fold_of.get(i) == k]))
            continue
        if source.kind == "adapter":
            configs[source.path] = lora.read_adapter(source.path)[0]
            if fold_of:
                log.warning("%s is one adapter scored on every validation fold: it may have been trained "
                            "on some of these images (give the run directory to score each fold's "
                            "adapter on its own fold)", source.path)
        jobs.append(Job(source, source.path, None, list(indices)))
    return jobs, configs


class BaseModels:
    """Builds the base model once per seed (random weights depend on it) and hands out copies."""

    def __init__(self, model_type: str, checkpoint: Path | None, image_size: int, device: torch.device) -> None:
        self.model_type, self.checkpoint, self.image_size, self.device = model_type, checkpoint, image_size, device
        self._cache: dict[int | None, nn.Module] = {}

    @property
    def random_weights(self) -> bool:
        return self.checkpoint is None

    def get(self, seed: int) -> nn.Module:
        """A fresh copy of the base model (random weights drawn after ``torch.manual_seed(seed)``,
        as the trainer does, so an adapter trained on random weights meets the same ones)."""
        key = seed if self.checkpoint is None else None  # loaded weights do not depend on the seed
        if key not in self._cache:
            torch.manual_seed(seed)
            sam = sam_model.build_model(self.model_type, self.checkpoint, self.image_size)
            sam.random_weights = self.random_weights
            self._cache[key] = sam
        return copy.deepcopy(self._cache[key])

    @property
    def sha256(self) -> str | None:
        return None if self.checkpoint is None else self.get(0).checkpoint_sha256


def load_job_model(bases: BaseModels, job: Job, adapter_config: Mapping[str, Any] | None,
                   seed: int) -> nn.Module:
    """The base model, with the job's adapter loaded and merged (for speed), in eval mode."""
    if job.adapter is None:
        return bases.get(seed).to(bases.device).eval()
    adapter_config = adapter_config or {}
    sam = bases.get(int(adapter_config.get("seed", seed)))
    expected = _adapter_sha(adapter_config)
    if expected != sam.checkpoint_sha256:
        have = sam.checkpoint_sha256[:12] + "..." if sam.checkpoint_sha256 else "random weights"
        want = expected[:12] + "..." if expected else "random weights"
        log.warning("%s was trained on base weights %s but the base model here has %s: its scores "
                    "may be meaningless (pass the training's --checkpoint)", job.adapter, want, have)
    lora.load_adapter(job.adapter, sam)
    lora.merge_lora(sam)
    return sam.to(bases.device).eval()


# --------------------------------------------------------------------------------------------
# The detector (--prompt yolo)
# --------------------------------------------------------------------------------------------
@dataclass
class Detector:
    """The YOLO detector of ``--prompt yolo``: each image's boxes are found once and shared by
    every model and the box-only baseline."""

    yolo: Any
    path: Path
    conf: float
    iou: float
    imgsz: int | None
    device: str
    max_det: int = 1000
    found: dict[int, tuple[np.ndarray, np.ndarray, float]] = field(default_factory=dict)
    counts: dict[int, yolo_sam.BoxCounts] = field(default_factory=dict)

    def boxes(self, i: int, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """``(boxes, confidences, seconds)`` of image ``i`` (HxWx3 uint8): Nx4 float32 xyxy pixel
        boxes, N confidences and the detector's time on it."""
        if i not in self.found:
            tick = time.perf_counter()
            boxes, confidences = yolo_sam.yolo_boxes(self.yolo, image, self.conf, self.iou, imgsz=self.imgsz,
                                                     device=self.device, max_det=self.max_det)
            self.found[i] = (boxes, confidences, time.perf_counter() - tick)
        return self.found[i]

    def columns(self, i: int, labels: np.ndarray) -> dict[str, float | int]:
        """Per-image detection columns: the boxes of image ``i`` (found before) matched one to one
        to the HxW ground-truth objects' boxes at IoU > :data:`DETECTION_IOU`."""
        if i not in self.counts:
            self.counts[i] = yolo_sam.match_boxes(yolo_sam.label_boxes(labels), self.found[i][0], DETECTION_IOU)
        scores = self.counts[i].scores()
        return {f"det_{k}": scores[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn")}

    def summary(self, selection: Selection) -> dict[str, Any]:
        """Box precision / recall / F1 with the counts summed over the scored images."""
        total = yolo_sam.BoxCounts()
        for i in selection.indices:
            self.columns(i, selection.samples[i].labels)
            total += self.counts[i]
        return {**self.record(), "n_images": len(selection.indices),
                "aggregate": "pooled: TP, FP, FN summed over the images, then the scores",
                **total.scores()}

    def record(self) -> dict[str, Any]:
        return {"yolo_model": str(self.path), "conf": self.conf, "iou": self.iou, "imgsz": self.imgsz,
                "max_det": self.max_det, "match_iou": DETECTION_IOU}


def load_detector(args: argparse.Namespace, device: torch.device) -> Detector | None:
    """The ``--yolo_model`` detector for ``--prompt yolo`` (None for other prompts); a file that
    is missing or not a YOLO detector is a UserError (from :func:`yolo_sam.load_yolo`)."""
    if args.prompt != "yolo":
        return None
    yolo = yolo_sam.load_yolo(args.yolo_model)
    detector = Detector(yolo, Path(args.yolo_model), args.conf, args.iou, yolo_sam.yolo_imgsz(yolo),
                        yolo_sam.yolo_device(device), args.max_det)
    log.info("detector %s (input %s px, --conf %g, --iou %g)", args.yolo_model, detector.imgsz or "default",
             args.conf, args.iou)
    return detector


def yolo_row_name(source_name: str, n_sources: int) -> str:
    """The rows of a model prompted by the detector: ``yolo+sam``, or ``yolo+NAME`` when
    several models are compared."""
    return YOLO_PREFIX + ("sam" if n_sources == 1 else source_name)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
@dataclass
class Selection:
    """The scored images: ``indices`` into ``samples``, ``fold_of`` (val split) and prompts."""

    samples: list[data.Sample]
    split: str
    indices: list[int]
    fold_of: dict[int, int]
    num_folds: int
    prompts: dict[int, ObjectPrompts]


def check_numbers(args: argparse.Namespace) -> None:
    for flag, value, low in (("--batch_prompts", args.batch_prompts, 1), ("--bootstrap", args.bootstrap, 1),
                             ("--points_per_side", args.points_per_side, 1),
                             ("--max_visualize", args.max_visualize, 0), ("--max_objects", args.max_objects, 0)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    if args.prompt == "yolo":
        if args.yolo_model is None:
            raise UserError("--prompt yolo needs --yolo_model (the best.pt written by `python main.py "
                            "detect train`)")
        for flag, value in (("--conf", args.conf), ("--iou", args.iou)):
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{flag} must be in 0..1, got {value}")
        if args.max_det < 1:
            raise UserError(f"--max_det must be at least 1, got {args.max_det}")
        if args.max_objects:
            raise UserError("--max_objects does not apply to --prompt yolo: the detector looks for every "
                            "object, so every object is scored (leave --max_objects out)")


def data_options(args: argparse.Namespace, run_dirs: Sequence[Path],
                 run_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The data options: the run's (its folds only fit them; --data_dir may move the data), else
    the flags. ``data_dir`` is checked and returned as a Path."""
    options = {k: getattr(args, k) for k in RUN_DATA_OPTIONS}
    where = ""
    if run_config is not None:
        options.update({k: run_config[k] for k in RUN_DATA_OPTIONS if k in run_config})
        if args.data_dir is not None:
            options["data_dir"] = args.data_dir
        else:
            where = f" (from {run_dirs[0] / 'config.json'}; pass --data_dir if the data moved)"
        log.info("data options of the run %s: %s", run_dirs[0],
                 ", ".join(f"{k}={v}" for k, v in options.items()))
    if options["data_dir"] is None:
        raise UserError("--data_dir is required (or --cv_run RUN to evaluate a run on its own data)")
    options["data_dir"] = Path(options["data_dir"]).expanduser()
    if not options["data_dir"].is_dir():
        raise UserError(f"data directory {options['data_dir']} does not exist or is not a directory{where}")
    return options


def run(args: argparse.Namespace) -> int:
    """Evaluate the chosen models on the chosen images; write tables, summary and figures.

    Everything that can be refused (flags, data, adapters, weights, the output directory) is
    checked before the output directory is created, so a refused run leaves no trace; the log
    lines of those checks are replayed into the log file.
    """
    buffer = _Buffer()
    root = logging.getLogger()
    root.addHandler(buffer)
    try:
        started = time.time()
        check_numbers(args)
        sources = parse_sources(args)
        run_dirs = [s.path for s in sources if s.kind == "run"]
        if args.cv_run is not None:
            if not (args.cv_run / data.FOLDS_FILE).is_file():
                raise UserError(f"--cv_run {args.cv_run}: no {data.FOLDS_FILE} there; give the --output_dir "
                                "of a train run")
            run_dirs.insert(0, args.cv_run)
        run_config = read_run_config(run_dirs[0]) if run_dirs else None
        options = data_options(args, run_dirs, run_config)
        split = args.split or ("val" if run_dirs else None)
        if split not in (None, "val") and run_dirs:
            what = "--cv_run" if args.cv_run is not None else "a run directory in --compare"
            raise UserError(f"--split {split} with {what}: a run scores each image with the adapter of the "
                            "fold that held it out, which needs --split val; for another split pass one "
                            "fold's adapter (RUN/fold_0/best.pt) with --model_path and --data_dir")
        protected = [options["data_dir"], *run_dirs]
        check_output_dir(args.output_dir, args.overwrite, protected)
        selection = select_data(args, options, split, run_dirs)
        jobs, adapter_configs = plan_jobs(sources, selection.indices, selection.fold_of, selection.num_folds)
        bases = base_models(args, adapter_configs, run_config)
        detector = load_detector(args, bases.device)
        check_output_dir(args.output_dir, args.overwrite, protected)  # still free after loading?
        prepare_output_dir(args.output_dir)
        root.removeHandler(buffer)
        with log_to_file(args.output_dir / LOG_FILE):
            _replay(buffer.records, args.output_dir / LOG_FILE)
            keep = set(selection.indices if args.max_visualize == 0 else selection.indices[:args.max_visualize]) \
                if args.visualize else set()
            rows, visuals = score_models(args, jobs, adapter_configs, bases, selection, keep, detector)
            if detector is not None:
                rows += score_detector_baseline(selection, detector)
            baselines = BASELINES if args.prompt in ("box", "yolo") else ()
            if baselines:
                rows += score_baselines(selection, baselines)
            else:
                log.info("no box / ellipse baselines: they need box prompts (--prompt box)")
            write_outputs(args, sources, baselines, rows, visuals, selection, bases, options,
                          run_dirs, time.time() - started, detector)
    finally:
        root.removeHandler(buffer)
    return 0


def select_data(args: argparse.Namespace, options: Mapping[str, Any], split: str | None,
                run_dirs: Sequence[Path]) -> Selection:
    """Load the data, pick the split's images and make their prompts (shared by every model)."""
    data_dir = options["data_dir"]
    samples = data.load_dataset(data_dir, options["data_format"], options["patch_size"],
                                patch_overlap=options["patch_overlap"],
                                drop_empty_patches=options["drop_empty_patches"],
                                slice_block=options["slice_block"], nifti_axis=options["nifti_axis"])
    if all(s.num_objects == 0 for s in samples):
        raise UserError(f"{data_dir}: no labelled object in any of its {len(samples)} masks; evaluation "
                        "needs ground truth (check the mask files)")
    folds = None
    for run_dir in run_dirs:
        run_folds = data.load_folds(run_dir / data.FOLDS_FILE, samples)
        if folds is not None and [sorted(v) for _, v in run_folds] != [sorted(v) for _, v in folds]:
            raise UserError(f"the runs {run_dirs[0]} and {run_dir} hold out different folds; compare runs "
                            "made on the same folds (e.g. those of one parameter_search)")
        folds = folds or run_folds
    if split is None:
        split = "test" if data.split_test(samples)[1] else "all"
    indices, fold_of = select_images(samples, split, folds, data_dir)
    data.log_summary([samples[i] for i in indices], slice_block=options["slice_block"])
    if args.prompt != "auto":
        kept = [i for i in indices if samples[i].num_objects > 0]
        if len(kept) < len(indices):
            log.info("%d of %d images have no objects and are skipped (nothing to prompt)",
                     len(indices) - len(kept), len(indices))
        if not kept:
            raise UserError(f"--split {split}: none of the selected images of {data_dir} has a labelled "
                            "object; choose another split")
        indices = kept
    log.info("evaluating %d images (split %s) with %s prompts", len(indices), split, args.prompt)
    prompts = {i: object_prompts(samples[i].labels, samples[i].ignore,
                                 args.max_objects if args.prompt != "auto" else 0,
                                 np.random.default_rng([args.seed, i])) for i in indices}
    return Selection(samples, split, indices, fold_of, len(folds or ()), prompts)


def base_models(args: argparse.Namespace, adapter_configs: Mapping[Path, Mapping[str, Any]],
                run_config: Mapping[str, Any] | None) -> BaseModels:
    """The base model factory: type and size from flags / adapters / run, weights resolved once."""
    model_type, image_size = resolve_model_options(args, adapter_configs, run_config)
    checkpoint_flag = args.checkpoint
    if checkpoint_flag is None and run_config is not None and run_config.get("checkpoint"):
        checkpoint_flag = str(run_config["checkpoint"])
        log.info("base weights from the run's config: --checkpoint %s", checkpoint_flag)
    checkpoint = sam_model.resolve_checkpoint(model_type, checkpoint_flag)
    device = sam_model.resolve_device(args.device)
    sam_model.autocast(device, args.precision)  # rejects fp16 on CPU before any work
    return BaseModels(model_type, checkpoint, image_size, device)


def image_row(selection: Selection, i: int, name: str, kind: str, fold: int | None,
              pred: np.ndarray, seconds: float, prompt: str, n_prompts: int | None = None) -> dict[str, Any]:
    """The per_image.csv row of image ``i`` predicted by ``name`` (``n_prompts``: the number of
    prompts when they are not the image's ground-truth prompts, e.g. detector boxes)."""
    sample, prompts = selection.samples[i], selection.prompts[i]
    fold = fold if fold is not None else selection.fold_of.get(i)
    if n_prompts is None:
        n_prompts = 0 if prompt == "auto" else len(prompts)
    row: dict[str, Any] = {
        "model": name, "kind": kind, "fold": fold, "image": sample.key, "path": str(sample.path),
        "tag": sample.tag, "group": sample.group, "split": sample.split or "",
        "height": sample.labels.shape[0], "width": sample.labels.shape[1], "n_objects": sample.num_objects,
        "n_prompts": n_prompts, "seconds": seconds}
    row.update(score_image(sample.labels, pred, prompts.ignore))
    return row


def score_models(args: argparse.Namespace, jobs: Sequence[Job],
                 adapter_configs: Mapping[Path, Mapping[str, Any]], bases: BaseModels, selection: Selection,
                 keep: set[int], detector: Detector | None = None,
                 ) -> tuple[list[dict[str, Any]], dict[int, dict[str, np.ndarray]]]:
    """Run every job; returns the per-image rows and the predictions of the images in ``keep``.

    With a ``detector`` (``--prompt yolo``) each model is scored twice per image: with the
    ground-truth boxes (its own name) and with the detector's boxes (:func:`yolo_row_name`).
    """
    rows: list[dict[str, Any]] = []
    visuals: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
    n_sources = len({job.source.name for job in jobs})
    prompt = "box" if detector is not None else args.prompt
    for job in jobs:
        sam = load_job_model(bases, job, adapter_configs.get(job.adapter), args.seed)
        generator = automatic_generator(sam, args) if args.prompt == "auto" else None
        label = job.source.name + (f" fold {job.fold}" if job.fold is not None else "")
        yolo_name = yolo_row_name(job.source.name, n_sources)
        for i in tqdm(job.indices, desc=f"evaluate {label}", leave=False, disable=None):
            image = selection.samples[i].image
            tick = time.perf_counter()
            if generator is not None:
                pred = automatic_instances(generator, image, args.precision)
            else:
                pred = predict_instances(sam, image, selection.prompts[i], prompt,
                                         args.batch_prompts, args.precision)
            rows.append(image_row(selection, i, job.source.name, "model", job.fold, pred,
                                  time.perf_counter() - tick, prompt))
            if i in keep:
                visuals[i][job.source.name] = pred
            if detector is None:
                continue
            boxes, confidences, detect_seconds = detector.boxes(i, image)
            tick = time.perf_counter()
            pred = yolo_sam.segment_with_boxes(sam, image, boxes, confidences, batch=args.batch_prompts,
                                               precision=args.precision)
            row = image_row(selection, i, yolo_name, "model", job.fold, pred,
                            detect_seconds + time.perf_counter() - tick, args.prompt, n_prompts=len(boxes))
            rows.append(row | detector.columns(i, selection.samples[i].labels))
            if i in keep:
                visuals[i][yolo_name] = pred
        del sam, generator
    return rows, visuals


def score_detector_baseline(selection: Selection, detector: Detector) -> list[dict[str, Any]]:
    """Rows of the box-only detection masks: each of the detector's boxes filled
    (:func:`yolo_sam.boxes_to_labels`, higher confidence on top), on the selected images."""
    rows = []
    for i in selection.indices:
        sample = selection.samples[i]
        boxes, confidences, detect_seconds = detector.boxes(i, sample.image)
        tick = time.perf_counter()
        pred = yolo_sam.boxes_to_labels(boxes, confidences, sample.labels.shape)
        row = image_row(selection, i, BASELINE_YOLO_BOX, "baseline", None, pred,
                        detect_seconds + time.perf_counter() - tick, "yolo", n_prompts=len(boxes))
        rows.append(row | detector.columns(i, sample.labels))
    return rows


def score_baselines(selection: Selection, names: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of the trivial box / ellipse predictions on the selected images."""
    rows = []
    for name in names:
        for i in selection.indices:
            tick = time.perf_counter()
            pred = baseline_instances(selection.samples[i].labels.shape, selection.prompts[i],
                                      name.split("_", 1)[1])
            rows.append(image_row(selection, i, name, "baseline", None, pred, time.perf_counter() - tick, "box"))
    return rows


@dataclass
class RowSet:
    """The rows of one name in the tables: what made them (``kind`` model or baseline, the
    ``source`` model or shape, the ``prompts`` it was given)."""

    kind: str
    source: str
    prompts: str


def row_sets(prompt: str, sources: Sequence[ModelSource], baselines: Sequence[str],
             detector: Detector | None = None) -> dict[str, RowSet]:
    """Every row name of an evaluation in table order: per model its own rows (and with a
    detector its detector-prompted rows), then the baselines."""
    sets: dict[str, RowSet] = {}
    for source in sources:
        sets[source.name] = RowSet("model", source.spec, "box" if detector is not None else prompt)
        if detector is not None:
            sets[yolo_row_name(source.name, len(sources))] = RowSet(
                "model", source.spec, f"yolo boxes of {detector.path}")
    if detector is not None:
        sets[BASELINE_YOLO_BOX] = RowSet("baseline", f"the boxes of {detector.path} filled",
                                         f"yolo boxes of {detector.path}")
    for name in baselines:
        sets[name] = RowSet("baseline", f"{name.split('_', 1)[1]} from the ground-truth box", "box")
    return sets


def model_summaries(rows: Sequence[Mapping[str, Any]], sets: Mapping[str, RowSet], n_boot: int,
                    seed: int) -> dict[str, dict[str, Any]]:
    """Per row name: kind, source, prompts, number of images, ``per_image_mean`` and ``pooled``."""
    summaries = {}
    for name, info in sets.items():
        mine = [r for r in rows if r["model"] == name]
        summaries[name] = {
            "kind": info.kind,
            "source": info.source,
            "prompts": info.prompts,
            "n_images": len(mine),
            "per_image_mean": summarize_rows(mine, SCORE_COLUMNS, n_boot, seed),
            "pooled": pooled_scores(mine),
        }
    return summaries


def write_outputs(args: argparse.Namespace, sources: Sequence[ModelSource], baselines: Sequence[str],
                  rows: list[dict[str, Any]], visuals: Mapping[int, Mapping[str, np.ndarray]],
                  selection: Selection, bases: BaseModels, options: Mapping[str, Any],
                  run_dirs: Sequence[Path], seconds: float, detector: Detector | None = None) -> None:
    """per_image.csv, per_group.csv, per_fold.csv, config.json, figures, summary.json; the table."""
    out = args.output_dir
    sets = row_sets(args.prompt, sources, baselines, detector)
    baselines = [name for name, info in sets.items() if info.kind == "baseline"]
    model_rank = {name: n for n, name in enumerate(sets)}
    image_rank = {selection.samples[i].key: n for n, i in enumerate(selection.indices)}
    rows.sort(key=lambda r: (model_rank[r["model"]], image_rank[r["image"]]))
    summaries = model_summaries(rows, sets, args.bootstrap, args.seed)
    files = [LOG_FILE, "per_image.csv", "per_group.csv"]
    write_csv(out / "per_image.csv", rows, per_image_columns(rows))
    group_table = group_rows(rows, "tag", args.bootstrap, args.seed)
    write_csv(out / "per_group.csv", group_table, list(group_table[0]))
    fold_table: list[dict[str, Any]] = []
    if selection.fold_of:
        fold_table = group_rows(rows, "fold", args.bootstrap, args.seed, include_all=False)
        write_csv(out / "per_fold.csv", fold_table, list(fold_table[0]))
        files.append("per_fold.csv")
    sha = bases.sha256
    config = EvaluateConfig(
        data={k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
        split=selection.split, prompt=args.prompt, models={s.name: s.spec for s in sources},
        model_type=bases.model_type, image_size=bases.image_size,
        checkpoint=None if bases.checkpoint is None else str(bases.checkpoint), checkpoint_sha256=sha,
        random_weights=bases.random_weights, precision=args.precision, max_objects=args.max_objects,
        batch_prompts=args.batch_prompts, seed=args.seed, bootstrap=args.bootstrap,
        cv_run=str(run_dirs[0]) if run_dirs else None,
        auto={"points_per_side": args.points_per_side, "pred_iou_thresh": args.pred_iou_thresh,
              "stability_score_thresh": args.stability_score_thresh} if args.prompt == "auto" else None,
        detector=detector.record() if detector is not None else None)
    _atomic_write(out / "config.json", json.dumps(config.to_json(), indent=1) + "\n")
    files.append("config.json")
    files += write_figures(args, out, selection.samples, visuals, rows, summaries, group_table, fold_table,
                           bases.random_weights, baselines, len(sources) > 1 or bool(args.compare))
    files.append("summary.json")
    summary = {
        "format": OUTPUT_FORMAT, "version": 1,
        "prompt": args.prompt, "split": selection.split, "n_images": len(selection.indices),
        "random_weights": bases.random_weights, "model_type": bases.model_type,
        "image_size": bases.image_size, "checkpoint_sha256": sha, "data_dir": str(options["data_dir"]),
        "cv_run": config.cv_run,
        "aggregates": {
            "per_image_mean": "mean over images of per-image scores; std (ddof=1) and a 95 % percentile "
                              f"bootstrap interval of the mean ({args.bootstrap} resamples, seed {args.seed})",
            "pooled": "counts summed over all images, then one score (AJI: summed intersections / summed "
                      "unions; PQ, F1: summed TP, FP, FN)"},
        "overlaps": "a pixel covered by several predicted masks goes to the higher predicted IoU "
                    "(baselines: to the smaller shape)",
        "models": summaries,
        "per_fold": fold_summary(fold_table) if fold_table else None,
        "detection": detector.summary(selection) if detector is not None else None,
        "files": files,
        "seconds": round(seconds, 2),
    }
    _atomic_write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    if bases.random_weights:
        log.warning("RANDOM WEIGHTS: these scores measure nothing (--checkpoint none)")
    for line in format_table(summaries):
        log.info("%s", line)
    log.info("mean = mean of per-image scores; pooled = counts summed over images first")
    if detector is not None:
        det = summary["detection"]
        log.info("detector boxes at IoU > %.2f: precision %.3f, recall %.3f, F1 %.3f (%d TP, %d FP, %d FN; "
                 "pooled over %d images, --conf %g)", DETECTION_IOU, det["precision"], det["recall"], det["f1"],
                 det["tp"], det["fp"], det["fn"], det["n_images"], detector.conf)
    log.info("wrote %d files to %s (summary.json, per_image.csv, per_group.csv%s)", len(files), out,
             ", per_fold.csv" if fold_table else "")


def fold_summary(fold_table: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{model: {fold: {n_images, <metric>_mean, <metric>_pooled}}}`` of Dice, IoU, AJI and PQ."""
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for row in fold_table:
        out[row["model"]][str(row["fold"])] = {"n_images": row["n_images"], **{
            f"{k}_{agg}": row[f"{k}_{agg}"] for k in ("dice", "iou", "aji", "pq") for agg in ("mean", "pooled")}}
    return dict(out)


def _figure_name(key: str) -> str:
    """A file name for a sample key: extensions dropped, odd characters replaced."""
    return _safe_name(re.sub(r"\.(png|tiff?|jpe?g|bmp|nii\.gz|nii)\b", "", key, flags=re.IGNORECASE))


def write_figures(args: argparse.Namespace, out: Path, samples: Sequence[data.Sample],
                  visuals: Mapping[int, Mapping[str, np.ndarray]], rows: Sequence[Mapping[str, Any]],
                  summaries: Mapping[str, Mapping[str, Any]], group_table: Sequence[Mapping[str, Any]],
                  fold_table: Sequence[Mapping[str, Any]], random_weights: bool,
                  baselines: Sequence[str], compare: bool) -> list[str]:
    """The PNGs asked for; returns their paths relative to ``out``."""
    written: list[Path] = []
    note = f"{args.prompt} prompts"
    dice_of = {(r["model"], r["image"]): r["dice"] for r in rows}
    for number, (i, preds) in enumerate(sorted(visuals.items())):
        sample = samples[i]
        panels = [figures.Panel("image"), figures.Panel(f"ground truth ({sample.num_objects} objects)", sample.labels)]
        for name, pred in preds.items():
            n_pred = int(np.count_nonzero(np.unique(pred)))
            panels.append(figures.Panel(f"{name}: Dice {dice_of[(name, sample.key)]:.3f} ({n_pred} objects)", pred))
        path = out / "visualizations" / f"{number:03d}_{_figure_name(sample.key)}.png"
        written.append(figures.save_side_by_side(path, sample.image, panels, f"{sample.key} - {note}",
                                                 random_weights))
    if args.plot:
        for table, by in ((group_table, "tag"), (fold_table, "fold")):
            if not table:
                continue
            cells: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
            for row in table:
                name = f"fold {row[by]}" if by == "fold" else str(row[by])
                cells[name][row["model"]] = {"mean": row["dice_mean"], "ci_low": row["dice_ci_low"],
                                             "ci_high": row["dice_ci_high"], "n": row["n_images"]}
            written.append(figures.save_grouped_bars(
                out / "plots" / f"dice_by_{by}.png", cells, "Dice, per-image mean (95 % CI)",
                f"Dice per {by} - {note}", random_weights, baselines))
        per_model = {name: [r["dice"] for r in rows if r["model"] == name] for name in summaries}
        written.append(figures.save_box_plot(out / "plots" / "dice_boxplot.png", per_model, "per-image Dice",
                                             f"per-image Dice - {note}", random_weights, baselines))
    if compare or args.plot:
        table = {name: {k: s["per_image_mean"][k] for k in FIGURE_METRICS} for name, s in summaries.items()}
        n_images = len({r["image"] for r in rows})
        written.append(figures.save_metric_bars(out / "comparison.png", table, FIGURE_METRICS,
                                                f"models compared - {note}, {n_images} images",
                                                random_weights, baselines))
    return [p.relative_to(out).as_posix() for p in written]
