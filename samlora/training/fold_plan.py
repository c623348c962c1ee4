"""What one training of the fold loop is told and what it keeps: :class:`FoldPlan` (an outer fold
or the final fit: its indices, steps and directory), :class:`FoldResources` (what every fold of a
run shares, with :class:`Distributed`, this process's place in a torchrun job) and
:class:`FoldState` (the resume state saved in ``last.pt`` after every epoch).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from samlora.training import runs


@dataclass(frozen=True)
class StepPlan:
    """A run's optimiser steps when they are not ``--epochs`` whole epochs (the final fit): the
    steps its warm-up and cosine schedule span, and the step it stops after."""

    schedule: int
    stop: int


@dataclass(frozen=True)
class FoldPlan:
    """One training of the fold loop: outer fold ``fold`` or, with ``final``, the final fit.

    ``train_idx`` trains; ``select_idx`` (an inner split of the training groups, may be empty)
    chooses the epoch; ``score_idx`` (the outer fold, or the fixed test split) is scored once with
    the chosen adapter. ``fold`` seeds the randomness (the final fit's is the number of folds, so
    it draws apart from every fold). ``steps``: the schedule's length and the step to stop after
    (None: ``--epochs`` whole epochs). ``directory`` receives ``best.pt``, ``last.pt`` and
    ``done.json``.
    """

    fold: int
    train_idx: tuple[int, ...]
    select_idx: tuple[int, ...]
    score_idx: tuple[int, ...]
    directory: Path
    final: bool = False
    steps: StepPlan | None = None

    @classmethod
    def outer(cls, run_dir: str | Path, fold: int, train_idx: Sequence[int], select_idx: Sequence[int],
              score_idx: Sequence[int]) -> "FoldPlan":
        """Outer fold ``fold`` of the run in ``run_dir`` (its ``fold_k`` directory)."""
        return cls(fold, tuple(train_idx), tuple(select_idx), tuple(score_idx), runs.fold_dir(Path(run_dir), fold))

    @classmethod
    def final_fit(cls, run_dir: str | Path, seed_fold: int, train_idx: Sequence[int], score_idx: Sequence[int],
                  steps: StepPlan) -> "FoldPlan":
        """The final fit on ``train_idx`` for ``steps``, no selection split (``final/``)."""
        return cls(seed_fold, tuple(train_idx), (), tuple(score_idx), Path(run_dir) / runs.FINAL_DIR, True, steps)

    @property
    def label(self) -> int | str:
        """The fold as logs and ``metrics.csv`` name it: its index, or ``final``."""
        return runs.FINAL_DIR if self.final else self.fold

    @property
    def adapter_fold(self) -> int | None:
        """The ``fold`` an adapter file records: the index, None for the final fit."""
        return None if self.final else self.fold


@dataclass
class FoldResources:
    """What every fold of a run shares: the base weights (None: random), the device, this
    process's place in a torchrun job, loader workers and the frozen encoder's embedding cache
    (``embeddings`` in memory up to ``cache_bytes``, and on disk in ``cache_dir``)."""

    checkpoint: Path | None
    device: torch.device
    num_workers: int = 0
    rank: int = 0
    world: int = 1
    cache_dir: Path | None = None
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    cache_bytes: float = float("inf")


@dataclass
class FoldState:
    """A fold's training state after its last finished epoch (-1: none yet): the best selection
    Dice and its epoch, the epochs since it last improved and every epoch's metrics row."""

    epoch: int = -1
    best_dice: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_saved(cls, saved: Mapping[str, Any]) -> "FoldState":
        """The state as ``last.pt`` keeps it (:meth:`to_saved`; a missing key takes its default)."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in names})

    def to_saved(self) -> dict[str, Any]:
        """A plain dict for ``last.pt`` (loadable with ``weights_only=True``): the keys are the fields."""
        return asdict(self)

    def record(self, row: Mapping[str, Any]) -> bool:
        """Book an epoch's metrics ``row``; returns whether it is the new best (the best selection
        Dice, or every epoch when the row has none: without a selection split the last is kept)."""
        improved = "val_dice" not in row or row["val_dice"] > self.best_dice
        self.history.append(dict(row))
        self.epoch = int(row["epoch"])
        if improved:
            self.best_dice, self.best_epoch, self.bad_epochs = float(row.get("val_dice", -1.0)), self.epoch, 0
        else:
            self.bad_epochs += 1
        return improved


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def setup(cls, device: torch.device) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return cls(dist.get_rank(), world)

    def barrier(self) -> None:
        """Wait for every process (no-op without torchrun)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
