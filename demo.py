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
import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn
from tqdm import tqdm

from samlora.core import figures, runfiles
from samlora.core.errors import UserError
from samlora.data import dataset as data
from samlora.data.instances import box_baseline
from samlora.data.prompts import object_prompts
from samlora.data.readers import detect_format
from samlora.data.sample import Sample
from samlora.inference import segmenter
from samlora.metrics import scores as metrics
from samlora.models import adapters, model_options
from samlora.models import sam as sam_model

log = logging.getLogger(__name__)

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
OUTPUT_FORMAT = "samlora-demo"
LOG_FILE = "demo.log"
BASE, FINETUNED, BASELINE = "base SAM", "fine-tuned", "box baseline"


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
    batch_prompts: int | None
    seed: int



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
    model_options.add_model_arguments(parser, from_adapter=True)
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
    group.add_argument("--batch_prompts", type=int, default=None,
                       help="box prompts per decoder call; default: 1 on a CPU, 64 on a GPU")
    group.add_argument("--seed", type=int, default=0, help="seed of the random weights (--checkpoint none)")
    parser.set_defaults(func=run)
    return parser


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------
def load_samples(samples_dir: Path, num_samples: int = 0) -> list[Sample]:
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
        detect_format(samples_dir)
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


def sample_name(sample: Sample) -> str:
    """``<tag> <image stem>``, e.g. ``em vnc_section02_y512_x64``, with the slice (and patch
    position) when a file holds several samples, so every sample has a name of its own."""
    name = f"{sample.tag} {Path(sample.source).stem}"
    if sample.slice_index is not None:
        name += f" slice {sample.slice_index}"
    return name + (f" @{sample.offset[0]},{sample.offset[1]}" if sample.is_patch else "")


def _file_name(index: int, sample: Sample) -> str:
    return f"{index:02d}_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", sample_name(sample)).strip("_")[:80] + ".png"


