"""``python main.py detect train|predict``: automatic instance segmentation, YOLOv8 boxes -> SAM.

``detect train`` exports any dataset that dataset.py reads as a YOLO dataset (``images/``,
``labels/*.txt``, ``data.yaml``) with the same grouped split the SAM trainer uses (patches of one
image and blocks of neighbouring slices never straddle it), trains a YOLOv8 detector offline with
ultralytics and reports box precision and recall at IoU 0.5 on the validation split.

``detect predict`` segments an image, a folder of images, a 3-D TIFF stack or a Zarr volume:
YOLO boxes prompt (LoRA-)SAM, or SAM's automatic mask generator does (``--mode amg``), or the
instance decoder an adapter of ``train --instance_decoder`` carries segments automatically
(``--mode ais``: its maps -> seeded watershed; ``--mode apg``: one click per seed region of its
maps, drawn by SAM's mask decoder; ``--write_maps`` writes the maps as ``<stem>_maps.tif``). Per input
it writes ``<stem>_labels.tif`` (instance labels, same Z/Y/X shape as the input: uint16/uint32 for
an image, a uint32 BigTIFF for a stack; ``<stem>_labels.zarr`` with the input's chunks for Zarr),
``<stem>_overlay.png``, and for the run one ``coco.json`` (RLE or polygons), the config and a
log. Images larger than ``--tile_size`` are segmented in overlapping tiles, then merged. Volumes
are read, segmented and written one section at a time, their objects linked into 3-D objects
(``--no_link`` keeps per-section ones, ``--link_merge`` joins the pieces of a split one); ``--resume``
continues an interrupted run.

This module parses the flags and turns them into typed options; the work is done in the package:
samlora/inference/yolo.py (offline ultralytics, the YOLO dataset, box matching), segmenter.py (SAM,
tiles), predict.py (every input file, :class:`PredictOptions`), sections.py (volumes section by
section), label_files.py (the output files), samlora/models/adapters.py (the model).
"""
from __future__ import annotations

import argparse
import logging
import dataclasses
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from samlora.core import runfiles
from samlora.core.errors import UserError
from samlora.data import dataset as data
from samlora.data import folds as folds_lib
from samlora.data import images, volume_io
from samlora.evaluation import modes
from samlora.inference import automatic, cluster
from samlora.inference import sections as stacks
from samlora.inference import segmenter as inference
from samlora.inference.linking import LinkOptions, add_link_arguments
from samlora.inference.predict import PredictOptions, predict_files
from samlora.inference.propagation import PropagationOptions
from samlora.inference.instance_watershed import WatershedOptions
from samlora.inference.segmenter import MODES, SegmentOptions
from samlora.inference.yolo import (
    DetectorOptions,
    build_yolo,
    export_yolo_dataset,
    load_detector,
    load_yolo,
    parse_yolo_args,
    report_validation,
    validate_detector,
    yolo_device,
)
from samlora.models import adapters, model_options
from samlora.models import sam as sam_model

log = logging.getLogger(__name__)

DATASET_DIR, YOLO_RUN = "yolo_dataset", "yolo"  # inside --output_dir of detect train
REPORT_CONFS = (0.05, 0.1, 0.25, 0.5)  # validation precision / recall are also shown at these
# The flags that change what a section's segmentation is (an interrupted run resumes only with the same).
SEGMENTATION_FLAGS = ("mode", "model_path", "checkpoint", "seed", "yolo_model", "precision", "device")


