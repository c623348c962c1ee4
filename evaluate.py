"""``python main.py evaluate``: score the base model, LoRA adapters and trivial baselines.

Which models (``--model_path``, ``--compare NAME=SOURCE ...``, ``--cv_run``): ``base`` (zero-shot),
an adapter file written by ``train``, or a training run directory, whose every image of ``--split
val`` is scored by the adapter of the fold that held it out. Every model sees the same images and
prompts; adapters.py decides ``--model_type`` / ``--image_size`` and the base weights.

Which images (``--split``): ``test`` (the data's fixed test split), ``val`` (a run's validation
folds) or ``all``. The default never scores images a model trained on: ``val`` with a run; with
adapters, the fixed test split when the data has one, else the images none of them trained on
(their runs' folds.json say which: its fold's validation part, never its training, inner-selection
or fold-gap sections); else ``test`` or ``all``. Images an adapter trained on are
scored only with ``--include_training_images``, and those rows are marked (``seen_in_training``).
With box or point prompts, images without objects are skipped (every model would score 1 there).

Prompts (``--prompt``, prompts.py): one exact box or one interior point per ground-truth object
(``--max_objects N``: a seeded subset, the other objects' pixels ignored); ``auto``: SAM's
automatic mask generator; ``yolo``: a detector's boxes (``detect train``), beside the same model
with ground-truth boxes (what a perfect detector would reach) and the detector's boxes filled
(``baseline_yolo_box``), with the detector's box precision / recall / F1 at IoU > 0.5.

Baselines (box prompts): ``baseline_box`` (the prompt box filled) and ``baseline_ellipse`` (its
inscribed ellipse), scored alike: a box-prompted score means little until it is set beside them.
Masks become one instance map by instances.py's rule (overlaps to the higher predicted IoU); the
metrics (metrics.py) leave ``Sample.ignore`` out; reports.py writes ``per_image.csv``,
``per_group.csv``, ``per_fold.csv``, ``summary.json``, ``config.json`` and the figures, and for
consecutive sections of a volume ``per_volume.csv``: voxel Dice / IoU and 3-D instance scores,
beside the ground truth's own per-section objects linked alike (the ceiling the linking sets).
"""
from __future__ import annotations

import argparse
import logging
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from samlora.core import runfiles
from samlora.core.errors import UserError
from samlora.data import dataset as data
from samlora.data import folds as folds_lib
from samlora.data.instances import box_baseline
from samlora.data.prompts import EVAL_PROMPTS, box_prompts
from samlora.evaluation import reports
from samlora.evaluation.heldout import Selection, data_options, select_data
from samlora.inference import segmenter
from samlora.inference.linking import LinkOptions, add_link_arguments
from samlora.inference.yolo import BoxCounts, Detector, DetectorOptions, load_detector
from samlora.models import adapters
from samlora.models import sam as sam_model
from samlora.training import runs

log = logging.getLogger(__name__)

