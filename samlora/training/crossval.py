"""Unbiased cross-validation: folds, an inner selection split per fold, the outer estimate, the final fit.

Each outer fold trains on its training groups less an inner validation split carved from them
(grouped like the folds, with the same gap around volume sections); the epoch (best checkpoint,
early stopping) is chosen on that inner split alone. The chosen checkpoint is then scored once on
the outer fold: the per-image Dice over all outer folds is the cross-validated estimate
(``summary.json`` ``cv_estimate``: mean, standard deviation, a bootstrap 95 % interval resampling
whole fold groups, with its ``unit`` and ``n_groups``).
``--final_fit`` retrains on all training data for as many optimiser steps as a fold took to its
chosen checkpoint, on a fold's schedule (``final/best.pt``, the model ``--export_merged`` exports,
scored again as exported), and scores it once on a fixed test split when there is one.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from samlora.core import runfiles
from samlora.core.errors import UserError
from samlora.data import dataset as data
from samlora.data import folds as folds_lib
from samlora.data.sample import Sample
from samlora.metrics import bootstrap
from samlora.models import adapters, checkpoints, instance_decoder, lora
from samlora.models import sam as sam_model
from samlora.training import items, runs, trainer
from samlora.training.config import TrainConfig
from samlora.training.fold_plan import FoldPlan, FoldResources, StepPlan

log = logging.getLogger(__name__)


def plan_folds(config: TrainConfig, samples: Sequence[Sample], resume: bool) -> list[folds_lib.Fold]:
    """The run's outer folds, written nowhere yet (same on every process): read from its
    folds.json when resuming, else made afresh. Called before the output directory is claimed."""
    return folds_lib.plan_folds(config.output_dir, samples, config.num_splits, config.seed, config.val_fraction,
                                folds_lib.grouping_of(config), reuse=resume)[0]


def inner_split(config: TrainConfig, samples: Sequence[Sample], train_idx: Sequence[int],
                fold: int) -> tuple[list[int], list[int]]:
    """(training, selection) indices carved from a fold's training indices, grouped and gapped like
    the folds (``--val_fraction`` of them). With fewer than two groups there is nothing to carve:
    all of it trains and the last epoch is kept (logged)."""
    try:
        return folds_lib.make_holdout(samples, config.val_fraction, seed=config.seed + 1000 + fold,
                                      grouping=folds_lib.grouping_of(config), pool=train_idx)
    except UserError as exc:
        log.warning("fold %d: no inner validation split (%s): the last epoch is kept", fold, exc)
        return list(train_idx), []


def estimate(scored: Sequence[dict[str, Any]], samples: Sequence[Sample], grouping: folds_lib.Grouping,
             n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean, standard deviation and bootstrap 95 % interval of per-image Dice and IoU (rows with
    the sample ``index``), and of the AIS mSA (``ais_msa``) when every row has one (``train
    --instance_decoder``), resampling whole fold groups: the ``unit`` and ``n_groups`` recorded."""
    groups = [grouping.group(samples[r["index"]]) for r in scored]
    keys = ("dice", "iou") + (("ais_msa",) if scored and all("ais_msa" in r for r in scored) else ())
    return {"n_images": len(scored), "unit": grouping.unit(), "n_groups": len(set(groups)),
            **{key: bootstrap.summarize([r[key] for r in scored], n_boot=n_boot, seed=seed, groups=groups)
               for key in keys}}


def summarize(results: Sequence[dict[str, Any]], samples: Sequence[Sample], grouping: folds_lib.Grouping,
              seed: int = 0) -> dict[str, Any]:
    """The run's summary: per fold, and the cross-validated estimate over all outer images."""
    scored = [r for result in results for r in result["scored"]]
    per_fold = [{"fold": r["fold"], "n_images": len(r["scored"]),
                 "dice": float(np.mean([s["dice"] for s in r["scored"]])) if r["scored"] else None,
                 **({"ais_msa": float(np.mean([s["ais_msa"] for s in r["scored"]])) if r["scored"] else None,
                     "watershed": r["watershed"]} if "watershed" in r else {}),
                 "best_epoch": r["best_epoch"], "selection": r["selection"]} for r in results]
    return {"folds": list(results),
            "cv_estimate": {**estimate(scored, samples, grouping, seed=seed), "per_fold": per_fold,
                            "protocol": "each fold's checkpoint chosen on an inner split of its training "
                                        "groups, then scored once on the outer fold's images"}}


