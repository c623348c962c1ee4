"""``python main.py demo``: base SAM (and a fine-tuned adapter) on the real samples shipped here.

With no arguments it segments the small EM and nuclei crops in ``samples/`` (see
``samples/README.md`` for their provenance and licences) with the base model from ``weights/``:
every ground-truth object is prompted with its bounding box, as ``evaluate --prompt box`` does,
and the prediction is scored with the foreground Dice (:func:`metrics.semantic_metrics`).
``--model_path`` adds a LoRA adapter written by ``train`` as a fourth panel, "fine-tuned".
``--checkpoint none`` runs with random weights (no download needed) and every figure says so.

Writes to ``--output_dir``:
``NN_<tag>_<image>.png`` (image | ground truth | base SAM | fine-tuned, the Dice of each),
``summary.png`` (Dice per sample and model, beside the filled-box baseline), ``dice.csv``,
``summary.json``, ``config.json`` and ``demo.log``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import dataset as data
import figures
import lora
import metrics
import model as sam_model
from errors import UserError
from runlog import log_to_file

log = logging.getLogger(__name__)

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
OUTPUT_FORMAT = "samlora-demo"
LOG_FILE = "demo.log"
BASE, FINETUNED, BASELINE = "base SAM", "fine-tuned", "box baseline"
DEFAULT_IMAGE_SIZE = 1024


@dataclass
class DemoConfig:
    """What defines a demo run; written to ``config.json``."""

    samples_dir: str
    samples: list[str]
    model_type: str
    image_size: int
    checkpoint: str | None
    checkpoint_sha256: str | None
    random_weights: bool
    model_path: str | None
    precision: str
    batch_prompts: int
    seed: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``demo`` on the top-level parser."""
    parser = subparsers.add_parser(
        "demo", help="segment the bundled real EM and nuclei samples and draw figures",
        description="Segment the small real EM and nuclei images shipped in samples/ with box prompts "
                    "from their ground truth, using the base model (and a fine-tuned LoRA adapter with "
                    "--model_path), and draw one figure per sample and a Dice summary. Example: "
                    "python main.py demo (needs weights/, see `python main.py download`), or "
                    "python main.py demo --checkpoint none (random weights, no download).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sam_model.add_model_arguments(parser)
    for action in parser._actions:  # noqa: SLF001 - the shared option's default differs here
        if action.dest == "image_size":
            action.default = None
            action.help = (f"model input side in px ({', '.join(map(str, sam_model.SUPPORTED_IMAGE_SIZES))}); "
                           f"default: the adapter's, else {DEFAULT_IMAGE_SIZE} (vit_t: a few seconds per "
                           "image on a laptop CPU; 256 is much faster and coarser)")
    group = parser.add_argument_group("demo")
    group.add_argument("--model_path", type=Path, default=None,
                       help="a LoRA adapter written by train (RUN/fold_0/best.pt): adds a 'fine-tuned' panel")
    group.add_argument("--samples_dir", type=Path, default=None,
                       help="folder of sample datasets (each sub-folder any layout train reads, e.g. "
                            "images/ + masks/); default: the samples/ shipped with this repository")
    group.add_argument("--num_samples", type=int, default=0,
                       help="how many samples to segment, taken in turn from each sub-folder (0 = all)")
    group.add_argument("--output_dir", type=Path, default=Path("runs/demo"),
                       help="where the figures, dice.csv and demo.log go")
    group.add_argument("--overwrite", action="store_true",
                       help="replace the outputs of an earlier demo in --output_dir")
    group.add_argument("--batch_prompts", type=int, default=64, help="box prompts decoded together")
    group.add_argument("--seed", type=int, default=0, help="seed of the random weights (--checkpoint none)")
    parser.set_defaults(func=run)
    return parser


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------
def load_samples(samples_dir: Path, num_samples: int = 0) -> list[data.Sample]:
    """The labelled samples of every dataset folder in ``samples_dir``, interleaved.

    ``samples_dir`` is one dataset (any layout :func:`dataset.load_dataset` reads) or a folder
    of them (``samples/em``, ``samples/nuclei``); taking them in turn means the first few
    samples already show every kind. Samples without objects are left out (nothing to prompt).
    """
    samples_dir = Path(samples_dir).expanduser()
    if not samples_dir.is_dir():
        raise UserError(f"samples folder {samples_dir} does not exist; leave out --samples_dir to use "
                        "the bundled samples/ (restore them with `git checkout samples`)")
    subdirs = sorted(p for p in samples_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    try:
        data.detect_format(samples_dir)
        folders = [samples_dir]
    except UserError:
        folders = subdirs
    if not folders:
        raise UserError(f"no sample datasets in {samples_dir}: expected sub-folders with images/ and "
                        "masks/ (like the bundled samples/)")
    per_folder = []
    for folder in folders:
        labelled = [s for s in data.load_dataset(folder) if s.num_objects > 0]
        if labelled:
            per_folder.append(labelled)
    if not per_folder:
        raise UserError(f"no labelled object in any mask under {samples_dir}: the demo prompts SAM "
                        "with the ground-truth boxes")
    interleaved = [s for group in _zip_longest(per_folder) for s in group]
    return interleaved[:num_samples] if num_samples else interleaved


def _zip_longest(lists: Sequence[Sequence[Any]]) -> list[list[Any]]:
    return [[lst[i] for lst in lists if i < len(lst)] for i in range(max(len(lst) for lst in lists))]


def sample_name(sample: data.Sample) -> str:
    """``<tag> <image stem>``, e.g. ``em vnc_section02_y512_x64``."""
    return f"{sample.tag} {Path(sample.source).stem}"


def _file_name(index: int, sample: data.Sample) -> str:
    return f"{index:02d}_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", sample_name(sample)).strip("_")[:80] + ".png"


# --------------------------------------------------------------------------------------------
# Models and prediction
# --------------------------------------------------------------------------------------------
def resolve_model_options(args: argparse.Namespace, adapter: dict[str, Any] | None) -> tuple[str, int]:
    """``(model_type, image_size)``: an adapter's values must agree with the flags."""
    model_type, image_size = args.model_type, args.image_size
    if adapter is not None:
        if adapter.get("model_type") and adapter["model_type"] != model_type:
            raise UserError(f"{args.model_path} is an adapter for {adapter['model_type']} but --model_type "
                            f"is {model_type}: pass --model_type {adapter['model_type']}")
        size = adapter.get("image_size")
        if size and image_size is not None and int(size) != image_size:
            raise UserError(f"{args.model_path} was trained at --image_size {size} but --image_size is "
                            f"{image_size}: pass --image_size {size} (or leave it out)")
        image_size = image_size or (int(size) if size else None)
    return model_type, image_size or DEFAULT_IMAGE_SIZE


def build_models(model_type: str, checkpoint: Path | None, image_size: int, device: torch.device,
                 adapter_path: Path | None, adapter: dict[str, Any] | None, seed: int) -> dict[str, nn.Module]:
    """``{"base SAM": model[, "fine-tuned": model with the adapter merged]}`` in eval mode.

    With random weights the base is drawn from the adapter's training seed (as the trainer
    drew it), so the fine-tuned model sits on the base it was trained on.
    """
    if checkpoint is None and adapter is not None:
        seed = int(adapter.get("seed", seed))
    torch.manual_seed(seed)
    base = sam_model.build_model(model_type, checkpoint, image_size)
    base.random_weights = checkpoint is None
    models = {BASE: base}
    if adapter_path is not None:
        expected = next((adapter[k] for k in ("base_checkpoint_sha256", "checkpoint_sha256") if adapter.get(k)), None)
        if expected != base.checkpoint_sha256:
            have = f"{base.checkpoint_sha256[:12]}..." if base.checkpoint_sha256 else "random weights"
            want = f"{expected[:12]}..." if expected else "random weights"
            log.warning("%s was trained on base weights %s but the base model here has %s: the fine-tuned "
                        "panel may be meaningless (pass the training's --checkpoint)", adapter_path, want, have)
        tuned = copy.deepcopy(base)
        lora.load_adapter(adapter_path, tuned)
        lora.merge_lora(tuned)
        models[FINETUNED] = tuned
    return {name: m.to(device).eval() for name, m in models.items()}


@torch.no_grad()
def segment_with_boxes(sam: nn.Module, image: np.ndarray, prompts: data.Prompts, chunk: int = 64,
                       precision: str = "fp32") -> np.ndarray:
    """One encoder pass, the box prompts decoded ``chunk`` at a time -> ``HxW`` int32 instances.

    Each mask keeps its object's ground-truth id (colours match in the figures); where masks
    overlap the pixel goes to the higher predicted IoU.
    """
    labels = np.zeros(image.shape[:2], np.int32)
    best = np.full(image.shape[:2], -np.inf, np.float32)
    if len(prompts) == 0:
        return labels
    device = next(sam.parameters()).device
    with sam_model.autocast(device, precision):
        prepared = sam_model.prepare_image(image, sam.image_encoder.img_size)
        embedding = sam_model.encode_images(sam, prepared.tensor[None].to(device))
        for start in range(0, len(prompts), chunk):
            part = slice(start, start + chunk)
            masks, scores, _ = sam_model.predict(sam, image, boxes=prompts.boxes[part], image_embedding=embedding)
            for mask, score, obj in zip(masks, scores, prompts.object_ids[part]):
                wins = mask & (np.float32(score) >= best)
                labels[wins] = obj
                best[wins] = score
    return labels


def box_baseline(shape: tuple[int, int], prompts: data.Prompts) -> np.ndarray:
    """The trivial prediction: every prompt box filled (``HxW`` int32, the objects' ids)."""
    labels = np.zeros(shape, np.int32)
    for (x0, y0, x1, y1), obj in zip(prompts.boxes.round().astype(int), prompts.object_ids):
        labels[y0:y1 + 1, x0:x1 + 1] = obj
    return labels


def ground_truth_boxes(sample: data.Sample) -> data.Prompts:
    """One exact (unjittered) box per ground-truth object of ``sample``."""
    return data.sample_prompts(sample.labels, np.random.default_rng(0), prompt="box", num_points=0,
                               box_jitter=0.0, max_objects=0)


# --------------------------------------------------------------------------------------------
# Output directory
# --------------------------------------------------------------------------------------------
def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse an output directory that holds files unless ``overwrite``; changes nothing."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir} exists and is not a directory; choose another path")
    if not output_dir.is_dir() or not any(output_dir.iterdir()) or overwrite:
        return
    found = ", ".join(sorted(p.name for p in output_dir.iterdir())[:4])
    raise UserError(f"--output_dir {output_dir} already holds files ({found}): pass --overwrite to replace "
                    "an earlier demo's outputs, or choose another --output_dir (nothing was written)")