PROMPTS = (*EVAL_PROMPTS, "auto", "yolo")
SPLITS = ("test", "val", "all")
BASELINES = ("baseline_box", "baseline_ellipse")
BASELINE_YOLO_BOX = "baseline_yolo_box"  # --prompt yolo: the detector's boxes filled
NATIVE_BASE = "base@1024"  # the base model at SAM's own input size, beside an adapter's
YOLO_PREFIX = "yolo+"  # --prompt yolo: rows of a model prompted by the detector's boxes
LOG_FILE = "evaluate.log"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``evaluate`` subcommand."""
    parser = subparsers.add_parser(
        "evaluate", help="score the base model, adapters and trivial baselines on labelled data",
        description="Score SAM / MobileSAM zero-shot, LoRA adapters or a cross-validated run on "
                    "labelled images with box / point / automatic prompts, beside the trivial "
                    "box and ellipse baselines. Example: python main.py evaluate --data_dir data/em "
                    "--compare base=base lora=runs/train/fold_0/best.pt --plot --visualize",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data.add_data_arguments(parser, required=False, data_dir_help="; default with --cv_run: the run's")
    sam_model.add_model_arguments(parser, from_adapter=True)
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
    ev.add_argument("--include_training_images", action="store_true",
                    help="allow images an adapter was trained on (their rows are marked seen_in_training "
                         "and every table and figure says so)")
    ev.add_argument("--prompt", choices=PROMPTS, default="box",
                    help="box = ground-truth box per object, point = one interior point per object, "
                         "auto = SAM's automatic mask generator (no ground truth used), yolo = the "
                         "boxes of a YOLO detector (--yolo_model), beside ground-truth boxes")
    ev.add_argument("--max_objects", type=int, default=0,
                    help="prompt at most this many objects per image (a seeded random subset; the pixels of "
                         "the others are ignored by the metrics); 0 = all")
    ev.add_argument("--batch_prompts", type=int, default=None,
                    help="prompts per decoder call (also the automatic generator's points per batch); default: "
                         "1 on a CPU, where fewer per call cost less each, 64 on a GPU")
    ev.add_argument("--output_dir", type=Path, default=Path("runs/evaluate"),
                    help="where the tables, summary.json, log and figures go")
    ev.add_argument("--overwrite", action="store_true",
                    help="write into a non-empty --output_dir (replaces a previous evaluation's files)")
    ev.add_argument("--seed", type=int, default=0,
                    help="seed for --max_objects subsets, bootstrap intervals and random base weights")
    ev.add_argument("--bootstrap", type=int, default=2000,
                    help="bootstrap resamples for the 95 %% intervals (each resamples whole fold groups: source "
                         "images, --group_by ids, blocks of --slice_block sections)")
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
    add_link_arguments(parser.add_argument_group(
        "volumes (per_volume.csv): how per-section predictions, and the ground truth's per-section objects, "
        "are linked into 3-D objects"))
    fig = parser.add_argument_group("figures")
    fig.add_argument("--visualize", action="store_true",
                     help="per image: image | ground truth | prediction of each model (contours)")
    fig.add_argument("--max_visualize", type=int, default=20,
                     help="at most this many images get a --visualize figure (0 = all)")
    fig.add_argument("--plot", action="store_true",
                     help="bar charts per tag (and per fold) and a box plot of per-image Dice")
    parser.set_defaults(func=run)
    return parser


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse impossible numbers and conflicting flags before anything is read."""
    batch = 1 if args.batch_prompts is None else args.batch_prompts  # None: the device's default
    for flag, value, low in (("--batch_prompts", batch, 1), ("--bootstrap", args.bootstrap, 1),
                             ("--points_per_side", args.points_per_side, 1),
                             ("--max_visualize", args.max_visualize, 0), ("--max_objects", args.max_objects, 0)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    if args.prompt == "yolo":
        if args.yolo_model is None:
            raise UserError("--prompt yolo needs --yolo_model (the best.pt written by `python main.py "
                            "detect train`)")
        DetectorOptions(args.conf, args.iou, None, args.max_det)  # refuses bad values
        if args.max_objects:
            raise UserError("--max_objects does not apply to --prompt yolo: the detector looks for every "
                            "object, so every object is scored (leave --max_objects out)")


# --------------------------------------------------------------------------------------------
# Which models
# --------------------------------------------------------------------------------------------
def parse_sources(args: argparse.Namespace) -> list[runs.ModelSource]:
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
        if name == reports.GROUND_TRUTH_LINKED:
            raise UserError(f"model name {name!r} is reserved for the row of the linked ground truth (per_volume.csv)")
        if name.startswith(YOLO_PREFIX):
            raise UserError(f"model name {name!r}: names starting with {YOLO_PREFIX!r} are reserved for "
                            "the detector-prompted rows of --prompt yolo")
        seen.add(name)
        sources.append(runs.model_source(name, spec))
    return sources


@dataclass
class Job:
    """One model on some images: ``adapter`` None = the base model; ``fold`` for run folds."""

    source: runs.ModelSource
    adapter: Path | None
    fold: int | None
    indices: list[int] = field(default_factory=list)
    bases: adapters.BaseModels | None = None  # another base model (base@1024) than the run's


def plan_jobs(sources: Sequence[runs.ModelSource], indices: Sequence[int], fold_of: Mapping[int, int],
              num_folds: int) -> tuple[list[Job], dict[Path, dict[str, Any]]]:
    """The (model, images) jobs and the config of every adapter involved (read, checked)."""
    jobs: list[Job] = []
    configs: dict[Path, dict[str, Any]] = {}
    for source in sources:
        if source.kind == "run":
            for k, path in enumerate(runs.fold_adapters(source.path, num_folds)):
                configs[path] = adapters.read_adapter(path)[0]
                jobs.append(Job(source, path, k, [i for i in indices if fold_of.get(i) == k]))
            continue
        if source.kind == "adapter":
            configs[source.path] = adapters.read_adapter(source.path)[0]
        jobs.append(Job(source, source.path, None, list(indices)))
    return jobs, configs


def base_models(args: argparse.Namespace, adapter_configs: Mapping[Path, Mapping[str, Any]],
                run_config: Mapping[str, Any] | None) -> adapters.BaseModels:
    """The base model factory: type and size from flags / adapters / run, weights resolved once."""
    checkpoint = args.checkpoint
    if checkpoint is None and run_config is not None and run_config.get("checkpoint"):
        checkpoint = str(run_config["checkpoint"])
        log.info("base weights from the run's config: --checkpoint %s", checkpoint)
    bases = adapters.bases_from_flags(args.model_type, args.image_size, checkpoint, args.device,
                                      adapter_configs, run_config)
    sam_model.autocast(bases.device, args.precision)  # rejects fp16 on CPU before any work
    return bases


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------
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
        "tag": sample.tag, "group": selection.grouping.group(sample), "split": sample.split or "",
        "height": sample.labels.shape[0], "width": sample.labels.shape[1], "n_objects": sample.num_objects,
        "n_prompts": n_prompts, "seconds": seconds}
    row.update(reports.score_image(sample.labels, pred, prompts.ignore))
    return row


