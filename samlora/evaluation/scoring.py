"""The evaluation service: each model and trivial baseline scored on the selected images, written as tables.

A :class:`Job` is one model on some images (a run's folds: each fold's adapter on its own
held-out images); every model sees the same images and prompts (heldout.Selection). With
``prompt="yolo"`` a model is scored twice per image, with the ground-truth boxes and with the
detector's (``yolo+NAME`` rows), beside the detector's boxes filled; with box prompts beside the
prompt box filled and its inscribed ellipse; in automatic modes (amg, ais, apg; modes.py) once
per mode, each row timed on its own (encoder included). Masks become one instance map by the predicted IoU;
reports.py writes the tables, summary and figures. ``evaluate`` (the command) builds
:class:`ScoreOptions` from its flags and calls :func:`score_all`.
"""
from __future__ import annotations

import logging
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
from samlora.core.errors import OptionError
from samlora.data.instances import box_baseline
from samlora.data.prompts import box_prompts
from samlora.evaluation import modes as automatic_modes
from samlora.evaluation import reports
from samlora.evaluation.heldout import AUTOMATIC_MODES, Selection, SelectOptions
from samlora.inference import automatic, segmenter
from samlora.inference.instance_watershed import WatershedOptions
from samlora.inference.linking import LinkOptions
from samlora.inference.yolo import BoxCounts, Detector
from samlora.models import adapters, model_options
from samlora.models import sam as sam_model
from samlora.training import runs

log = logging.getLogger(__name__)

BASELINES = ("baseline_box", "baseline_ellipse")
BASELINE_YOLO_BOX = "baseline_yolo_box"  # prompt yolo: the detector's boxes filled
NATIVE_BASE = "base@1024"  # the base model at SAM's own input size, beside an adapter's
YOLO_PREFIX = "yolo+"  # prompt yolo: rows of a model prompted by the detector's boxes


@dataclass
class ScoreOptions(SelectOptions):
    """How the models are scored (``evaluate``'s options of the same names), beside how the images
    are chosen (:class:`SelectOptions`).

    ``batch_prompts``: prompts per decoder call (None: the device's default); ``bootstrap``:
    resamples of the 95 % intervals; ``points_per_side``: the automatic mask generator's (mode
    amg); ``pred_iou_thresh``, ``stability_score_thresh``: its mask filters and APG's (None: each
    mode's default, segmenter.MASK_FILTERS);
    ``visualize`` / ``max_visualize`` (0 = all) / ``plot``: the figures; ``compare``: the models
    were given as a comparison (one table and figure for all); ``link``: how a volume's sections
    are linked into 3-D objects (per_volume.csv).
    """

    batch_prompts: int | None = None
    precision: str = model_options.ModelOptions.precision
    bootstrap: int = 2000
    points_per_side: int = 32
    pred_iou_thresh: float | None = None
    stability_score_thresh: float | None = None
    visualize: bool = False
    max_visualize: int = 20
    plot: bool = False
    compare: bool = False
    link: LinkOptions = field(default_factory=LinkOptions)

    def __post_init__(self) -> None:
        super().__post_init__()
        batch = 1 if self.batch_prompts is None else self.batch_prompts  # None: the device's default
        for name, value, low in (("batch_prompts", batch, 1), ("bootstrap", self.bootstrap, 1),
                                 ("points_per_side", self.points_per_side, 1),
                                 ("max_visualize", self.max_visualize, 0), ("max_objects", self.max_objects, 0)):
            if value < low:
                raise OptionError(f"{{{name}}} must be at least {low}, got {value}")


@dataclass
class Job:
    """One model on some images: ``adapter`` None = the base model; ``fold`` for run folds."""

    source: runs.ModelSource
    adapter: Path | None
    fold: int | None
    indices: list[int] = field(default_factory=list)
    bases: adapters.BaseModels | None = None  # another base model (base@1024) than the run's
    modes: tuple[str, ...] = ()  # automatic modes: those this model runs (assign_modes)
    watershed: WatershedOptions = field(default_factory=WatershedOptions)  # modes ais / apg: the adapter's


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


