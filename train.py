"""``python main.py train``: LoRA / decoder fine-tuning with grouped k-fold cross-validation.

Writes to ``--output_dir`` (the layout of runs.py): ``config.json``, ``folds.json``,
``metrics.csv`` (a row per fold and epoch), ``summary.json`` (the cross-validated estimate,
crossval.py), ``train.log``, per fold ``fold_k/best.pt`` (the adapter of the epoch chosen on an
inner split) and ``fold_k/last.pt`` (resume state), and with ``--final_fit`` ``final/``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from samlora.core import logfiles
from samlora.core.errors import UserError
from samlora.data import dataset as data
from samlora.models import checkpoints
from samlora.models import sam as sam_model
from samlora.training import crossval, runs, trainer
from samlora.training.config import TrainConfig, add_train_arguments
from samlora.training.items import check_cache_budget

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``train`` subcommand."""
    parser = subparsers.add_parser(
        "train", help="fine-tune with LoRA (k-fold cross-validation, resumable)",
        description="Fine-tune SAM / MobileSAM with LoRA adapters (and optionally the mask decoder). "
                    "Example: python main.py train --data_dir data/em --lora_rank 8 --cross_validation",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_arguments(parser)
    parser.add_argument("--export_merged", type=Path, default=None,
                        help="after training, write the final fit (implies --final_fit) with LoRA merged as a "
                             "plain SAM / MobileSAM state dict that segment_anything / mobile_sam load unchanged")
    parser.add_argument("--embedding_cache", type=Path, default=None,
                        help="directory keeping the cache (frozen-encoder image embeddings, late LoRA's block "
                             "inputs) on disk, across runs")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Train every fold; with ``--export_merged`` also the final fit, written as a merged model."""
    if args.export_merged is not None and not args.final_fit:
        log.info("--export_merged exports the final fit on all training data: --final_fit is on")
        args.final_fit = True
    config = TrainConfig.from_args(args)
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {args.num_workers}")
    device = sam_model.resolve_device(args.device)
    sam_model.autocast(device, config.precision)  # rejects fp16 on CPU before any work
    checkpoints.resolve_checkpoint(config.model_type, config.checkpoint)  # missing weights: fail early
    if args.export_merged is not None and args.export_merged.exists():
        raise UserError(f"--export_merged {args.export_merged} exists: choose a new path (nothing was overwritten)")
    plain = checkpoints.plain_sam_path(args.export_merged) if args.export_merged is not None else None
    if plain is not None and plain.exists():  # refused by crossval.export_merged too, after training
        raise UserError(f"--export_merged {args.export_merged}: {plain}, where the plain SAM state dict goes beside "
                        "the combined file, exists: choose a new path (nothing was overwritten)")
    samples = data.load_from_options(args)
    folds = crossval.plan_folds(config, samples, args.resume)  # impossible folds: refused before any write
    check_cache_budget([config], len(samples), args.cache_memory_gb, args.embedding_cache)
    processes = trainer.Distributed.setup(device)  # torchrun: one process per device
    out = None
    if processes.rank == 0:
        out = runs.claim_output_dir(config, args.resume, args.overwrite)
    else:  # one voice: the other processes report warnings and errors only
        logging.getLogger().setLevel(logging.WARNING)
    processes.barrier()
    log_file = Path(config.output_dir) / runs.LOG_FILE
    with out.active(runs.LOG_FILE) if out is not None else logfiles.log_to_file(log_file):
        summary = crossval.run_training(config, samples, device, args.num_workers, folds, args.embedding_cache,
                                        args.cache_memory_gb)
        if args.export_merged is not None and processes.rank == 0:
            crossval.export_merged(config, summary, samples, args.export_merged, device)
    return 0