def seen_mark(selection: Selection, job: Job, i: int) -> str:
    """``yes`` / ``no`` / ``unknown``: whether the job's adapter was trained on image ``i``."""
    if job.adapter is None or job.fold is not None:  # the base model, or a run fold on its own held-out fold
        return "no"
    trained = selection.seen.get(job.adapter)
    if trained is None:
        return "no" if selection.split in ("test", "held-out") else "unknown"
    return "yes" if i in trained else "no"


def detection_columns(detector: Detector, i: int, labels: np.ndarray) -> dict[str, float | int]:
    """Per-image detection columns: image ``i``'s boxes matched to the ground-truth objects."""
    scores = detector.counts_of(i, labels).scores()
    return {f"det_{k}": scores[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn")}


def yolo_row_name(source_name: str, n_sources: int) -> str:
    """The rows of a model prompted by the detector: ``yolo+sam``, or ``yolo+NAME`` when
    several models are compared."""
    return YOLO_PREFIX + ("sam" if n_sources == 1 else source_name)


def score_job(args: argparse.Namespace, job: Job, bases: adapters.BaseModels, selection: Selection,
              keep: set[int], detector: Detector | None, n_sources: int, volumes: reports.VolumeScores
              ) -> tuple[list[dict[str, Any]], dict[int, dict[str, np.ndarray]]]:
    """One model on its images: the per-image rows and the predictions of the images in ``keep``.

    With a ``detector`` (``--prompt yolo``) the model is scored twice per image: with the
    ground-truth boxes (its own name) and with the detector's boxes (:func:`yolo_row_name`).
    """
    rows: list[dict[str, Any]] = []
    visuals: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
    sam = adapters.load_finetuned(job.bases or bases, job.adapter, args.seed)
    chunk = args.batch_prompts or segmenter.default_chunk(bases.device)
    generator = segmenter.automatic_generator(sam, args.points_per_side, args.batch_prompts or 64, args.pred_iou_thresh,
                                              args.stability_score_thresh) if args.prompt == "auto" else None
    prompt = "box" if detector is not None else args.prompt
    label = job.source.name + (f" fold {job.fold}" if job.fold is not None else "")
    named = [(job.source.name, None)] + ([(yolo_row_name(job.source.name, n_sources), detector)] if detector else [])
    for i in tqdm(job.indices, desc=f"evaluate {label}", leave=False, disable=None):
        image = selection.samples[i].image
        embedding, encode_seconds = shared_embedding(sam, image, args.precision, detector is not None)
        for name, boxes_from in named:
            tick, n_prompts, extra = time.perf_counter() - encode_seconds, None, {}  # each row counts the encoder
            if generator is not None:
                found = segmenter.automatic_instances(generator, image, args.precision)
                pred = segmenter.paint_instances(found, image.shape[:2])[0]
            elif boxes_from is None:
                pred = segmenter.segment(sam, image, selection.prompts[i], chunk, args.precision,
                                         embedding=embedding)
            else:
                boxes, confidences, detect_seconds = boxes_from.boxes_of(i, image)
                tick -= detect_seconds
                pred = segmenter.segment(sam, image, box_prompts(boxes), chunk, args.precision,
                                         keep_ids=False, confidences=confidences, embedding=embedding)
                n_prompts, extra = len(boxes), detection_columns(boxes_from, i, selection.samples[i].labels)
            row = image_row(selection, i, name, "model", job.fold, pred, time.perf_counter() - tick,
                            prompt if boxes_from is None else args.prompt, n_prompts)
            rows.append(row | extra | {"seen_in_training": seen_mark(selection, job, i)})
            volumes.add(name, i, pred)
            if i in keep:
                visuals[i][name] = pred
    return rows, visuals


def shared_embedding(sam: nn.Module, image: np.ndarray, precision: str,
                     shared: bool) -> tuple[torch.Tensor | None, float]:
    """``(embedding, seconds)``: with ``shared`` (ground-truth and detector boxes on one image)
    the image is encoded once for both; else (None, 0) and each segmentation encodes it."""
    if not shared:
        return None, 0.0
    tick = time.perf_counter()
    with sam_model.autocast(segmenter.sam_device(sam), precision):
        embedding = segmenter.encode_image(sam, image)
    return embedding, time.perf_counter() - tick


def score_baselines(selection: Selection, names: Sequence[str], volumes: reports.VolumeScores,
                    detector: Detector | None = None) -> list[dict[str, Any]]:
    """Rows of the trivial predictions on the selected images: the ground-truth boxes filled or
    their inscribed ellipses, and with a ``detector`` its boxes filled."""
    rows = []
    for i in selection.indices if detector is not None else ():
        sample = selection.samples[i]
        boxes, _, detect_seconds = detector.boxes_of(i, sample.image)
        tick = time.perf_counter()
        pred = box_baseline(boxes, sample.labels.shape)
        row = image_row(selection, i, BASELINE_YOLO_BOX, "baseline", None, pred,
                        detect_seconds + time.perf_counter() - tick, "yolo", n_prompts=len(boxes))
        rows.append(row | detection_columns(detector, i, sample.labels) | {"seen_in_training": "no"})
        volumes.add(BASELINE_YOLO_BOX, i, pred)
    for name in names:
        for i in selection.indices:
            tick, prompts = time.perf_counter(), selection.prompts[i]
            pred = box_baseline(prompts.boxes, selection.samples[i].labels.shape, name.split("_", 1)[1],
                                prompts.object_ids)
            row = image_row(selection, i, name, "baseline", None, pred, time.perf_counter() - tick, "box")
            rows.append(row | {"seen_in_training": "no"})
            volumes.add(name, i, pred)
    return rows


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def row_sets(prompt: str, sources: Sequence[runs.ModelSource], baselines: Sequence[str],
             detector: Detector | None = None) -> dict[str, reports.RowSet]:
    """Every row name of an evaluation in table order: per model its own rows (and with a
    detector its detector-prompted rows), then the baselines."""
    sets: dict[str, reports.RowSet] = {}
    for source in sources:
        sets[source.name] = reports.RowSet("model", source.spec, "box" if detector is not None else prompt)
        if detector is not None:
            sets[yolo_row_name(source.name, len(sources))] = reports.RowSet(
                "model", source.spec, f"yolo boxes of {detector.path}")
    if detector is not None:
        sets[BASELINE_YOLO_BOX] = reports.RowSet("baseline", f"the boxes of {detector.path} filled",
                                                 f"yolo boxes of {detector.path}")
    for name in baselines:
        sets[name] = reports.RowSet("baseline", f"{name.split('_', 1)[1]} from the ground-truth box", "box")
    return sets


def detection_summary(detector: Detector, selection: Selection) -> dict[str, Any]:
    """Box precision / recall / F1 with the counts summed over the scored images."""
    total = BoxCounts()
    for i in selection.indices:
        total += detector.counts_of(i, selection.samples[i].labels)
    return {**detector.record(), "n_images": len(selection.indices),
            "aggregate": "pooled: TP, FP, FN summed over the images, then the scores", **total.scores()}


def make_config(args: argparse.Namespace, sources: Sequence[runs.ModelSource], selection: Selection,
                bases: adapters.BaseModels, options: Mapping[str, Any], run_dirs: Sequence[Path],
                detector: Detector | None, link: LinkOptions) -> reports.EvaluateConfig:
    """The record of this evaluation (config.json)."""
    return reports.EvaluateConfig(
        data=runfiles.plain_record(options),
        split=selection.split, prompt=args.prompt, models={s.name: s.spec for s in sources},
        model_type=bases.model_type, image_size=bases.image_size,
        checkpoint=None if bases.checkpoint is None else str(bases.checkpoint), checkpoint_sha256=bases.sha256,
        random_weights=bases.random_weights, precision=args.precision, max_objects=args.max_objects,
        batch_prompts=args.batch_prompts, seed=args.seed, bootstrap=args.bootstrap,
        cv_run=str(run_dirs[0]) if run_dirs else None,
        auto={"points_per_side": args.points_per_side, "pred_iou_thresh": args.pred_iou_thresh,
              "stability_score_thresh": args.stability_score_thresh} if args.prompt == "auto" else None,
        detector=detector.record() if detector is not None else None, plot=args.plot,
        protocol=segmenter.PROTOCOLS[args.prompt],
        compare=len(sources) > 1 or bool(args.compare), link=asdict(link))



# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def native_base(sources: list[runs.ModelSource], jobs: list[Job], bases: adapters.BaseModels,
                indices: Sequence[int]) -> tuple[list[runs.ModelSource], list[Job]]:
    """With the base model scored at another input size than SAM's own 1024 px (an adapter's),
    also score it at 1024 px (``base@1024``), so a fine-tuned model gets no credit for repairing
    the resized position embeddings."""
    if bases.image_size == 1024 or not any(s.kind == "base" for s in sources) or \
            not any(s.kind != "base" for s in sources):
        return sources, jobs
    native = adapters.BaseModels(bases.model_type, bases.checkpoint, 1024, bases.device)
    source = runs.ModelSource(NATIVE_BASE, "base")
    log.info("the base model is also scored at its native 1024 px as %s", NATIVE_BASE)
    at = next(k for k, s in enumerate(sources) if s.kind == "base") + 1
    return sources[:at] + [source] + sources[at:], jobs + [Job(source, None, None, list(indices), native)]


def plan(args: argparse.Namespace) -> tuple[list[runs.ModelSource], list[Path], dict[str, Any] | None]:
    """The model sources, the training runs among the inputs and the first run's config."""
    check_numbers(args)
    sources = parse_sources(args)
    run_dirs = [s.path for s in sources if s.kind == "run"]
    if args.cv_run is not None:
        if not runs.is_run(args.cv_run):
            raise UserError(f"--cv_run {args.cv_run}: no {folds_lib.FOLDS_FILE} there; give the --output_dir "
                            "of a train run")
        run_dirs.insert(0, args.cv_run)
    split = args.split
    if split not in (None, "val") and run_dirs:
        what = "--cv_run" if args.cv_run is not None else "a run directory in --compare"
        raise UserError(f"--split {split} with {what}: a run scores each image with the adapter of the "
                        "fold that held it out, which needs --split val; for another split pass one "
                        "fold's adapter (RUN/fold_0/best.pt) with --model_path and --data_dir")
    return sources, run_dirs, runs.read_run_config(run_dirs[0]) if run_dirs else None


def run(args: argparse.Namespace) -> int:
    """Evaluate the chosen models on the chosen images; write tables, summary and figures.

    Everything that can be refused (flags, data, adapters, weights, the output directory) is
    checked before the output directory is created, so a refused run leaves no trace; the log
    lines of those checks are replayed into the log file.
    """
    started = time.time()
    with runfiles.LogBuffer() as buffer:
        sources, run_dirs, run_config = plan(args)
        direct = {s.path: adapters.read_adapter(s.path)[0] for s in sources if s.kind == "adapter"}
        adapters.resolve_model_options(args.model_type, args.image_size, direct, run_config)  # refuse a mismatch first
        options = data_options(args, run_dirs, run_config)
        link = LinkOptions(args.link_iou, args.link_gap, args.min_sections, args.link_merge)
        out = runfiles.OutputDir(args.output_dir, "evaluate")
        protected = [options["data_dir"], *run_dirs]
        out.check(args.overwrite, protected=protected)
        selection = select_data(args, options, args.split or ("val" if run_dirs else None), run_dirs, sources)
        jobs, adapter_configs = plan_jobs(sources, selection.indices, selection.fold_of, selection.num_folds)
        bases = base_models(args, adapter_configs, run_config)
        sources, jobs = native_base(sources, jobs, bases, selection.indices)
        detector = None
        if args.prompt == "yolo":
            detector = load_detector(args.yolo_model, DetectorOptions(args.conf, args.iou, None, args.max_det),
                                     bases.device)
        out.claim(args.overwrite, protected=protected)
    with out.active(LOG_FILE, replay=buffer.records):
        keep = set(selection.indices if args.max_visualize == 0 else selection.indices[:args.max_visualize]) \
            if args.visualize else set()
        rows: list[dict[str, Any]] = []
        visuals: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
        # 3-D scores of volume sections (not of --max_objects subsets: each section prompts other objects)
        volumes = reports.VolumeScores(selection.samples, [] if args.max_objects else selection.indices, link)
        for job in jobs:
            job_rows, job_visuals = score_job(args, job, bases, selection, keep, detector, len(sources), volumes)
            rows += job_rows
            for i, preds in job_visuals.items():
                visuals[i].update(preds)
        baselines = BASELINES if args.prompt in ("box", "yolo") else ()
        if not baselines:
            log.info("no box / ellipse baselines: they need box prompts (--prompt box)")
        rows += score_baselines(selection, baselines, volumes, detector)
        config = make_config(args, sources, selection, bases, options, run_dirs, detector, link)
        sets = row_sets(args.prompt, sources, baselines, detector)
        reports.write_evaluation(args.output_dir, reports.Evaluation(
            config, rows, sets, selection.samples, selection.indices, bool(selection.fold_of), visuals,
            detection_summary(detector, selection) if detector else None, time.time() - started, volumes.rows(list(sets)),
            selection.grouping.unit()))
    return 0
