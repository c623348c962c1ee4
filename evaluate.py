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
(``--max_objects N``: a seeded subset, the other objects' pixels ignored); ``yolo``: a detector's
boxes (``detect train``), beside the same model with ground-truth boxes (what a perfect detector
would reach) and the detector's boxes filled (``baseline_yolo_box``), with the detector's box
precision / recall / F1 at IoU > 0.5. Automatic modes, no ground truth used, several side by side
in one run (``--prompt ais,apg,amg``: a row per model and mode, ``NAME+MODE``): ``amg`` (alias
``auto``) SAM's automatic mask generator; ``ais`` the instance decoder an adapter carries (``train
--instance_decoder``), its maps turned into objects by the seeded watershed with the thresholds the
adapter records; ``apg`` SAM's mask decoder prompted by one click per seed region of those maps
(samlora/evaluation/modes.py). Every row has micro-sam's mSA (``msa``) and its wall time
(``seconds``, encoder included; the tables' ``seconds_per_image``).

Baselines (box prompts): ``baseline_box`` (the prompt box filled) and ``baseline_ellipse`` (its
inscribed ellipse), scored alike: a box-prompted score means little until it is set beside them.
Masks become one instance map by instances.py's rule (overlaps to the higher predicted IoU); the
metrics (samlora/metrics) leave ``Sample.ignore`` out; reports.py writes ``per_image.csv``,
``per_group.csv``, ``per_fold.csv``, ``summary.json``, ``config.json`` and the figures, and for
consecutive sections of a volume ``per_volume.csv``: voxel Dice / IoU and 3-D instance scores,
beside the ground truth's own per-section objects linked alike (the ceiling the linking sets).

This module parses the flags, turns them into typed options (:class:`ScoreOptions`) and checks the
inputs; samlora/evaluation/heldout.py chooses the images, scoring.py scores and writes them. Their
errors name parameters (:class:`errors.OptionError`); :func:`errors.as_flags` reports them as flags.
"""
from __future__ import annotations

import argparse
import logging
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from samlora.core import logfiles, runfiles
from samlora.core.errors import UserError, as_flags
from samlora.data import dataset as data
from samlora.data import folds as folds_lib
from samlora.evaluation import heldout, reports
from samlora.evaluation.scoring import (
    YOLO_PREFIX,
    Plan,
    ScoreOptions,
    assign_modes,
    native_base,
    plan_jobs,
    score_all,
)
from samlora.inference.linking import LinkOptions, add_link_arguments
from samlora.inference.yolo import DetectorOptions, load_detector
from samlora.models import adapters, model_options
from samlora.models import sam as sam_model
from samlora.training import runs

log = logging.getLogger(__name__)

SPLITS = ("test", "val", "all")
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
    defaults = ScoreOptions()
    data.add_data_arguments(parser, required=False, data_dir_help="; default with --cv_run: the run's")
    model_options.add_model_arguments(parser, from_adapter=True)
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
    ev.add_argument("--prompt", default=defaults.prompt, metavar="|".join(heldout.PROMPT_MODES),
                    help="box = ground-truth box per object, point = one interior point per object, yolo = the "
                         "boxes of a YOLO detector (--yolo_model), beside ground-truth boxes; automatic modes "
                         "(no ground truth used), several comma-separated for one table, e.g. ais,apg,amg: amg "
                         "(or auto) = SAM's automatic mask generator, ais = the adapter's instance decoder "
                         "(train --instance_decoder) + seeded watershed, apg = SAM prompted by points from "
                         "that decoder's maps")
    ev.add_argument("--max_objects", type=int, default=defaults.max_objects,
                    help="prompt at most this many objects per image (a seeded random subset; the pixels of "
                         "the others are ignored by the metrics); 0 = all")
    ev.add_argument("--batch_prompts", type=int, default=defaults.batch_prompts,
                    help="prompts per decoder call (also the automatic generator's points per batch); default: "
                         "1 on a CPU, where fewer per call cost less each, 64 on a GPU")
    ev.add_argument("--output_dir", type=Path, default=Path("runs/evaluate"),
                    help="where the tables, summary.json, log and figures go")
    ev.add_argument("--overwrite", action="store_true",
                    help="write into a non-empty --output_dir (replaces a previous evaluation's files)")
    ev.add_argument("--seed", type=int, default=defaults.seed,
                    help="seed for --max_objects subsets, bootstrap intervals and random base weights")
    ev.add_argument("--bootstrap", type=int, default=defaults.bootstrap,
                    help="bootstrap resamples for the 95 %% intervals (each resamples whole fold groups: source "
                         "images, --group_by ids, blocks of --slice_block sections)")
    auto = parser.add_argument_group("automatic modes (--prompt amg / apg)")
    auto.add_argument("--points_per_side", type=int, default=defaults.points_per_side, help="amg: point grid side")
    auto.add_argument("--pred_iou_thresh", type=float, default=defaults.pred_iou_thresh,
                      help="amg, apg: drop masks whose predicted IoU is below this (default: 0.88 for amg, "
                           "none for apg, as micro-sam's APG)")
    auto.add_argument("--stability_score_thresh", type=float, default=defaults.stability_score_thresh,
                      help="amg, apg: drop masks whose stability score is below this (default: 0.95 for amg, "
                           "none for apg)")
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
    fig.add_argument("--max_visualize", type=int, default=defaults.max_visualize,
                     help="at most this many images get a --visualize figure (0 = all)")
    fig.add_argument("--plot", action="store_true",
                     help="bar charts per tag (and per fold) and a box plot of per-image Dice")
    parser.set_defaults(func=run)
    return parser


def check_detector_flags(args: argparse.Namespace) -> None:
    """Refuse conflicting detector flags before anything is read (the numbers: ScoreOptions)."""
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
        if name.endswith(tuple(f"+{mode}" for mode in heldout.AUTOMATIC_MODES)):
            raise UserError(f"model name {name!r}: names ending in +MODE are reserved for the rows of several "
                            "automatic modes (--prompt ais,apg,amg gives NAME+ais, NAME+apg, NAME+amg)")
        seen.add(name)
        sources.append(runs.model_source(name, spec))
    return sources


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


def plan(args: argparse.Namespace) -> tuple[list[runs.ModelSource], list[Path], dict[str, Any] | None]:
    """The model sources, the training runs among the inputs and the first run's config."""
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


def score_options(args: argparse.Namespace) -> ScoreOptions:
    """The scoring service's options from the parsed flags (checked)."""
    return ScoreOptions(
        prompt=args.prompt, max_objects=args.max_objects, seed=args.seed,
        include_training_images=args.include_training_images, batch_prompts=args.batch_prompts,
        precision=args.precision, bootstrap=args.bootstrap, points_per_side=args.points_per_side,
        pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
        visualize=args.visualize, max_visualize=args.max_visualize, plot=args.plot, compare=bool(args.compare),
        link=LinkOptions(args.link_iou, args.link_gap, args.min_sections, args.link_merge))


def run(args: argparse.Namespace) -> int:
    """Evaluate the chosen models on the chosen images; write tables, summary and figures.

    Everything that can be refused (flags, data, adapters, weights, the output directory) is
    checked before the output directory is created, so a refused run leaves no trace; the log
    lines of those checks are replayed into the log file.
    """
    started = time.time()
    with logfiles.LogBuffer() as buffer, as_flags():
        options = score_options(args)
        check_detector_flags(args)
        sources, run_dirs, run_config = plan(args)
        direct = {s.path: adapters.read_adapter(s.path)[0] for s in sources if s.kind == "adapter"}
        adapters.resolve_model_options(args.model_type, args.image_size, direct, run_config)  # refuse a mismatch first
        data_dir, data_options = heldout.data_options(data.DataOptions.of(args), args.data_dir, run_dirs, run_config)
        out = runfiles.OutputDir(args.output_dir, "evaluate")
        protected = [data_dir, *run_dirs]
        out.check(args.overwrite, protected=protected)
        selection = heldout.select_data(options, data_dir, data_options, args.split or ("val" if run_dirs else None),
                                        run_dirs, sources)
        jobs, adapter_configs = plan_jobs(sources, selection.indices, selection.fold_of, selection.num_folds)
        bases = base_models(args, adapter_configs, run_config)
        sources, jobs = native_base(sources, jobs, bases, selection.indices)
        assign_modes(options, jobs, bases)  # ais / apg need a model's instance decoder: refused here if none
        detector = None
        if args.prompt == "yolo":
            detector = load_detector(args.yolo_model, DetectorOptions(args.conf, args.iou, None, args.max_det),
                                     bases.device)
        out.claim(args.overwrite, protected=protected)
    with out.active(LOG_FILE, replay=buffer.records):
        record = {"data_dir": data_dir, **asdict(data_options)}
        score_all(options, Plan(sources, jobs, bases, selection, record, run_dirs, detector), args.output_dir, started)
    return 0
