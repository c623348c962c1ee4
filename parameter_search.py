"""``python main.py parameter_search``: a grid over LoRA rank, alpha, learning rate and encoder blocks.

Every configuration trains on the same folds (one ``folds.json`` at the top) in its own
sub-directory; ``results.csv`` ranks them by the cross-validated estimate (crossval.py: each
fold's checkpoint chosen on an inner split, scored on the outer fold) and ``best_config.json``
names the winner. A re-run skips finished configurations.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

import checkpoints
import crossval
import dataset as data
import folds as folds_lib
import model as sam_model
import runfiles
import runs
import trainer
from errors import UserError
from sample import Sample
from train_config import TrainConfig, add_train_arguments
from training_data import check_cache_budget

log = logging.getLogger(__name__)

SEARCH_FILE = "search.json"
GRID_KEYS = ("lora_rank", "lora_alpha", "learning_rate", "lora_blocks")


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
    """The ``parameter_search`` subcommand."""
    parser = subparsers.add_parser(
        "parameter_search", help="grid search over LoRA rank, alpha and learning rate",
        description="Train every combination of --lora_ranks x --lora_alphas x --learning_rates on the "
                    "same folds and rank them by validation Dice.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_arguments(parser)
    grid = parser.add_argument_group("grid")
    grid.add_argument("--lora_ranks", default="2,4,8,16", help="comma-separated LoRA ranks")
    grid.add_argument("--lora_alphas", default="2,4,8", help="comma-separated LoRA alphas")
    grid.add_argument("--learning_rates", default="1e-4,3e-4,1e-3", help="comma-separated learning rates")
    grid.add_argument("--lora_blocks_grid", nargs="+", default=None, metavar="SPEC",
                      help="encoder blocks to search over, space-separated --lora_blocks specs (e.g. all last3 6-11); "
                           "default: --lora_blocks alone")
    parser.set_defaults(func=run, output_dir=Path("runs/parameter_search"), cross_validation=True, num_folds=3)
    return parser


def config_name(rank: int, alpha: float, lr: float, blocks: str = "all") -> str:
    """The sub-directory of one configuration (LoRA in every encoder block: no blocks part)."""
    spec = blocks.strip().lower().replace(" ", "").replace(",", "+")
    return f"rank{rank}_alpha{alpha:g}_lr{lr:g}" + ("" if spec == "all" else f"_blocks{spec}")


def run(args: argparse.Namespace) -> int:
    """Train every configuration of the grid (skipping finished ones) and rank them."""
    ranks = parse_list(args.lora_ranks, int, "--lora_ranks")
    alphas = parse_list(args.lora_alphas, float, "--lora_alphas")
    lrs = parse_list(args.learning_rates, float, "--learning_rates")
    base = TrainConfig.from_args(args)
    blocks = args.lora_blocks_grid or [base.lora_blocks]
    device = sam_model.resolve_device(args.device)
    sam_model.autocast(device, base.precision)
    checkpoints.resolve_checkpoint(base.model_type, base.checkpoint)
    out = runfiles.OutputDir(base.output_dir, "parameter_search")
    search = {"base": {k: v for k, v in base.to_json().items() if k not in GRID_KEYS + ("output_dir",)}}
    previous = runs.read_json(out.path / SEARCH_FILE, "a parameter search") if (out.path / SEARCH_FILE).is_file() else None
    same = previous is not None and previous.get("base") == search["base"]
    if previous is not None and not same and not args.overwrite:
        raise UserError(f"{out.path} holds a search with other options: use the same options, --overwrite, "
                        "or a new --output_dir")
    resume = same and not args.overwrite
    out.check(args.overwrite, resume=resume)
    configs = [configuration(base, rank, alpha, lr, spec)
               for rank, alpha, lr, spec in itertools.product(ranks, alphas, lrs, blocks)]
    samples = data.load_from_options(args)
    folds = crossval.plan_folds(base, samples, resume)  # impossible folds: refused before any write
    check_cache_budget(configs, len(samples), args.cache_memory_gb, None)  # each cached encoder start once
    out.claim(args.overwrite, resume=resume)
    runfiles.write_json(out.path / SEARCH_FILE, search)
    with out.active("search.log"):
        if not (out.path / folds_lib.FOLDS_FILE).is_file():
            folds_lib.save_folds(out.path, folds, samples, seed=base.seed, grouping=crossval.grouping(base))
        embeddings: dict[str, torch.Tensor] = {}  # frozen parts are the same in every configuration (keyed by block)
        results = [train_configuration(config, samples, folds, device, args.num_workers, args.cache_memory_gb,
                                       embeddings) for config in configs]
        write_results(out.path, base, results)
    return 0


def configuration(base: TrainConfig, rank: int, alpha: float, lr: float, blocks: str = "all") -> TrainConfig:
    """One configuration of the grid, checked, in its own sub-directory."""
    config = dataclasses.replace(base, lora_rank=rank, lora_alpha=alpha, learning_rate=lr, lora_blocks=blocks,
                                 output_dir=str(Path(base.output_dir) / config_name(rank, alpha, lr, blocks)))
    config.validate()
    return config


def train_configuration(config: TrainConfig, samples: Sequence[Sample], folds: Sequence[folds_lib.Fold],
                        device: torch.device, num_workers: int, cache_memory_gb: float,
                        embeddings: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Train one configuration on the shared folds (or read its finished summary); its results row."""
    name, rank, alpha, lr = Path(config.output_dir).name, config.lora_rank, config.lora_alpha, config.learning_rate
    summary_path = Path(config.output_dir) / runs.SUMMARY_FILE
    if summary_path.is_file():
        summary = runs.read_json(summary_path, "a finished training run")
        log.info("%s: finished earlier, skipped", name)
    else:
        log.info("%s: training %d fold(s)", name, len(folds))
        resume = (Path(config.output_dir) / runs.CONFIG_FILE).is_file()
        out = trainer.claim_output_dir(config, resume=resume, overwrite=False)
        with out.active():  # run_training writes the shared folds there: `evaluate --cv_run` works on it
            summary = crossval.run_training(config, samples, device, num_workers, folds=folds,
                                            cache_memory_gb=cache_memory_gb, embeddings=embeddings)
    cv = summary["cv_estimate"]
    return {"name": name, "lora_rank": rank, "lora_alpha": alpha, "learning_rate": lr,
            "cv_dice": cv["dice"]["mean"], "cv_dice_std": cv["dice"]["std"], "cv_dice_ci_low": cv["dice"]["ci_low"],
            "cv_dice_ci_high": cv["dice"]["ci_high"], "cv_iou": cv["iou"]["mean"], "n_images": cv["n_images"],
            "folds": len(summary["folds"]), "run": config.output_dir, "lora_blocks": config.lora_blocks}


def write_results(root: Path, base: TrainConfig, results: list[dict[str, Any]]) -> None:
    """results.csv (best first) and best_config.json; logs the ranking."""
    results.sort(key=lambda r: -r["cv_dice"])
    runfiles.write_csv(root / "results.csv", results, list(results[0]))
    best = results[0]
    runfiles.write_json(root / "best_config.json", {
        **best, "config": {**base.to_json(), "lora_rank": best["lora_rank"], "lora_alpha": best["lora_alpha"],
                           "learning_rate": best["learning_rate"], "lora_blocks": best["lora_blocks"],
                           "output_dir": str(root / best["name"])}})
    log.info("parameter search: %d configurations; best %s with cross-validated Dice %.4f +- %.4f",
             len(results), best["name"], best["cv_dice"], best["cv_dice_std"])
    for r in results:
        log.info("  %-28s Dice %.4f +- %.4f [%.4f, %.4f]", r["name"], r["cv_dice"], r["cv_dice_std"],
                 r["cv_dice_ci_low"], r["cv_dice_ci_high"])
