"""The report of an evaluation: per-image rows, per-group and per-fold aggregates, its files and figures.

Two kinds of aggregate, always named: ``per_image_mean`` (mean of per-image scores, with standard
deviation and a 95 % percentile-bootstrap interval of the mean that resamples whole fold groups,
:func:`summarize`) and ``pooled`` (counts summed over all images first; AJI = summed intersections /
summed unions). Metrics come from metrics.py; ``msa`` (micro-sam's mean segmentation accuracy,
metrics/accuracy.py) is a per-image mean only, as micro-sam reports it, beside ``seconds_per_image``
(the mean wall time of segmenting one image, encoder included).
"""
from __future__ import annotations

import dataclasses
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from samlora.core import figures, runfiles
from samlora.data.sample import Sample
from samlora.inference.linking import IN_PLANE_AND_FACE, LinkOptions, link_slices
from samlora.metrics import scores as metrics
from samlora.metrics.accuracy import mean_segmentation_accuracy
from samlora.metrics.bootstrap import summarize

log = logging.getLogger(__name__)

# Semantic keys of metrics.semantic_metrics -> our column names (instance keys keep theirs).
SEMANTIC_COLUMNS = {"dice": "dice", "iou": "iou", "precision": "pixel_precision",
                    "recall": "pixel_recall", "tp": "pixel_tp", "fp": "pixel_fp", "fn": "pixel_fn"}
SCORE_COLUMNS: tuple[str, ...] = tuple(SEMANTIC_COLUMNS[k] for k in metrics.SEMANTIC_SCORE_KEYS) \
    + metrics.instance_score_keys() + ("msa",)
# Per-image scores averaged over images only: micro-sam's mSA has no pooled form.
MEAN_ONLY_METRICS: tuple[str, ...] = ("msa",)
# The metrics of the group tables and the printed table, in display order.
GROUP_METRICS: tuple[str, ...] = ("dice", "iou", "pixel_precision", "pixel_recall", "aji", "aji_plus",
                                  "pq", "sq", "rq", "f1", "precision", "recall")
ID_COLUMNS = ("model", "kind", "mode", "fold", "image", "path", "tag", "group", "split", "seen_in_training", "height",
              "width", "n_objects", "n_prompts", "seconds")


def score_image(gt: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None = None) -> dict[str, float | int]:
    """Semantic (renamed, see :data:`SEMANTIC_COLUMNS`) and instance metrics of one image, and
    micro-sam's mSA (``msa``)."""
    semantic = metrics.semantic_metrics(gt, pred, ignore)
    row: dict[str, float | int] = {SEMANTIC_COLUMNS[k]: v for k, v in semantic.items()}
    row.update(metrics.instance_metrics(gt, pred, ignore))
    row["msa"] = mean_segmentation_accuracy(gt, pred, ignore)
    return row