def assign_modes(options: ScoreOptions, jobs: Sequence[Job], bases: adapters.BaseModels) -> None:
    """Each job's automatic modes (modes.model_modes: ais / apg only on a model that carries an
    instance decoder, its adapter's or a combined base checkpoint's) and its adapter's watershed
    thresholds. A model left with no mode is refused (:class:`OptionError`), before any work."""
    if not options.automatic:
        return
    needs_decoder = any(m in automatic_modes.DECODER_MODES for m in options.modes)
    for job in jobs:
        if job.adapter is not None:
            config, state = adapters.read_adapter(job.adapter)
            job.watershed = automatic_modes.watershed_of(config, job.adapter)
            has = adapters.has_decoder(state)
        else:
            has = False
        if needs_decoder and not has:  # a combined --checkpoint (model_state + decoder_state) may carry one
            has = (job.bases or bases).carries_decoder()
        what = f"model {job.source.name!r} ({job.adapter or 'the base model'})"
        job.modes = automatic_modes.model_modes(options.modes, has, what)
    for source in {job.source.name for job in jobs}:
        kinds = {job.modes for job in jobs if job.source.name == source}
        if len(kinds) > 1:
            raise OptionError(f"model {source!r}: some of its fold adapters hold an instance decoder and others do "
                              "not; retrain the run with or without --instance_decoder throughout")
    for job in jobs:
        skipped = [m for m in options.modes if m not in job.modes]
        if skipped and job.fold in (None, 0):
            log.info("%s has no instance decoder: scored in %s only, not %s", job.source.name, ", ".join(job.modes),
                     ", ".join(skipped))


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
        n_prompts = 0 if prompt in AUTOMATIC_MODES else len(prompts)
    row: dict[str, Any] = {
        "model": name, "kind": kind, "mode": prompt, "fold": fold, "image": sample.key, "path": str(sample.path),
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


def score_job(options: ScoreOptions, job: Job, bases: adapters.BaseModels, selection: Selection,
              keep: set[int], detector: Detector | None, n_sources: int, volumes: reports.VolumeScores
              ) -> tuple[list[dict[str, Any]], dict[int, dict[str, np.ndarray]]]:
    """One model on its images: the per-image rows and the predictions of the images in ``keep``.

    With a ``detector`` (``prompt="yolo"``) the model is scored twice per image: with the
    ground-truth boxes (its own name) and with the detector's boxes (:func:`yolo_row_name`).
    """
    sam = adapters.load_finetuned(job.bases or bases, job.adapter, options.seed)
    if options.automatic:
        return score_automatic(options, job, sam, selection, keep, volumes)
    rows: list[dict[str, Any]] = []
    visuals: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
    chunk = options.batch_prompts or segmenter.default_chunk(bases.device)
    prompt = "box" if detector is not None else options.prompt
    precision = options.precision
    label = job.source.name + (f" fold {job.fold}" if job.fold is not None else "")
    named = [(job.source.name, None)] + ([(yolo_row_name(job.source.name, n_sources), detector)] if detector else [])
    for i in tqdm(job.indices, desc=f"evaluate {label}", leave=False, disable=None):
        image = selection.samples[i].image
        embedding, encode_seconds = shared_embedding(sam, image, precision, detector is not None)
        for name, boxes_from in named:
            tick, n_prompts, extra = time.perf_counter() - encode_seconds, None, {}  # each row counts the encoder
            if boxes_from is None:
                pred = segmenter.segment(sam, image, selection.prompts[i], chunk, precision,
                                         embedding=embedding)
            else:
                boxes, confidences, detect_seconds = boxes_from.boxes_of(i, image)
                tick -= detect_seconds
                pred = segmenter.segment(sam, image, box_prompts(boxes), chunk, precision,
                                         keep_ids=False, confidences=confidences, embedding=embedding)
                n_prompts, extra = len(boxes), detection_columns(boxes_from, i, selection.samples[i].labels)
            row = image_row(selection, i, name, "model", job.fold, pred, time.perf_counter() - tick,
                            prompt if boxes_from is None else options.prompt, n_prompts)
            rows.append(row | extra | {"seen_in_training": seen_mark(selection, job, i)})
            volumes.add(name, i, pred, row["seconds"])
            if i in keep:
                visuals[i][name] = pred
    return rows, visuals


def mode_options(options: ScoreOptions, job: Job, mode: str, device: torch.device) -> segmenter.SegmentOptions:
    """How ``job``'s model segments whole images in automatic ``mode`` (modes.segment_options)."""
    return automatic_modes.segment_options(
        mode, job.watershed, options.precision, options.batch_prompts, options.points_per_side,
        options.pred_iou_thresh, options.stability_score_thresh,
        options.batch_prompts or segmenter.default_chunk(device))


def score_automatic(options: ScoreOptions, job: Job, sam: nn.Module, selection: Selection, keep: set[int],
                    volumes: reports.VolumeScores) -> tuple[list[dict[str, Any]], dict[int, dict[str, np.ndarray]]]:
    """One model on its images in each of its automatic modes (``job.modes``): a row per image and
    mode (modes.mode_row_name), its ``seconds`` the wall time of segmenting the image in that mode,
    the encoder included (no mode reuses another's embedding)."""
    rows: list[dict[str, Any]] = []
    visuals: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
    device = segmenter.sam_device(sam)
    pipelines = {mode: automatic.build_segmenter(sam, mode_options(options, job, mode, device)) for mode in job.modes}
    label = job.source.name + (f" fold {job.fold}" if job.fold is not None else "")
    for i in tqdm(job.indices, desc=f"evaluate {label}", leave=False, disable=None):
        image = selection.samples[i].image
        for mode, pipeline in pipelines.items():
            name = automatic_modes.mode_row_name(job.source.name, mode, options.modes)
            tick = time.perf_counter()
            pred = pipeline.segment(image).labels
            row = image_row(selection, i, name, "model", job.fold, pred, time.perf_counter() - tick, mode)
            rows.append(row | {"seen_in_training": seen_mark(selection, job, i)})
            volumes.add(name, i, pred, row["seconds"])
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
        volumes.add(BASELINE_YOLO_BOX, i, pred, row["seconds"])
    for name in names:
        for i in selection.indices:
            tick, prompts = time.perf_counter(), selection.prompts[i]
            pred = box_baseline(prompts.boxes, selection.samples[i].labels.shape, name.split("_", 1)[1],
                                prompts.object_ids)
            row = image_row(selection, i, name, "baseline", None, pred, time.perf_counter() - tick, "box")
            rows.append(row | {"seen_in_training": "no"})
            volumes.add(name, i, pred, row["seconds"])
    return rows


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def row_sets(prompt: str, sources: Sequence[runs.ModelSource], baselines: Sequence[str],
             detector: Detector | None = None,
             modes: Mapping[str, Sequence[str]] | None = None) -> dict[str, reports.RowSet]:
    """Every row name of an evaluation in table order: per model its own rows (and with a
    detector its detector-prompted rows; in automatic modes one per mode it runs, ``modes``:
    source name -> its modes, of the ``prompt``'s), then the baselines."""
    sets: dict[str, reports.RowSet] = {}
    for source in sources:
        if modes is not None:
            for mode in modes[source.name]:
                name = automatic_modes.mode_row_name(source.name, mode, prompt.split(","))
                sets[name] = reports.RowSet("model", source.spec, mode)
            continue
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


def automatic_record(options: ScoreOptions, jobs: Sequence[Job],
                     device: torch.device) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]] | None]:
    """The automatic mask generator's settings (mode amg; its filters resolved) and each ais / apg
    model's watershed thresholds (by model, with ``fold k`` for a run's folds), for config.json."""
    amg = watershed = None
    for job in jobs:
        if "amg" in job.modes and amg is None:
            used = mode_options(options, job, "amg", device)
            amg = {"points_per_side": used.points_per_side, "pred_iou_thresh": used.pred_iou_thresh,
                   "stability_score_thresh": used.stability_score_thresh}
        if any(m in automatic_modes.DECODER_MODES for m in job.modes):
            name = job.source.name + (f" fold {job.fold}" if job.fold is not None else "")
            watershed = (watershed or {}) | {name: asdict(job.watershed)}
    return amg, watershed