def clear_previous(output_dir: Path) -> None:
    """Remove the files an earlier demo listed in its summary.json (other files stay)."""
    try:
        record = json.loads((output_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(record, dict) or record.get("format") != OUTPUT_FORMAT:
        return
    root = output_dir.resolve()
    for name in record.get("files", []):
        path = (output_dir / str(name)).resolve()
        if root in path.parents and path.is_file() and path.name != LOG_FILE:
            path.unlink()


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Segment the samples with every model, write the figures, dice.csv and summary."""
    if args.num_samples < 0:
        raise UserError(f"--num_samples must be 0 (all) or positive, got {args.num_samples}")
    if args.batch_prompts < 1:
        raise UserError(f"--batch_prompts must be at least 1, got {args.batch_prompts}")
    adapter = lora.read_adapter(args.model_path)[0] if args.model_path is not None else None
    model_type, image_size = resolve_model_options(args, adapter)
    if image_size not in sam_model.SUPPORTED_IMAGE_SIZES:
        raise UserError(f"image size {image_size} is not supported: choose one of {sam_model.SUPPORTED_IMAGE_SIZES}")
    checkpoint = sam_model.resolve_checkpoint(model_type, args.checkpoint)  # no weights: the download command
    device = sam_model.resolve_device(args.device)
    sam_model.autocast(device, args.precision)  # rejects fp16 on CPU before any work
    samples_dir = args.samples_dir if args.samples_dir is not None else SAMPLES_DIR
    samples = load_samples(samples_dir, args.num_samples)
    out: Path = args.output_dir
    check_output_dir(out, args.overwrite)
    models = build_models(model_type, checkpoint, image_size, device, args.model_path, adapter, args.seed)
    random_weights = checkpoint is None
    config = DemoConfig(str(samples_dir), [s.key for s in samples], model_type, image_size,
                        None if checkpoint is None else str(checkpoint), models[BASE].checkpoint_sha256,
                        random_weights, None if args.model_path is None else str(args.model_path),
                        args.precision, args.batch_prompts, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    clear_previous(out)
    with log_to_file(out / LOG_FILE):
        log.info("%d samples from %s; %s at %d px, base weights %s%s", len(samples), samples_dir,
                 model_type, image_size, "RANDOM (--checkpoint none)" if random_weights else checkpoint,
                 f", adapter {args.model_path}" if args.model_path else "")
        rows, predictions = predict_all(models, samples, args.batch_prompts, args.precision,
                                        progress=not getattr(args, "quiet", False))
        files = write_outputs(out, samples, predictions, rows, config)
        for line in format_table(rows, list(models) + [BASELINE]):
            log.info("%s", line)
        if random_weights:
            log.warning("RANDOM WEIGHTS (--checkpoint none): these figures show the plumbing, not SAM; "
                        "run `python main.py download --model_type %s` for real results", model_type)
        log.info("wrote %d figures, dice.csv and summary.json to %s", len(samples) + 1, out)
        log.debug("files: %s", ", ".join(files))
    return 0


def predict_all(models: dict[str, nn.Module], samples: Sequence[data.Sample], chunk: int, precision: str,
                progress: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, np.ndarray]]]:
    """Every model (and the box baseline) on every sample: Dice rows and the instance maps.

    ``progress``: a tqdm bar per model on a terminal (``--quiet`` turns it off).
    """
    prompts = [ground_truth_boxes(s) for s in samples]
    predictions: list[dict[str, np.ndarray]] = [{} for _ in samples]
    for name, sam in models.items():
        for i in tqdm(range(len(samples)), desc=f"demo {name}", unit="image", leave=False,
                      disable=None if progress else True):
            predictions[i][name] = segment_with_boxes(sam, samples[i].image, prompts[i], chunk, precision)
    rows = []
    for i, sample in enumerate(samples):
        predictions[i][BASELINE] = box_baseline(sample.labels.shape, prompts[i])
        for name, pred in predictions[i].items():
            scores = metrics.semantic_metrics(sample.labels, pred)
            rows.append({"sample": sample_name(sample), "image": sample.source, "tag": sample.tag,
                         "n_objects": sample.num_objects, "model": name,
                         "dice": round(float(scores["dice"]), 6), "iou": round(float(scores["iou"]), 6)})
    return rows, predictions


def write_outputs(out: Path, samples: Sequence[data.Sample], predictions: Sequence[dict[str, np.ndarray]],
                  rows: Sequence[dict[str, Any]], config: DemoConfig) -> list[str]:
    """The per-sample figures, summary.png, dice.csv, config.json and summary.json."""
    dice = {(r["sample"], r["model"]): r["dice"] for r in rows}
    model_names = [m for m in predictions[0] if m != BASELINE] if predictions else []
    where = f"{config.model_type} at {config.image_size} px, box prompts from the ground truth"
    files = []
    for i, (sample, preds) in enumerate(zip(samples, predictions), start=1):
        name = sample_name(sample)
        panels = [figures.Panel("image"),
                  figures.Panel(f"ground truth ({sample.num_objects} objects)", sample.labels)]
        panels += [figures.Panel(f"{m}: Dice {dice[(name, m)]:.3f}", preds[m]) for m in model_names]
        path = figures.save_side_by_side(out / _file_name(i, sample), sample.image, panels,
                                         f"{name} - {where}", config.random_weights)
        files.append(path.name)
    table = {_short_label(i, s): {m: {"mean": dice[(sample_name(s), m)]} for m in model_names + [BASELINE]}
             for i, s in enumerate(samples, start=1)}
    table["mean"] = {m: {"mean": float(np.mean([dice[(sample_name(s), m)] for s in samples]))}
                     for m in model_names + [BASELINE]}
    figures.save_grouped_bars(out / "summary.png", table, "Dice (foreground)", f"Dice per sample\n{where}",
                              config.random_weights, baselines=(BASELINE,))
    files.append("summary.png")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (out / "dice.csv").write_text(buffer.getvalue(), encoding="utf-8")
    (out / "config.json").write_text(json.dumps(config.to_json(), indent=1) + "\n", encoding="utf-8")
    files += ["dice.csv", "config.json", "summary.json", LOG_FILE]
    summary = {"format": OUTPUT_FORMAT, "version": 1, "random_weights": config.random_weights,
               "mean_dice": {m: table["mean"][m]["mean"] for m in model_names + [BASELINE]},
               "per_sample": {sample_name(s): {m: dice[(sample_name(s), m)] for m in model_names + [BASELINE]}
                              for s in samples},
               "files": files}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return files


def _short_label(index: int, sample: data.Sample) -> str:
    """``1 em\\nvnc_section02`` style x-axis label (the full names are in dice.csv)."""
    stem = re.sub(r"_y\d+_x\d+$", "", Path(sample.source).stem)  # the crop offsets of the bundled samples
    return f"{index} {sample.tag}\n{stem[:13].rstrip('-_')}"


def format_table(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> list[str]:
    """The logged table: Dice of each model per sample, and the mean."""
    samples = list(dict.fromkeys(r["sample"] for r in rows))
    dice = {(r["sample"], r["model"]): r["dice"] for r in rows}
    width = max(len(s) for s in samples) if samples else 6
    lines = [f"{'sample':<{width}}  " + "  ".join(f"{n:>12}" for n in names)]
    for s in samples:
        lines.append(f"{s:<{width}}  " + "  ".join(f"{dice[(s, n)]:>12.3f}" for n in names))
    lines.append(f"{'mean Dice':<{width}}  " + "  ".join(
        f"{np.mean([dice[(s, n)] for s in samples]):>12.3f}" for n in names))
    return lines