def args_record(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options as JSON-ready values (written next to every output)."""
    return runfiles.plain_record({k: v for k, v in vars(args).items() if not callable(v)})


# --------------------------------------------------------------------------------------------
# detect train
# --------------------------------------------------------------------------------------------
def detector_split(args: argparse.Namespace, samples: Sequence,
                   output_dir: Path) -> tuple[list[int], list[int], list[folds_lib.Fold] | None]:
    """The grouped (train, val) split and, when it was made here, the folds to write: from
    ``--folds_file``, else ``output_dir/folds.json`` (when re-running into it), else new folds
    (folds.py); fixed test samples are left out. Writes nothing."""
    made = None
    if args.folds_file is not None:
        folds = folds_lib.load_folds(args.folds_file, samples)
        log.info("data: using the folds in %s", args.folds_file)
    else:
        folds, found = folds_lib.plan_folds(output_dir, samples, args.num_folds, args.seed, args.val_fraction,
                                            data.grouping_of(args), reuse=not args.overwrite)
        made = None if found else folds
    if not 0 <= args.fold < len(folds):
        raise UserError(f"--fold {args.fold} does not exist: the split has {len(folds)} fold(s), "
                        f"numbered 0..{len(folds) - 1}")
    train, val = folds[args.fold]
    if not train or not val:
        raise UserError(f"fold {args.fold} has {len(train)} training and {len(val)} validation samples; "
                        "both are needed to train a detector")
    return list(train), list(val), made


def train_detector(yolo: Any, data_yaml: Path, args: argparse.Namespace, device: str) -> Path:
    """Train ``yolo`` on ``data_yaml`` offline (no AMP check); returns the best weights' path."""
    train_args = dict(data=str(data_yaml), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch_size,
                      device=device, workers=args.num_workers, project=str(args.output_dir.resolve()),
                      name=YOLO_RUN, exist_ok=True, amp=False, plots=not args.no_plots, seed=args.seed,
                      deterministic=True, patience=args.patience, flipud=0.5, verbose=True)
    train_args.update(parse_yolo_args(args.yolo_args))
    runfiles.write_json(args.output_dir / "detect_train_config.json", {**args_record(args), "ultralytics": train_args})
    yolo.train(**train_args)
    weights = Path(yolo.trainer.best)
    return weights if weights.is_file() else Path(yolo.trainer.last)


def run_train(args: argparse.Namespace) -> int:
    """Export the YOLO dataset, train the detector offline, report validation box P/R."""
    if args.epochs < 1 or args.batch_size < 1 or args.imgsz < 32:
        raise UserError("--epochs and --batch_size must be >= 1 and --imgsz >= 32")
    if not 0.0 <= args.conf <= 1.0:
        raise UserError(f"--conf must be in 0..1, got {args.conf}")
    parse_yolo_args(args.yolo_args)  # bad overrides fail before any work
    out = runfiles.OutputDir(args.output_dir, "detect train")
    out.check(args.overwrite, protected=[args.data_dir])
    device = yolo_device(sam_model.resolve_device(args.device))
    yolo = build_yolo(args.yolo_model)  # imports ultralytics offline
    samples = data.load_from_options(args)
    train, val, made = detector_split(args, samples, args.output_dir)  # a bad --fold: refused before any write
    out.claim(args.overwrite, protected=[args.data_dir])
    with out.active("detect_train.log", extra_loggers=("ultralytics",)):
        if made is not None:
            folds_lib.save_folds(args.output_dir, made, samples, seed=args.seed, grouping=data.grouping_of(args))
        data_yaml = export_yolo_dataset(samples, train, val, args.output_dir / DATASET_DIR)
        log.info("YOLO dataset: %d training and %d validation images in %s", len(train), len(val),
                 data_yaml.parent)
        weights = train_detector(yolo, data_yaml, args, device)
        out.add_tree(args.output_dir / YOLO_RUN)  # ultralytics' files, so that --overwrite removes them too
        confs = sorted({args.conf, *REPORT_CONFS})
        counts = validate_detector(load_yolo(weights), [samples[i] for i in val], confs, args.iou,
                                   args.imgsz, device)
        report_validation(counts, args.conf, len(val), weights, args.output_dir / "val_metrics.json")
    return 0


# --------------------------------------------------------------------------------------------
# detect predict
# --------------------------------------------------------------------------------------------
SCALE_TOLERANCE = 1.5  # a tile or YOLO input size this far from the training scale gets a warning


def training_scale(args: argparse.Namespace, adapter: dict[str, Any] | None) -> dict[str, int | None]:
    """The scale the models were trained at: the SAM adapter's patch size (its config), and the
    detector's patch size and YOLO input size (the detect train run's config beside best.pt)."""
    scale: dict[str, int | None] = {"sam_patch": (adapter or {}).get("patch_size") or None,
                                    "detector_patch": None, "detector_imgsz": None}
    if args.mode == "yolo" and args.yolo_model is not None:
        parents = Path(args.yolo_model).resolve().parents  # RUN/yolo/weights/best.pt
        record = parents[2] / "detect_train_config.json" if len(parents) > 2 else None
        if record is not None and record.is_file():
            config = runfiles.read_json(record, "a detect train run")
            scale.update(detector_patch=config.get("patch_size") or None, detector_imgsz=config.get("imgsz"))
    return scale


def tiles_at_training_scale(args: argparse.Namespace, scale: dict[str, int | None]) -> tuple[int, int]:
    """``(tile_size, tile_overlap)``: by default tiles of the training patch size, so that SAM and
    YOLO see objects at the scale they were trained at; a choice far from it is warned about."""
    patch = scale["sam_patch"] or scale["detector_patch"]
    if scale["sam_patch"] and scale["detector_patch"] and _far(scale["sam_patch"], scale["detector_patch"]):
        log.warning("SAM was trained on %d px patches but the detector on %d px patches: tiles of %d px show "
                    "the detector objects at another scale", scale["sam_patch"], scale["detector_patch"], patch)
    tile = args.tile_size if args.tile_size is not None else (patch or 1024)
    if args.tile_size is not None and patch and tile and _far(tile, patch):
        log.warning("--tile_size %d is %.1fx the %d px patches the models were trained on: objects appear at "
                    "another scale than in training (leave --tile_size out to match it)", tile, tile / patch, patch)
    if args.imgsz and scale["detector_imgsz"] and _far(args.imgsz, scale["detector_imgsz"]):
        log.warning("--imgsz %d is %.1fx the %d px the detector was trained at: objects appear at another scale",
                    args.imgsz, args.imgsz / scale["detector_imgsz"], scale["detector_imgsz"])
    overlap = args.tile_overlap if args.tile_overlap is not None else tile // 8
    if patch and args.tile_size is None:
        log.info("tiles of %d px (overlap %d): the training patch size", tile, overlap)
    return tile, overlap


def _far(a: float, b: float) -> bool:
    return max(a, b) > SCALE_TOLERANCE * min(a, b)


def segment_options(args: argparse.Namespace, adapter: dict[str, Any] | None
                    ) -> tuple[SegmentOptions, DetectorOptions, dict[str, int | None]]:
    """The Segmenter's and the detector's options from the flags and the ``--model_path`` adapter's
    config (None without one), and the models' training scale."""
    scale = training_scale(args, adapter)
    tile_size, tile_overlap = tiles_at_training_scale(args, scale)
    options = SegmentOptions(
        mode=args.mode, box_batch=args.box_batch if args.box_batch is not None else
        inference.default_chunk(sam_model.resolve_device(args.device)),
        tile_size=tile_size, tile_overlap=tile_overlap,
        merge_threshold=args.merge_threshold, min_area=args.min_area, precision=args.precision,
        points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
        watershed=watershed_options(args, adapter), write_maps=args.write_maps)
    proposals = DetectorOptions(args.conf, args.iou, args.imgsz or None, args.max_det)
    if args.mode == "yolo" and args.yolo_model is None and args.seed_labels is None:
        raise UserError("--mode yolo needs --yolo_model (the best.pt of `python main.py detect train`); "
                        "or use --mode amg, or --seed_labels")
    return options, proposals, scale


def watershed_options(args: argparse.Namespace, adapter: dict[str, Any] | None) -> WatershedOptions:
    """The seeded watershed's thresholds (AIS; APG's seeds): the ``--model_path`` adapter's
    ``watershed`` (chosen on validation data after training), else micro-sam's defaults; each
    flag given overrides its field."""
    recorded = modes.watershed_of(adapter or {}, args.model_path)  # a damaged record: one line
    known = {f.name for f in fields(WatershedOptions)}
    given = {name: getattr(args, name) for name in known if getattr(args, name) is not None}
    try:
        return dataclasses.replace(recorded, **given)
    except ValueError as exc:
        raise UserError(f"--{exc}") from None


def check_decoder(args: argparse.Namespace, adapter_state: dict[str, Any] | None, bases: adapters.BaseModels) -> None:
    """Refuse ``--mode ais`` / ``apg`` (one line, before anything is written) when neither the
    adapter nor the base model (a combined ``--checkpoint``) holds an instance decoder."""
    if args.mode not in ("ais", "apg") or (adapter_state is not None and adapters.has_decoder(adapter_state)):
        return
    if not bases.carries_decoder():  # no model built here: the segmenter builds it once
        source = f"--model_path {args.model_path} holds no instance decoder" if args.model_path else \
            "no --model_path given and --checkpoint holds no decoder_state"
        raise UserError(f"--mode {args.mode}: {source}; {automatic.NO_DECODER.split(': ', 1)[1]}")


def check_inputs(args: argparse.Namespace) -> list[tuple[Path, tuple[int, int, int] | None]]:
    """``(file, volume shape or None)`` of every input, each readable (a volume's header read;
    its intensity scale is computed once, when it is segmented) before anything is written."""
    checked = []
    for path in volume_io.find_inputs(args.input):
        shape = volume_io.volume_shape(path) if volume_io.is_zarr(path) or images.check_planes(path) else None
        checked.append((path, shape))
    return checked


def link_options(args: argparse.Namespace) -> LinkOptions | None:
    """How a volume's sections are linked (None: ``--no_link``); refuses ``--link_merge`` where
    nothing is linked."""
    unlinked = "--no_link" if args.no_link else "--seed_labels" if args.seed_labels is not None else None
    if args.link_merge and unlinked:
        raise UserError(f"--link_merge joins pieces while linking sections, and {unlinked} links none: "
                        "leave one of them out")
    return None if args.no_link else LinkOptions(args.link_iou, args.link_gap, args.min_sections, args.link_merge)


def predict_inputs(args: argparse.Namespace) -> tuple[list[tuple[Path, Any]], dict[int, np.ndarray] | None]:
    """The checked inputs (:func:`check_inputs`) and, with ``--seed_labels``, the annotated
    sections of the one volume they annotate (read and checked before anything is written)."""
    link_options(args)  # refuses bad linking flags first
    files = check_inputs(args)
    if args.seed_labels is None:
        return files, None
    if args.write_maps:
        raise UserError("--write_maps: objects carried from --seed_labels are drawn by SAM's prompts, not by the "
                        "instance decoder's maps; leave out one of them")
    if len(files) != 1 or files[0][1] is None:
        raise UserError("--seed_labels annotates one volume: give that volume (a TIFF stack or a Zarr array) as --input")
    if args.resume:
        raise UserError("--seed_labels: carrying objects through a volume cannot be resumed; rerun with --overwrite")
    PropagationOptions(args.stop_score, args.stop_iou)  # refuses bad values first
    return files, volume_io.read_seeds(args.seed_labels, files[0][1], args.seed_section)


def predict_options(args: argparse.Namespace) -> PredictOptions:
    """The batch segmentation's options from the parsed flags (checked)."""
    return PredictOptions(
        input=args.input, coco_segmentation=args.coco_segmentation, overlays=not args.no_overlay,
        resume=args.resume, precision=args.precision, link=link_options(args),
        propagation=PropagationOptions(args.stop_score, args.stop_iou),
        description=f"detect predict --mode {args.mode} on {args.input}")


def check_resume(args: argparse.Namespace, out: runfiles.OutputDir, files: list[tuple[Path, Any]],
                 record: dict[str, Any]) -> None:
    """Refuse, before anything is written, an interrupted run met without --resume / --overwrite,
    --resume with nothing to resume, and --resume with other options than the interrupted run's."""
    interrupted = (out.path / stacks.WORK_FOLDER).is_dir()
    if interrupted and not args.resume and not args.overwrite:
        raise UserError(f"{out.path} holds an interrupted detect predict run: --resume continues it from its last "
                        "finished section, --overwrite starts again")
    if args.resume and not interrupted:
        raise UserError(f"--resume: {out.path} holds no interrupted detect predict run of a volume; leave out --resume")
    for path, shape in files if args.resume else ():
        if shape is not None:
            stacks.volume_store(out.path, path, shape, record).resumable(out.path)


def run_predict(args: argparse.Namespace) -> int:
    """Segment ``--input`` and write label TIFFs (Zarr for Zarr input), overlays, one COCO file,
    config and log."""
    adapter_config, adapter_state = adapters.read_adapter(args.model_path) if args.model_path else (None, None)
    adapter_configs = {args.model_path: adapter_config} if args.model_path else {}
    options, proposals, scale = segment_options(args, adapter_config)
    files, seeds = predict_inputs(args)
    out = runfiles.OutputDir(args.output_dir, "detect predict")
    inputs = [args.input] if args.input.is_dir() and not volume_io.is_zarr(args.input) else []
    bases = adapters.bases_from_flags(args.model_type, args.image_size, args.checkpoint, args.device, adapter_configs)
    sam_model.autocast(bases.device, args.precision)  # rejects fp16 on CPU before any work
    check_decoder(args, adapter_state, bases)
    detector = load_detector(args.yolo_model, proposals, bases.device) if args.yolo_model and args.mode == "yolo" else None
    spec = cluster.SegmenterSpec(bases.model_type, None if bases.checkpoint is None else str(bases.checkpoint),
                                 bases.image_size, str(bases.device), None if args.model_path is None else
                                 str(args.model_path), args.seed, options, proposals,
                                 None if args.yolo_model is None else str(args.yolo_model))
    record = {"model_type": bases.model_type, "image_size": bases.image_size, "training_scale": scale,
              "options": {**asdict(options), **asdict(proposals)}}
    sections = {**record, "flags": {k: args_record(args).get(k) for k in SEGMENTATION_FLAGS}}  # what makes a section
    check_resume(args, out, files, sections)
    out.check(args.overwrite, args.resume, protected=inputs)  # outputs in an input folder would become inputs
    client = cluster.client(args.workers, args.scheduler, seeds is not None)  # an unreachable scheduler is refused before anything is written
    if client is not None and bases.device.type == "cpu" and options.precision == "bf16":
        log.warning("bf16 on a CPU: oneDNN's sums depend on the thread count, so the workers' labels may differ "
                    "from one process's near the mask threshold; --precision fp32 gives the same labels")
    out.claim(args.overwrite, args.resume, protected=inputs)
    try:
        with out.active("detect_predict.log"):
            segmenter = spec.build(detector) if detector is not None or args.mode != "yolo" else None
            runfiles.write_json(out.path / "detect_predict_config.json", {**args_record(args), **record})
            sam = segmenter.sam if segmenter is not None else adapters.load_finetuned(bases, args.model_path, args.seed)
            fill = None if client is None else lambda volume, store: cluster.fill_store(client, spec, volume, store)
            total = predict_files(predict_options(args), files, seeds, sam, segmenter, sections, out, fill)
            log.info("%d objects in %d file(s); outputs in %s", total, len(files), out.path)
    finally:
        if client is not None:
            cluster.close(client)
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
    data.add_data_arguments(parser)
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
                          "the folds.json of an earlier detect train there is reused (--folds_file shares a SAM run's)")
    out.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run there")
    parser.set_defaults(func=run_train)