# --------------------------------------------------------------------------------------------
# Models and prediction
# --------------------------------------------------------------------------------------------
def build_models(bases: adapters.BaseModels, adapter: Path | None, seed: int) -> dict[str, nn.Module]:
    """``{"base SAM": model[, "fine-tuned": the model with the adapter]}`` in eval mode.

    With random weights and an adapter, the base is drawn from the adapter's training seed, so
    the fine-tuned model sits on the base it was trained on (adapters.load_finetuned).
    """
    seed = int(adapters.read_adapter(adapter)[0].get("seed", seed)) if adapter is not None else seed
    models = {BASE: adapters.load_finetuned(bases, None, seed)}
    if adapter is not None:
        models[FINETUNED] = adapters.load_finetuned(bases, adapter, seed)
    return models


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Segment the samples with every model, write the figures, dice.csv and summary."""
    if args.num_samples < 0:
        raise UserError(f"--num_samples must be 0 (all) or positive, got {args.num_samples}")
    if args.batch_prompts is not None and args.batch_prompts < 1:
        raise UserError(f"--batch_prompts must be at least 1, got {args.batch_prompts}")
    adapter_configs = {args.model_path: adapters.read_adapter(args.model_path)[0]} if args.model_path else {}
    bases = adapters.bases_from_flags(args.model_type, args.image_size, args.checkpoint, args.device, adapter_configs)
    sam_model.autocast(bases.device, args.precision)  # rejects fp16 on CPU before any work
    samples_dir = args.samples_dir if args.samples_dir is not None else SAMPLES_DIR
    samples = load_samples(samples_dir, args.num_samples)
    out = runfiles.OutputDir(args.output_dir, "demo")
    out.check(args.overwrite, protected=[samples_dir])
    models = build_models(bases, args.model_path, args.seed)
    config = DemoConfig(str(samples_dir), [s.key for s in samples], bases.model_type, bases.image_size,
                        None if bases.checkpoint is None else str(bases.checkpoint), bases.sha256,
                        bases.random_weights, None if args.model_path is None else str(args.model_path),
                        args.precision, args.batch_prompts, args.seed)
    out.claim(args.overwrite, protected=[samples_dir])
    with out.active(LOG_FILE):
        log.info("%d samples from %s; %s at %d px, base weights %s%s", len(samples), samples_dir,
                 bases.model_type, bases.image_size,
                 "RANDOM (--checkpoint none)" if bases.random_weights else bases.checkpoint,
                 f", adapter {args.model_path}" if args.model_path else "")
        rows, predictions = predict_all(models, samples, args.batch_prompts or segmenter.default_chunk(bases.device),
                                        args.precision,
                                        progress=not getattr(args, "quiet", False))
        write_outputs(out.path, samples, predictions, rows, config)
        for line in format_table(rows, list(models) + [BASELINE]):
            log.info("%s", line)
        if bases.random_weights:
            log.warning("RANDOM WEIGHTS (--checkpoint none): these figures show the plumbing, not SAM; "
                        "run `python main.py download --model_type %s` for real results", bases.model_type)
        log.info("wrote %d figures, dice.csv and summary.json to %s", len(samples) + 1, out.path)
    return 0


def predict_all(models: dict[str, nn.Module], samples: Sequence[Sample], chunk: int, precision: str,
                progress: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, np.ndarray]]]:
    """Every model (and the box baseline) on every sample: Dice rows and the instance maps.

    Every ground-truth object is prompted with its exact box (prompts.object_prompts, as
    ``evaluate --prompt box``); ``progress``: a tqdm bar per model on a terminal.
    """
    prompts = [object_prompts(s.labels) for s in samples]
    predictions: list[dict[str, np.ndarray]] = [{} for _ in samples]
    for name, sam in models.items():
        for i in tqdm(range(len(samples)), desc=f"demo {name}", unit="image", leave=False,
                      disable=None if progress else True):
            predictions[i][name] = segmenter.segment(sam, samples[i].image, prompts[i], chunk, precision)
    rows = []
    for i, sample in enumerate(samples):
        predictions[i][BASELINE] = box_baseline(prompts[i].boxes, sample.labels.shape, "box", prompts[i].object_ids)
        for name, pred in predictions[i].items():
            scores = metrics.semantic_metrics(sample.labels, pred)
            rows.append({"sample": sample_name(sample), "image": sample.source, "tag": sample.tag,
                         "n_objects": sample.num_objects, "model": name,
                         "dice": round(float(scores["dice"]), 6), "iou": round(float(scores["iou"]), 6)})
    return rows, predictions


def write_outputs(out: Path, samples: Sequence[Sample], predictions: Sequence[dict[str, np.ndarray]],
                  rows: Sequence[dict[str, Any]], config: DemoConfig) -> None:
    """The per-sample figures, summary.png, dice.csv, config.json and summary.json."""
    dice = {(r["sample"], r["model"]): r["dice"] for r in rows}
    model_names = [m for m in predictions[0] if m != BASELINE] if predictions else []
    where = f"{config.model_type} at {config.image_size} px, box prompts from the ground truth"
    for i, (sample, preds) in enumerate(zip(samples, predictions), start=1):
        name = sample_name(sample)
        panels = [figures.Panel("image"),
                  figures.Panel(f"ground truth ({sample.num_objects} objects)", sample.labels)]
        panels += [figures.Panel(f"{m}: Dice {dice[(name, m)]:.3f}", preds[m]) for m in model_names]
        figures.save_side_by_side(out / _file_name(i, sample), sample.image, panels, f"{name} - {where}",
                                  config.random_weights)
    table = {_short_label(i, s): {m: {"mean": dice[(sample_name(s), m)]} for m in model_names + [BASELINE]}
             for i, s in enumerate(samples, start=1)}
    table["mean"] = {m: {"mean": float(np.mean([dice[(sample_name(s), m)] for s in samples]))}
                     for m in model_names + [BASELINE]}
    figures.save_grouped_bars(out / "summary.png", table, "Dice (foreground)", f"Dice per sample\n{where}",
                              config.random_weights, baselines=(BASELINE,))
    runfiles.write_csv(out / "dice.csv", rows, list(rows[0]))
    runfiles.write_json(out / "config.json", dataclasses.asdict(config))
    summary = {"format": OUTPUT_FORMAT, "version": 1, "random_weights": config.random_weights,
               "mean_dice": {m: table["mean"][m]["mean"] for m in model_names + [BASELINE]},
               "per_sample": {sample_name(s): {m: dice[(sample_name(s), m)] for m in model_names + [BASELINE]}
                              for s in samples}}
    runfiles.write_json(out / "summary.json", summary)


def _short_label(index: int, sample: Sample) -> str:
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