def seconds_per_image(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """The mean ``seconds`` of per-image rows (None without rows)."""
    return float(np.mean([float(r["seconds"]) for r in rows])) if rows else None


def pooled_scores(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | int]:
    """Dataset-level (pooled) semantic and instance scores of per-image rows."""
    back = {v: k for k, v in SEMANTIC_COLUMNS.items()}
    semantic = metrics.pooled_semantic_metrics(
        [{back[c]: r[c] for c in ("pixel_tp", "pixel_fp", "pixel_fn")} for r in rows])
    pooled: dict[str, float | int] = {SEMANTIC_COLUMNS[k]: v for k, v in semantic.items()}
    pooled.update(metrics.pooled_instance_metrics(rows))
    return pooled


def row_groups(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The bootstrap unit of each per-image row: its fold group (``group``, folds.Grouping), else
    the image itself."""
    return [str(r.get("group") or r["image"]) for r in rows]


def summarize_rows(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], n_boot: int,
                   seed: int) -> dict[str, dict[str, float | int]]:
    """``{key: summarize(per-image values)}`` (mean, std, 95 % CI resampling the rows' groups, n,
    n_groups)."""
    groups = row_groups(rows)
    return {k: summarize([float(r[k]) for r in rows], n_boot=n_boot, seed=seed, groups=groups) for k in keys}


def group_rows(rows: Sequence[Mapping[str, Any]], by: str, n_boot: int, seed: int,
               include_all: bool = True) -> list[dict[str, Any]]:
    """One row per (model, value of ``by``): per-image mean, std, CI and pooled of
    :data:`GROUP_METRICS`, mean, std and CI of :data:`MEAN_ONLY_METRICS`, and
    ``seconds_per_image``; ``include_all`` adds the ``(all)`` group per model."""
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
                                   "n_images": len(members), "n_groups": len(set(row_groups(members))),
                                   "n_seen_in_training": sum(m.get("seen_in_training") == "yes" for m in members)}
            summary = summarize_rows(members, GROUP_METRICS + MEAN_ONLY_METRICS, n_boot, seed)
            pooled = pooled_scores(members)
            for key in GROUP_METRICS + MEAN_ONLY_METRICS:
                s = summary[key]
                row.update({f"{key}_mean": s["mean"], f"{key}_std": s["std"], f"{key}_ci_low": s["ci_low"],
                            f"{key}_ci_high": s["ci_high"]})
                if key in pooled:
                    row[f"{key}_pooled"] = pooled[key]
            row["seconds_per_image"] = seconds_per_image(members)
            out.append(row)
    return out


def _natural(text: str) -> list[Any]:
    """Sort key that orders ``fold 10`` after ``fold 9``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def per_image_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Identity columns, headline scores, then every other key in first-seen order."""
    head = list(ID_COLUMNS) + ["dice", "iou", "pixel_precision", "pixel_recall", "aji", "aji_plus", "pq",
                               "sq", "rq", "f1", "precision", "recall", "msa", "mean_matched_iou", "n_gt",
                               "n_pred", "tp", "fp", "fn"]
    rest = []
    for r in rows:
        rest += [k for k in r if k not in head and k not in rest]
    return head + rest


def format_table(summaries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The printed table: per model the per-image mean (95 % CI) and pooled scores, micro-sam's
    mSA (per-image mean) and the seconds per image."""
    header = (f"{'model':<18} {'images':>6} {'seen':>5}  {'Dice mean [95% CI]':<22} {'Dice pooled':>11} "
              f"{'IoU mean':>8} {'IoU pooled':>10} {'AJI mean':>8} {'AJI pooled':>10} "
              f"{'PQ mean':>7} {'F1@0.5 mean':>11} {'mSA mean':>8} {'s/image':>8}")
    lines = [header, "-" * len(header)]
    for name, s in summaries.items():
        mean, pooled = s["per_image_mean"], s["pooled"]
        d = mean["dice"]
        lines.append(
            f"{name:<18} {d['n']:>6} {s.get('n_seen_in_training', 0):>5}  {d['mean']:.3f} [{d['ci_low']:.3f}, "
            f"{d['ci_high']:.3f}]   "
            f"{pooled['dice']:>11.3f} {mean['iou']['mean']:>8.3f} {pooled['iou']:>10.3f} "
            f"{mean['aji']['mean']:>8.3f} {pooled['aji']:>10.3f} {mean['pq']['mean']:>7.3f} "
            f"{mean['f1']['mean']:>11.3f} {mean['msa']['mean']:>8.3f} {_seconds(s.get('seconds_per_image'))}")
    return lines


def _seconds(value: float | None) -> str:
    """A seconds cell of the printed table (``-`` without images)."""
    return f"{'-':>8}" if value is None else f"{value:>8.3f}"


@dataclass
class RowSet:
    """The rows of one name in the tables: what made them (``kind`` model or baseline, the
    ``source`` model or shape, the ``prompts`` it was given)."""

    kind: str
    source: str
    prompts: str


def model_summaries(rows: Sequence[Mapping[str, Any]], sets: Mapping[str, RowSet], n_boot: int,
                    seed: int, unit: str = "image") -> dict[str, dict[str, Any]]:
    """Per row name: kind, source, prompts, number of images, the bootstrap's ``unit`` and
    ``n_groups``, ``per_image_mean``, ``pooled`` and ``seconds_per_image``."""
    summaries = {}
    for name, info in sets.items():
        mine = [r for r in rows if r["model"] == name]
        summaries[name] = {
            "kind": info.kind,
            "source": info.source,
            "prompts": info.prompts,
            "n_images": len(mine),
            "unit": unit,
            "n_groups": len(set(row_groups(mine))),
            "n_seen_in_training": sum(r.get("seen_in_training") == "yes" for r in mine),
            "per_image_mean": summarize_rows(mine, SCORE_COLUMNS, n_boot, seed),
            "pooled": pooled_scores(mine),
            "seconds_per_image": seconds_per_image(mine),
        }
    return summaries


def paired_comparisons(rows: Sequence[Mapping[str, Any]], sets: Mapping[str, RowSet], n_boot: int,
                       seed: int, unit: str = "image") -> dict[str, dict[str, Any]]:
    """Every model against every base-model row on the same images: the per-image Dice difference
    (mean, bootstrap 95 % interval resampling the images' groups) and the verdict it supports."""
    dice = {(r["model"], r["image"]): float(r["dice"]) for r in rows}
    group_of = dict(zip((r["image"] for r in rows), row_groups(rows)))
    bases = [n for n, s in sets.items() if s.kind == "model" and s.source == "base"]
    models = [n for n, s in sets.items() if s.kind == "model" and s.source != "base"]
    out: dict[str, dict[str, Any]] = {}
    for model in models:
        for base in bases:
            images = [img for (name, img) in dice if name == model and (base, img) in dice]
            if not images:
                continue
            diff = summarize([dice[(model, img)] - dice[(base, img)] for img in images], n_boot=n_boot, seed=seed,
                             groups=[group_of[img] for img in images])
            verdict = ("better than" if diff["ci_low"] > 0 else "worse than" if diff["ci_high"] < 0
                       else "no clear difference from")
            out[f"{model} vs {base}"] = {"dice_difference": diff, "verdict": f"{model} is {verdict} {base}",
                                         "unit": unit, "n_groups": diff["n_groups"],
                                         "method": "per-image Dice differences on the same images, 95 % "
                                                   "percentile bootstrap interval of their mean, resampling "
                                                   "whole groups (unit)"}
    return out


def fold_summary(fold_table: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{model: {fold: {n_images, <metric>_mean, <metric>_pooled}}}`` of Dice, IoU, AJI and PQ."""
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for row in fold_table:
        out[row["model"]][str(row["fold"])] = {"n_images": row["n_images"], **{
            f"{k}_{agg}": row[f"{k}_{agg}"] for k in ("dice", "iou", "aji", "pq") for agg in ("mean", "pooled")}}
    return dict(out)


# --------------------------------------------------------------------------------------------
# 3-D scores of volume sections
# --------------------------------------------------------------------------------------------
GROUND_TRUTH_LINKED = "ground_truth_linked"  # the per-section ground truth linked: what the linker allows
VOLUME_PROTOCOL = ("per run of consecutive whole sections of a volume: ground-truth 3-D objects = connected "
                   "components of the ground-truth foreground (8-connected in a section, joined where sections "
                   "overlap); predicted 3-D objects = the per-section predictions linked by volumes.link_slices "
                   "(config.json's link options); dice / iou over the voxels; precision50 / recall50 / f1_50 at "
                   "3-D IoU > 0.5; ap50 / ap75 = COCO 101-point AP, predictions ranked by size (MitoEM); msa = "
                   "micro-sam's mean segmentation accuracy of the 3-D objects; seconds_per_image = the mean wall "
                   "time of segmenting one section (encoder included); row "
                   f"{GROUND_TRUTH_LINKED} = the ground truth's own per-section objects (a perfect 2-D "
                   "segmentation) linked alike: the ceiling the linking sets on every model's 3-D scores")


class VolumeScores:
    """Collects the per-section predictions of the selected volume sections (whole sections in runs
    of two or more consecutive ones) and scores each run in 3-D (metrics.volume_metrics), the
    per-section predictions and ground truth (the ceiling row) linked with ``link``."""

    def __init__(self, samples: Sequence[Sample], indices: Sequence[int], link: LinkOptions = LinkOptions()) -> None:
        self.samples = samples
        self.link = link
        by_volume: dict[str, list[int]] = defaultdict(list)
        for i in indices:
            s = samples[i]
            if s.volume is not None and s.slice_index is not None and not s.is_patch:
                by_volume[s.volume].append(i)
        self.runs: list[tuple[str, list[int]]] = []
        for volume, members in by_volume.items():
            members.sort(key=lambda i: samples[i].slice_index)
            cuts = [0] + [k for k in range(1, len(members))
                          if samples[members[k]].slice_index != samples[members[k - 1]].slice_index + 1] + [len(members)]
            for a, b in zip(cuts, cuts[1:]):
                first, last = samples[members[a]].slice_index, samples[members[b - 1]].slice_index
                if b - a >= 2:
                    self.runs.append((volume if len(cuts) == 2 else f"{volume}[{first}:{last + 1}]", members[a:b]))
        self.members = {i for _, run in self.runs for i in run}
        self.predictions: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
        self.seconds: dict[str, dict[int, float]] = defaultdict(dict)

    def add(self, name: str, i: int, pred: np.ndarray, seconds: float | None = None) -> None:
        """The HxW prediction of row name ``name`` on sample ``i`` and the ``seconds`` it took
        (kept only for volume sections)."""
        if i in self.members:
            self.predictions[name][i] = pred
            if seconds is not None:
                self.seconds[name][i] = seconds

    def rows(self, names: Sequence[str]) -> list[dict[str, Any]]:
        """One row per (row name, run of sections): its 3-D scores (metrics.volume_metrics, and
        ``msa`` of the 3-D objects) and ``seconds_per_image`` (the mean over its sections; empty
        for the run's :data:`GROUND_TRUTH_LINKED` row: its per-section ground-truth objects linked)."""
        out = []
        for volume, run in self.runs:
            truth = ndimage.label(np.stack([self.samples[i].labels > 0 for i in run]), IN_PLANE_AND_FACE,
                                  output=np.int32)[0]
            stacks = {name: [self.predictions.get(name, {}).get(i) for i in run] for name in names}
            stacks[GROUND_TRUTH_LINKED] = [self.samples[i].labels for i in run]
            for name, sections in stacks.items():
                if all(section is not None for section in sections):
                    linked = link_slices(np.stack(sections), self.link.iou, self.link.gap, self.link.min_sections,
                                         self.link.merge)
                    seconds = [self.seconds.get(name, {}).get(i) for i in run]
                    out.append({"model": name, "volume": volume, "n_sections": len(run),
                                **metrics.volume_metrics(truth, linked), "msa": volume_msa(truth, linked),
                                "seconds_per_image": None if None in seconds else float(np.mean(seconds))})
        return out


def volume_msa(truth: np.ndarray, pred: np.ndarray) -> float:
    """micro-sam's mSA of ZxHxW 3-D objects. mSA depends only on the objects' voxel counts and
    overlaps, which stacking the sections into one (Z*H)xW plane keeps (every label stays one
    object), so the 2-D function gives the 3-D score."""
    width = truth.shape[-1]
    return mean_segmentation_accuracy(truth.reshape(-1, width), pred.reshape(-1, width))


# --------------------------------------------------------------------------------------------
# The files of an evaluation
# --------------------------------------------------------------------------------------------
OUTPUT_FORMAT = "samlora-evaluation"
FIGURE_METRICS = {"dice": "Dice", "iou": "IoU", "aji": "AJI", "pq": "PQ", "f1": "F1@0.5"}


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
    batch_prompts: int | None  # None: the device's default (inference.default_chunk)
    seed: int
    bootstrap: int
    cv_run: str | None = None
    protocol: str = ""
    auto: dict[str, float] | None = None  # the automatic mask generator's settings (mode amg)
    watershed: dict[str, dict[str, float]] | None = None  # modes ais / apg: each model's WatershedOptions
    detector: dict[str, Any] | None = None
    plot: bool = False
    compare: bool = False
    link: dict[str, Any] | None = None  # volumes.LinkOptions of the 3-D scores


@dataclass
class Evaluation:
    """What an evaluation produced: per-image ``rows`` of every row name in ``sets`` (table
    order) on ``samples[indices]``, the predictions to draw (``visuals[i][name]``), the detector
    summary and the time it took."""

    config: EvaluateConfig
    rows: list[dict[str, Any]]
    sets: dict[str, RowSet]
    samples: Sequence[Sample]
    indices: Sequence[int]
    by_fold: bool
    visuals: Mapping[int, Mapping[str, np.ndarray]]
    detection: dict[str, Any] | None
    seconds: float
    volumes: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # VolumeScores.rows
    unit: str = "image"  # what the bootstrap resamples: the rows' ``group`` (folds.Grouping.unit)


def write_tables(out: Path, ev: Evaluation) -> tuple[dict[str, Any], list, list]:
    """per_image.csv, per_group.csv and per_fold.csv (with ``by_fold``); returns the summaries
    and the group and fold tables."""
    n_boot, seed = ev.config.bootstrap, ev.config.seed
    model_rank = {name: n for n, name in enumerate(ev.sets)}
    image_rank = {ev.samples[i].key: n for n, i in enumerate(ev.indices)}
    ev.rows.sort(key=lambda r: (model_rank[r["model"]], image_rank[r["image"]]))
    runfiles.write_csv(out / "per_image.csv", ev.rows, per_image_columns(ev.rows))
    group_table = group_rows(ev.rows, "tag", n_boot, seed)
    runfiles.write_csv(out / "per_group.csv", group_table, list(group_table[0]))
    fold_table: list[dict[str, Any]] = []
    if ev.by_fold:
        fold_table = group_rows(ev.rows, "fold", n_boot, seed, include_all=False)
        runfiles.write_csv(out / "per_fold.csv", fold_table, list(fold_table[0]))
    if ev.volumes:
        runfiles.write_csv(out / "per_volume.csv", ev.volumes, list(ev.volumes[0]))
    return model_summaries(ev.rows, ev.sets, n_boot, seed, ev.unit), group_table, fold_table


def write_evaluation(out: Path, ev: Evaluation) -> None:
    """The tables, config.json, figures and summary.json of an evaluation; logs the table."""
    config = ev.config
    summaries, group_table, fold_table = write_tables(out, ev)
    runfiles.write_json(out / "config.json", dataclasses.asdict(config))
    figure_files = write_figures(out, ev, summaries, group_table, fold_table)
    summary = {
        "format": OUTPUT_FORMAT, "version": 1, "prompt": config.prompt, "split": config.split,
        "n_images": len(ev.indices), "random_weights": config.random_weights,
        "model_type": config.model_type, "image_size": config.image_size,
        "checkpoint_sha256": config.checkpoint_sha256, "data_dir": config.data["data_dir"], "cv_run": config.cv_run,
        "aggregates": {
            "per_image_mean": "mean over images of per-image scores; std (ddof=1) and a 95 % percentile "
                              f"bootstrap interval of the mean ({config.bootstrap} resamples of whole groups, "
                              f"seed {config.seed}; unit: {ev.unit})",
            "pooled": "counts summed over all images, then one score (AJI: summed intersections / summed "
                      "unions; PQ, F1: summed TP, FP, FN)"},
        "overlaps": "a pixel covered by several predicted masks goes to the higher predicted IoU "
                    "(baselines: to the smaller shape)",
        "models": summaries,
        "per_fold": fold_summary(fold_table) if fold_table else None,
        "bootstrap": {"unit": ev.unit, "n_groups": len(set(row_groups(ev.rows))), "resamples": config.bootstrap,
                      "seed": config.seed},
        "paired": paired_comparisons(ev.rows, ev.sets, config.bootstrap, config.seed, ev.unit),
        "prompt_protocol": config.protocol,
        "seen_in_training": {name: s["n_seen_in_training"] for name, s in summaries.items()},
        "detection": ev.detection,
        "per_volume": ev.volumes or None,
        "volume_protocol": VOLUME_PROTOCOL if ev.volumes else None,
        "files": ["per_image.csv", "per_group.csv"] + (["per_fold.csv"] if fold_table else [])
        + (["per_volume.csv"] if ev.volumes else []) + ["config.json"] + figure_files,
        "seconds": round(ev.seconds, 2),
    }
    runfiles.write_json(out / "summary.json", summary, sort_keys=False)  # models in table order
    if config.random_weights:
        log.warning("RANDOM WEIGHTS: these scores measure nothing (--checkpoint none)")
    for line in format_table(summaries):
        log.info("%s", line)
    log.info("mean = mean of per-image scores; pooled = counts summed over images first")
    for row in ev.volumes:
        log.info("%-18s 3-D, %s (%d sections): voxel Dice %.3f, IoU %.3f; 3-D objects P %.3f R %.3f F1 %.3f at IoU "
                 "0.5, AP50 %.3f, AP75 %.3f, mSA %.3f", row["model"], row["volume"], row["n_sections"], row["dice"],
                 row["iou"], row["precision50"], row["recall50"], row["f1_50"], row["ap50"], row["ap75"], row["msa"])
    for name, count in summary["seen_in_training"].items():
        if count:
            log.warning("%s: %d of its rows are images it was trained on (seen_in_training = yes)", name, count)
    for comparison in summary["paired"].values():
        d = comparison["dice_difference"]
        log.info("%s: per-image Dice difference %+.4f, 95 %% CI [%+.4f, %+.4f] over %d images in %d groups "
                 "(resampled whole)", comparison["verdict"], d["mean"], d["ci_low"], d["ci_high"], d["n"], d["n_groups"])
    if ev.detection is not None:
        det = ev.detection
        log.info("detector boxes at IoU > %.2f: precision %.3f, recall %.3f, F1 %.3f (%d TP, %d FP, %d FN; "
                 "pooled over %d images, --conf %g)", det["match_iou"], det["precision"], det["recall"], det["f1"],
                 det["tp"], det["fp"], det["fn"], det["n_images"], det["conf"])
    log.info("wrote summary.json, per_image.csv, per_group.csv%s and %d figures to %s",
             ", per_fold.csv" if fold_table else "", len(figure_files), out)


def _figure_name(key: str) -> str:
    """A file name for a sample key: extensions dropped, odd characters replaced."""
    name = re.sub(r"\.(png|tiff?|jpe?g|bmp|nii\.gz|nii)\b", "", key, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:80] or "image"


def write_figures(out: Path, ev: Evaluation, summaries: Mapping[str, Mapping[str, Any]],
                  group_table: Sequence[Mapping[str, Any]], fold_table: Sequence[Mapping[str, Any]]) -> list[str]:
    """The PNGs asked for; returns their paths relative to ``out``."""
    seen = any(r.get("seen_in_training") == "yes" for r in ev.rows)
    config = ev.config
    note = f"{config.prompt} prompts" + (" - INCLUDES IMAGES SEEN IN TRAINING" if seen else "")
    baselines = [name for name, info in ev.sets.items() if info.kind == "baseline"]
    written: list[Path] = []
    dice_of = {(r["model"], r["image"]): r["dice"] for r in ev.rows}
    for number, (i, preds) in enumerate(sorted(ev.visuals.items())):
        sample = ev.samples[i]
        panels = [figures.Panel("image"), figures.Panel(f"ground truth ({sample.num_objects} objects)", sample.labels)]
        for name, pred in preds.items():
            n_pred = int(np.count_nonzero(np.unique(pred)))
            panels.append(figures.Panel(f"{name}: Dice {dice_of[(name, sample.key)]:.3f} ({n_pred} objects)", pred))
        path = out / "visualizations" / f"{number:03d}_{_figure_name(sample.key)}.png"
        written.append(figures.save_side_by_side(path, sample.image, panels, f"{sample.key} - {note}",
                                                 config.random_weights))
    if config.plot:
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
                f"Dice per {by} - {note}", config.random_weights, baselines))
        per_model = {name: [r["dice"] for r in ev.rows if r["model"] == name] for name in summaries}
        written.append(figures.save_box_plot(out / "plots" / "dice_boxplot.png", per_model, "per-image Dice",
                                             f"per-image Dice - {note}", config.random_weights, baselines))
    if config.compare or config.plot:
        table = {name: {k: s["per_image_mean"][k] for k in FIGURE_METRICS} for name, s in summaries.items()}
        n_images = len({r["image"] for r in ev.rows})
        written.append(figures.save_metric_bars(out / "comparison.png", table, FIGURE_METRICS,
                                                f"models compared - {note}, {n_images} images",
                                                config.random_weights, baselines))
    return [p.relative_to(out).as_posix() for p in written]
