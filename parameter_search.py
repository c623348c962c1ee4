"""``python main.py parameter_search``: a grid over LoRA rank, alpha and learning rate.

Every configuration trains on the same folds (one ``folds.json`` at the top) in its own
sub-directory; ``results.csv`` ranks them by mean validation Dice (with its standard deviation
over folds) and ``best_config.json`` names the winner. A re-run skips finished configurations.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import dataset as data
import model as sam_model
import trainer
from errors import UserError
from runlog import log_to_file

log = logging.getLogger(__name__)


def parse_list(text: str, kind: type, flag: str) -> list:
    """``"2,4,8"`` -> ``[2, 4, 8]``; a bad or non-positive value is a UserError naming the flag."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be a comma-separated list of numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UserError(f"{flag} needs positive values, got {text!r}")
    return values


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "parameter_search", help="grid search over LoRA rank, alpha and learning rate",
        description="Train every combination of --lora_ranks x --lora_alphas x --learning_rates on the "
                    "same folds and rank them by validation Dice.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    trainer.add_train_arguments(parser)
    grid = parser.add_argument_group("grid")
    grid.add_argument("--lora_ranks", default="2,4,8,16", help="comma-separated LoRA ranks")
    grid.add_argument("--lora_alphas", default="2,4,8", help="comma-separated LoRA alphas")
    grid.add_argument("--learning_rates", default="1e-4,3e-4,1e-3", help="comma-separated learning rates")
    parser.set_defaults(func=run, output_dir=Path("runs/parameter_search"), cross_validation=True, num_folds=3)
    return parser


def config_name(rank: int, alpha: float, lr: float) -> str:
    return f"rank{rank}_alpha{alpha:g}_lr{lr:g}"


def run(args: argparse.Namespace) -> int:
    ranks = parse_list(args.lora_ranks, int, "--lora_ranks")
    alphas = parse_list(args.lora_alphas, float, "--lora_alphas")
    lrs = parse_list(args.learning_rates, float, "--learning_rates")
    base = trainer.TrainConfig.from_args(args)
    device = sam_model.resolve_device(args.device)
    sam_model.autocast(device, base.precision)
    sam_model.resolve_checkpoint(base.model_type, base.checkpoint)
    root = Path(base.output_dir)
    search_file = root / "search.json"
    search = {"base": {k: v for k, v in base.to_json().items() if k not in ("lora_rank", "lora_alpha",
                                                                             "learning_rate", "output_dir")}}
    if search_file.is_file():
        previous = json.loads(search_file.read_text(encoding="utf-8"))
        if previous.get("base") != search["base"] and not args.overwrite:
            raise UserError(f"{root} holds a search with other options: use the same options, --overwrite, "
                            "or a new --output_dir")
        if args.overwrite and previous.get("base") != search["base"]:
            shutil.rmtree(root)
    elif root.exists() and any(root.iterdir()) and not args.overwrite:
        raise UserError(f"{root} exists and is not a parameter search: choose a new --output_dir (or --overwrite)")
    samples = data.load_from_args(args)
    root.mkdir(parents=True, exist_ok=True)
    trainer.atomic_write_text(search_file, json.dumps(search, indent=1))
    with log_to_file(root / "search.log"):
        folds = data.load_or_make_folds(root, samples, base.num_splits, base.seed, base.slice_block, base.val_fraction)
        results = []
        for rank, alpha, lr in trainer.iter_grid(ranks, alphas, lrs):
            name = config_name(rank, alpha, lr)
            config = dataclasses.replace(base, lora_rank=rank, lora_alpha=alpha, learning_rate=lr,
                                         output_dir=str(root / name))
            config.validate()
            summary_path = Path(config.output_dir) / "summary.json"
            if summary_path.is_file():
                summary = json.loads(summary_path.read_text(encoding="utf-8"))
                log.info("%s: finished earlier, skipped", name)
            else:
                log.info("%s: training %d fold(s)", name, len(folds))
                resume = (Path(config.output_dir) / "config.json").is_file()
                trainer.prepare_output_dir(config, resume=resume, overwrite=False)
                # the shared folds, so `evaluate --cv_run` works on any configuration's directory
                data.save_folds(Path(config.output_dir), folds, samples, base.slice_block, base.seed)
                summary = trainer.run_training(config, samples, device, args.num_workers, folds=folds)
            results.append({"name": name, "lora_rank": rank, "lora_alpha": alpha, "learning_rate": lr,
                            "mean_val_dice": summary.get("mean_best_val_dice", 0.0),
                            "std_val_dice": summary.get("std_best_val_dice", 0.0),
                            "mean_val_iou": summary.get("mean_val_iou", 0.0),
                            "folds": len(summary["folds"]), "best_adapter": summary["best_adapter"]})
        results.sort(key=lambda r: -r["mean_val_dice"])
        columns = list(results[0])
        lines = [",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in results]
        trainer.atomic_write_text(root / "results.csv", "\n".join(lines) + "\n")
        best = results[0]
        trainer.atomic_write_text(root / "best_config.json", json.dumps(
            {**best, "config": {**base.to_json(), "lora_rank": best["lora_rank"], "lora_alpha": best["lora_alpha"],
                                "learning_rate": best["learning_rate"], "output_dir": str(root / best["name"])}},
            indent=1))
        log.info("parameter search: %d configurations; best %s with validation Dice %.4f +- %.4f",
                 len(results), best["name"], best["mean_val_dice"], best["std_val_dice"])
        for r in results:
            log.info("  %-28s Dice %.4f +- %.4f", r["name"], r["mean_val_dice"], r["std_val_dice"])
    return 0