def _add_predict_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="segment images, 3-D TIFF stacks or Zarr volumes: YOLO boxes -> (LoRA-)SAM masks",
        description="Segment an image, a folder of images, a 3-D TIFF stack or a Zarr volume (section by "
                    "section, objects linked into 3-D objects) into instance labels: <stem>_labels.tif (Zarr "
                    "input: <stem>_labels.zarr), <stem>_overlay.png, and coco.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", type=Path, required=True,
                    help="an image, a folder of images, a TIFF stack, or a Zarr / OME-Zarr volume (vol.zarr)")
    io.add_argument("--output_dir", type=Path, default=Path("runs/detect_predict"), help="where outputs go")
    io.add_argument("--overwrite", action="store_true", help="replace existing output files")
    io.add_argument("--coco_segmentation", choices=("rle", "polygon"), default="rle",
                    help="mask encoding in coco.json: compressed RLE (exact) or polygons")
    io.add_argument("--no_overlay", action="store_true", help="skip the overlay PNGs")
    io.add_argument("--min_area", type=int, default=10, help="drop objects with fewer pixels")
    model_options.add_model_arguments(parser, from_adapter=True)
    adapter = parser.add_argument_group("LoRA adapter")
    adapter.add_argument("--model_path", type=Path, default=None, help="LoRA adapter from `train` (omit for the base model)")
    adapter.add_argument("--seed", type=int, default=0,
                         help="seed of random base weights (--checkpoint none) without an adapter; with one, "
                              "the adapter's training seed")
    mode = parser.add_argument_group("prompts")
    mode.add_argument("--mode", choices=MODES, default="yolo",
                      help="yolo = detector boxes prompt SAM; amg = SAM's automatic mask generator (zero-shot); "
                           "ais = the instance decoder's maps (train --instance_decoder) -> seeded watershed; "
                           "apg = one click per seed region of those maps, drawn by SAM's mask decoder")
    mode.add_argument("--yolo_model", type=Path, default=None, help="best.pt from `detect train` (mode yolo)")
    mode.add_argument("--conf", type=float, default=0.1, help="YOLO confidence threshold (low = high recall)")
    mode.add_argument("--iou", type=float, default=0.7, help="YOLO NMS IoU threshold")
    mode.add_argument("--imgsz", type=int, default=0, help="YOLO input side; 0 = the size it was trained at")
    mode.add_argument("--max_det", type=int, default=1000, help="most YOLO boxes per image or tile")
    mode.add_argument("--box_batch", type=int, default=None,
                      help="boxes per SAM decoder call; default: 1 on a CPU, where fewer per call cost less each, "
                           "64 on a GPU")
    mode.add_argument("--points_per_side", type=int, default=32, help="AMG: grid of points per image side")
    mode.add_argument("--points_per_batch", type=int, default=64, help="AMG: points per decoder call")
    mode.add_argument("--pred_iou_thresh", type=float, default=None,
                      help="AMG, APG: keep masks of at least this predicted IoU (default: 0.88 for amg, "
                           "none for apg, as micro-sam's APG)")
    mode.add_argument("--stability_score_thresh", type=float, default=None,
                      help="AMG, APG: keep masks of at least this stability score (default: 0.95 for amg, "
                           "none for apg)")
    shed = parser.add_argument_group(
        "instance decoder (--mode ais / apg): seeded-watershed thresholds; default: the adapter's (chosen on "
        "validation data after training), else micro-sam's (0.5, 0.5, 0.5, smoothing 1.0 / 1.6, min size 0)")
    for name, text in (("center_distance_threshold", "seeds: centre distance below this"),
                       ("boundary_distance_threshold", "seeds: boundary distance below this"),
                       ("foreground_threshold", "foreground: probability above this (APG seeds: at least)"),
                       ("foreground_smoothing", "AIS: Gaussian sigma of the foreground map (0 = none)"),
                       ("distance_smoothing", "AIS: Gaussian sigma of the distance maps (0 = none)")):
        shed.add_argument(f"--{name}", type=float, default=None, help=text)
    shed.add_argument("--min_size", type=int, default=None,
                      help="AIS: watershed objects with fewer pixels are removed (--min_area then applies to all modes)")
    shed.add_argument("--write_maps", action="store_true",
                      help="also write the decoder's maps (foreground, centre distance, boundary distance) as "
                           "<stem>_maps.tif, float32, channels first: 3xHxW for an image, Zx3xHxW for a stack")
    volume = parser.add_argument_group("volumes (TIFF stacks, Zarr): read, segmented and written section by section")
    volume.add_argument("--no_link", action="store_true",
                        help="keep per-section objects (numbered on through the stack) instead of linking them "
                             "into 3-D objects")
    add_link_arguments(volume)
    volume.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in --output_dir from its last finished section "
                             "(same options)")
    volume.add_argument("--workers", type=int, default=0,
                        help="segment the sections on a local dask cluster of this many worker processes, each "
                             "loading the models once (0 = in this process); linking runs after, in order")
    volume.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="segment the sections on the workers of an existing dask scheduler (e.g. "
                             "tcp://host:8786, started by dask-jobqueue on SLURM / LSF); they need this project "
                             "and its packages")
    seeds = parser.add_argument_group("annotated objects carried through a volume (micro-sam's segment_mask_in_volume)")
    seeds.add_argument("--seed_labels", type=Path, default=None,
                       help="a label stack of the volume's shape (or one label image, with --seed_section) with "
                            "objects annotated in some sections, zeros elsewhere: each object is carried up and "
                            "down the volume, its mask in one section prompting the next (box and mask); with "
                            "--yolo_model the detector's objects in the annotated sections join them")
    seeds.add_argument("--seed_section", type=int, default=None,
                       help="the section a single --seed_labels image annotates")
    seeds.add_argument("--stop_score", type=float, default=PropagationOptions.stop_score,
                       help="a carried object stops where SAM's predicted IoU falls below this")
    seeds.add_argument("--stop_iou", type=float, default=PropagationOptions.stop_iou,
                       help="... or where its mask overlaps the previous section's with an IoU below this")
    tiles = parser.add_argument_group("tiling of large images")
    tiles.add_argument("--tile_size", type=int, default=None,
                       help="segment images larger than this in tiles of this side (original pixels); 0 = never; "
                            "default: the patch size the models were trained on (so objects appear at the "
                            "training scale), else 1024")
    tiles.add_argument("--tile_overlap", type=int, default=None,
                       help="pixels shared by neighbouring tiles (default: an eighth of the tile); ais / apg keep each "
                            "tile's maps on its inner part, the seams in the middle of the overlaps (a halo of "
                            "half of it), and stitch them before the watershed")
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