def make_config(options: ScoreOptions, sources: Sequence[runs.ModelSource], selection: Selection,
                bases: adapters.BaseModels, data: Mapping[str, Any], run_dirs: Sequence[Path],
                detector: Detector | None, jobs: Sequence[Job] = ()) -> reports.EvaluateConfig:
    """The record of this evaluation (config.json); ``data``: the data options, ``data_dir`` first."""
    amg, watershed = automatic_record(options, jobs, bases.device)
    return reports.EvaluateConfig(
        data=runfiles.plain_record(data),
        split=selection.split, prompt=options.prompt, models={s.name: s.spec for s in sources},
        model_type=bases.model_type, image_size=bases.image_size,
        checkpoint=None if bases.checkpoint is None else str(bases.checkpoint), checkpoint_sha256=bases.sha256,
        random_weights=bases.random_weights, precision=options.precision, max_objects=options.max_objects,
        batch_prompts=options.batch_prompts, seed=options.seed, bootstrap=options.bootstrap,
        cv_run=str(run_dirs[0]) if run_dirs else None,
        auto=amg, watershed=watershed,
        detector=detector.record() if detector is not None else None, plot=options.plot,
        protocol=automatic_modes.protocol(options.modes),
        compare=len(sources) > 1 or options.compare, link=asdict(options.link))


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