def run_training(config: TrainConfig, samples: Sequence[Sample], device: torch.device, num_workers: int = 0,
                 folds: Sequence[folds_lib.Fold] | None = None, cache_dir: Path | None = None,
                 cache_memory_gb: float = float("inf"), embeddings: dict[str, torch.Tensor] | None = None,
                 after_fold: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train every fold (finished ones are read from ``done.json``), write the summary, and with
    ``config.final_fit`` the final model. ``embeddings``: a frozen encoder's cache to share with
    other runs on the same images and base model (a parameter search). ``after_fold(fold,
    result)`` is called after each fold, finished earlier or not; an exception it raises (a
    pruned configuration) stops the run before the next fold."""
    out = Path(config.output_dir)
    dist_info = trainer.Distributed.setup(device)
    if dist_info.world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    checkpoint = checkpoints.resolve_checkpoint(config.model_type, config.checkpoint, announce=False)
    folds = folds if folds is not None else plan_folds(config, samples, resume=True)
    data.log_summary(samples, folds, folds_lib.grouping_of(config))
    lost = items.cached_augmentation(config)
    if lost and dist_info.rank == 0:
        log.warning(lost)
    if dist_info.rank == 0:
        if not (out / folds_lib.FOLDS_FILE).is_file():
            folds_lib.save_folds(out, folds, samples, seed=config.seed, grouping=folds_lib.grouping_of(config))
        runfiles.write_json(out / runs.CONFIG_FILE, {**config.to_json(), runfiles.SCHEMA: runs.CONFIG_SCHEMA})
    embeddings = {} if embeddings is None else embeddings  # frozen encoder: each image embedded once
    shared = FoldResources(checkpoint, device, num_workers, dist_info.rank, dist_info.world, cache_dir, embeddings,
                           cache_memory_gb * 2**30)
    results = []
    for fold, (train_idx, val_idx) in enumerate(folds):
        done = runs.fold_dir(out, fold) / "done.json"
        if done.is_file():
            results.append(runfiles.read_json(done, "a finished fold"))
            log.info("fold %d: already finished", fold)
        else:
            fit, select = inner_split(config, samples, train_idx, fold)
            results.append(trainer.run_fold(config, samples, FoldPlan.outer(out, fold, fit, select, val_idx), shared))
        if after_fold is not None:
            after_fold(fold, results[-1])
    summary = summarize(results, samples, folds_lib.grouping_of(config), config.seed)
    if config.final_fit:
        summary.update(final_fit(config, samples, results, len(folds), shared))
    summary["config"] = config.to_json()
    if dist_info.rank == 0:
        runfiles.write_json(out / runs.SUMMARY_FILE, summary)
        log_summary(summary)
    return summary


def final_steps(config: TrainConfig, results: Sequence[dict[str, Any]], world: int = 1) -> StepPlan:
    """The final fit's optimiser steps: as many as a fold took to its chosen checkpoint (the median
    over the folds), on a fold's schedule (warm-up and cosine over a fold's ``--epochs``). The
    final fit has more images per epoch than a fold, so the chosen epoch count would take more
    steps, on another schedule."""
    per_epoch = [trainer.epoch_steps(r["train_size"], config.batch_size, world) for r in results]
    chosen = round(float(np.median([(r["best_epoch"] + 1) * n for r, n in zip(results, per_epoch)])))
    schedule = round(float(np.median(per_epoch))) * config.epochs
    return StepPlan(schedule=max(schedule, chosen, 1), stop=max(chosen, 1))


def final_fit(config: TrainConfig, samples: Sequence[Sample], results: Sequence[dict[str, Any]], seed_fold: int,
              shared: FoldResources) -> dict[str, Any]:
    """Retrain on every training sample for a fold's chosen number of optimiser steps
    (:func:`final_steps`; ``final/``); score it once on the fixed test split when the data has one."""
    trainval, test = folds_lib.split_test(samples)
    steps = final_steps(config, results, shared.world)
    epochs = math.ceil(steps.stop / trainer.epoch_steps(len(trainval), config.batch_size, shared.world))
    plan = FoldPlan.final_fit(config.output_dir, seed_fold, trainval, test, steps)
    done = plan.directory / "done.json"
    log.info("final fit: %d training samples, %d optimiser steps in %d epoch(s) (the median step of the folds' "
             "chosen checkpoints, on a fold's %d-step schedule)", len(trainval), steps.stop, epochs, steps.schedule)
    if done.is_file():
        result = runfiles.read_json(done, "a finished final fit")
    else:
        result = trainer.run_fold(config, samples, plan, shared)
    record: dict[str, Any] = {"final": {"adapter": result["adapter"], "epochs": epochs, "steps": steps.stop,
                                        "schedule_steps": steps.schedule, "train_size": len(trainval)}}
    if test:
        record["test"] = {**estimate(result["scored"], samples, folds_lib.grouping_of(config), seed=config.seed),
                          "scored": result["scored"],
                          "protocol": "the final model scored once on the fixed test split"}
    return record


def log_summary(summary: dict[str, Any]) -> None:
    """The estimate (and the test score) in one or two log lines."""
    cv = summary["cv_estimate"]
    if cv["n_images"]:
        dice = cv["dice"]
        log.info("cross-validated Dice (checkpoints chosen on inner splits, scored on the outer folds): %.4f "
                 "+- %.4f, 95 %% CI [%.4f, %.4f] over %d images in %d groups (resampled whole: %s)", dice["mean"],
                 dice["std"], dice["ci_low"], dice["ci_high"], cv["n_images"], cv["n_groups"], cv["unit"])
    if "ais_msa" in cv:
        msa = cv["ais_msa"]
        log.info("cross-validated AIS mSA (each fold's watershed thresholds): %.4f +- %.4f, 95 %% CI [%.4f, %.4f]",
                 msa["mean"], msa["std"], msa["ci_low"], msa["ci_high"])
    if "test" in summary:
        log.info("final model on the fixed test split: Dice %.4f (%d images)", summary["test"]["dice"]["mean"],
                 summary["test"]["n_images"])


EXPORT_SIZE = 1024  # the input size segment_anything / mobile_sam build their models for


def export_images(samples: Sequence[Sample]) -> tuple[list[int], str, bool]:
    """``(indices, what they are, seen in training)``: the images the exported model is scored on.
    The fixed test split when the data has one; else the final fit's training images (it keeps
    no selection images: it trains for a fixed epoch count), marked as seen."""
    trainval, test = folds_lib.split_test(samples)
    if test:
        return test, "the fixed test split", False
    return trainval, "the final fit's training images (no fixed test split; seen in training)", True


def score_model(sam: torch.nn.Module, config: TrainConfig, samples: Sequence[Sample], indices: Sequence[int],
                device: torch.device) -> list[dict[str, Any]]:
    """Per-image Dice and IoU of ``sam`` at ``config.image_size`` on ``samples[indices]``, scored as
    the folds are (trainer.validation_rows); rows with the sample ``index`` and ``key``."""
    ctx = trainer.Context(sam.to(device).eval(), config, device)
    dataset = items.PromptDataset(samples, indices, config, 0, train=False)
    loader = items.make_loader(dataset, config.batch_size, None, 0)
    return [{"index": r["index"], "key": samples[r["index"]].key, "dice": r["dice"], "iou": r["iou"]}
            for r in trainer.validation_rows(ctx, loader)]


def export_merged(config: TrainConfig, summary: dict[str, Any], samples: Sequence[Sample], out_path: Path,
                  device: torch.device | str = "cpu") -> dict[str, Any]:
    """Write the final fit's adapter merged into the base model as a plain SAM / MobileSAM state
    dict, after scoring that very model; the scores go to ``summary.json`` (``export``).

    The file loads unchanged with ``segment_anything`` / ``mobile_sam``'s own
    ``sam_model_registry[model_type](checkpoint=PATH)``, which builds the model at 1024 px: so the
    model is rebuilt at 1024 px from the base checkpoint (the frozen position embeddings are the
    base's), the adapter loaded and merged. An adapter trained at another input size is another
    model there, so the exported model is scored (:func:`export_images`) beside the final adapter
    at its training size on the same images, and the change of size is a warning.

    A model carrying an AIS decoder is written in micro-sam's combined layout instead
    (``{"model_state": SAM, "decoder_state": decoder}``, read by micro-sam's ``get_sam_model`` /
    ``get_predictor_and_decoder`` and by our ``--checkpoint``), with the plain SAM state dict beside
    it at :func:`checkpoints.plain_sam_path`. Neither file may exist.
    """
    sam_only = checkpoints.plain_sam_path(out_path)
    for path in (out_path, sam_only):
        if path.exists():
            raise UserError(f"{path} exists: choose another --export_merged path (nothing was overwritten)")
    adapter, device = Path(summary["final"]["adapter"]), torch.device(device)
    checkpoint = checkpoints.resolve_checkpoint(config.model_type, config.checkpoint, announce=False)
    if config.image_size != EXPORT_SIZE:
        log.warning("--export_merged: the adapter was trained at %d px input, the exported model runs at %d px (as "
                    "segment_anything / mobile_sam build it): it is another model, scored below and in "
                    "summary.json 'export'", config.image_size, EXPORT_SIZE)
    # Random base weights are rebuilt from the adapter's seed: the builders draw the same numbers
    # at every input size (size-dependent position tables are zero-initialised).
    state, decoder = instance_decoder.split_state(lora.merged_state_dict(adapters.load_finetuned(
        adapters.BaseModels(config.model_type, checkpoint, EXPORT_SIZE), adapter, config.seed, merge=False)))
    exported = sam_model.build_model(config.model_type, None, EXPORT_SIZE).sam
    exported.load_state_dict(state, strict=True)  # the file's tensors, as the official registry loads them
    indices, images, seen = export_images(samples)
    rows = score_model(exported, dataclasses.replace(config, image_size=EXPORT_SIZE), samples, indices, device)
    final = adapters.load_finetuned(adapters.BaseModels(config.model_type, checkpoint, config.image_size), adapter,
                                    config.seed)
    final_scores = estimate(score_model(final, config, samples, indices, device), samples,
                            folds_lib.grouping_of(config), seed=config.seed)
    record = {"path": str(out_path), "image_size": EXPORT_SIZE, "trained_image_size": config.image_size,
              "images": images, "seen_in_training": seen,
              **estimate(rows, samples, folds_lib.grouping_of(config), seed=config.seed),
              "final_adapter": {"image_size": config.image_size, "dice": final_scores["dice"],
                                "iou": final_scores["iou"]}, "scored": rows}
    log.info("exported model (%d px) on %s: Dice %.4f, 95 %% CI [%.4f, %.4f] over %d images; the final adapter at "
             "its %d px: %.4f", EXPORT_SIZE, images, record["dice"]["mean"], record["dice"]["ci_low"],
             record["dice"]["ci_high"], record["n_images"], config.image_size, final_scores["dice"]["mean"])
    if decoder:
        record["layout"], record["sam_path"] = "micro-sam combined (model_state + decoder_state)", str(sam_only)
    summary["export"] = record
    runfiles.write_json(Path(config.output_dir) / runs.SUMMARY_FILE, summary)
    if decoder:
        runfiles.torch_save(state, sam_only, rerun="rerun the command")
        runfiles.torch_save(checkpoints.combined_state(state, decoder), out_path, rerun="rerun the command")
        log.info("exported the merged model with its AIS decoder (%s, adapter %s) to %s (micro-sam's combined "
                 "layout) and the plain SAM state dict to %s", config.model_type, adapter, out_path, sam_only)
        return record
    runfiles.torch_save(state, out_path, rerun="rerun the command")
    log.info("exported the merged model (%s, adapter %s) to %s", config.model_type, adapter, out_path)
    return record