@dataclass
class Plan:
    """Everything an evaluation scores, each part read and checked: the models (``sources``, their
    ``jobs``, the ``bases`` they share and the optional ``detector``), the images (``selection``),
    the training runs among the inputs (``run_dirs``) and the data options (``data``, for the record)."""

    sources: list[runs.ModelSource]
    jobs: list[Job]
    bases: adapters.BaseModels
    selection: Selection
    data: dict[str, Any]
    run_dirs: list[Path] = field(default_factory=list)
    detector: Detector | None = None


def score_all(options: ScoreOptions, plan: Plan, output_dir: Path, started: float) -> None:
    """Score every job and the baselines, then write the tables, summary and figures into
    ``output_dir`` (reports.write_evaluation); ``started``: the ``time.time()`` of the start."""
    selection, detector = plan.selection, plan.detector
    keep = set(selection.indices if options.max_visualize == 0 else selection.indices[:options.max_visualize]) \
        if options.visualize else set()
    rows: list[dict[str, Any]] = []
    visuals: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
    # 3-D scores of volume sections (not of max_objects subsets: each section prompts other objects)
    volumes = reports.VolumeScores(selection.samples, [] if options.max_objects else selection.indices, options.link)
    for job in plan.jobs:
        job_rows, job_visuals = score_job(options, job, plan.bases, selection, keep, detector, len(plan.sources),
                                          volumes)
        rows += job_rows
        for i, preds in job_visuals.items():
            visuals[i].update(preds)
    baselines = BASELINES if options.prompt in ("box", "yolo") else ()
    if not baselines:
        log.info("no box / ellipse baselines: they need box prompts (prompt='box')")
    rows += score_baselines(selection, baselines, volumes, detector)
    config = make_config(options, plan.sources, selection, plan.bases, plan.data, plan.run_dirs, detector, plan.jobs)
    modes = {job.source.name: job.modes for job in plan.jobs} if options.automatic else None
    sets = row_sets(options.prompt, plan.sources, baselines, detector, modes)
    reports.write_evaluation(output_dir, reports.Evaluation(
        config, rows, sets, selection.samples, selection.indices, bool(selection.fold_of), visuals,
        detection_summary(detector, selection) if detector else None, time.time() - started,
        volumes.rows(list(sets)), selection.grouping.unit()))
