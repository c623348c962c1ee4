"""Training run directories as ``train`` writes them and ``evaluate`` reads them; what a model argument names.

A run directory holds ``config.json`` (the flat TrainConfig), ``folds.json`` (folds.py),
``metrics.csv``, ``summary.json``, ``train.log`` and per fold ``fold_k/best.pt`` (the adapter of
the best validation epoch), ``fold_k/last.pt`` (resume state) and ``fold_k/done.json``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from samlora.core import runfiles
from samlora.core.errors import UserError
from samlora.data.folds import FOLDS_FILE, Fold, load_folds, split_test
from samlora.data.sample import Sample
from samlora.models import adapters

if TYPE_CHECKING:
    from samlora.training.config import TrainConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CONFIG_SCHEMA = 1  # config.json: TrainConfig's fields; an option it lacks has its default (option_defaults)
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.csv"
LOG_FILE = "train.log"
FINAL_DIR = "final"  # the final fit on all training data (--final_fit)
_ABSENT = object()  # differences(): a key that neither a record nor the defaults hold


def fold_dir(run_dir: Path, fold: int) -> Path:
    """``run_dir/fold_k``."""
    return Path(run_dir) / f"fold_{fold}"


def is_run(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``train`` (it has folds.json)."""
    return Path(path).is_dir() and (Path(path) / FOLDS_FILE).is_file()


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """A training run's ``config.json`` (flat ``TrainConfig`` fields)."""
    return runfiles.read_json(Path(run_dir) / CONFIG_FILE, "a run directory written by train")


def fold_histories(run_dir: Path) -> list[dict[str, Any]]:
    """Every fold's epoch rows, read back from the resume checkpoints (``fold_k/last.pt``, ``final/last.pt``)."""
    rows = []
    folds = sorted(run_dir.glob("fold_*/last.pt"), key=lambda p: int(p.parent.name.split("_")[1]))
    for last in folds + sorted(run_dir.glob(f"{FINAL_DIR}/last.pt")):
        rows += torch.load(last, map_location="cpu", weights_only=True)["state"]["history"]
    return rows


def write_metrics_csv(run_dir: Path) -> None:
    """``metrics.csv``: one row per fold and epoch (rewritten whole, atomically); with the AIS
    decoder (``--instance_decoder``) also its loss ``train_ais_loss`` and ``val_ais_msa``."""
    rows = fold_histories(run_dir)
    ais = [c for c in ("train_ais_loss", "val_ais_msa") if any(c in r for r in rows)]
    columns = ["fold", "epoch", "train_loss", "train_dice", "val_dice", "val_iou", "val_pooled_dice", *ais, "lr",
               "skipped_steps", "seconds"]
    runfiles.write_csv(run_dir / METRICS_FILE, rows, columns)


def fold_adapters(run_dir: Path, num_folds: int) -> list[Path]:
    """``run_dir/fold_k/best.pt`` for every fold, or a UserError naming the missing one."""
    paths = [fold_dir(run_dir, k) / "best.pt" for k in range(num_folds)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{missing[0]} does not exist: fold {missing[0].parent.name} of {run_dir} has no "
                        "best adapter yet; finish the training (train --resume) first")
    return paths


def common_folds(samples: Sequence[Sample], run_dirs: Sequence[Path]) -> list[Fold] | None:
    """The folds of the runs (which must agree), checked against the samples."""
    folds = None
    for run_dir in run_dirs:
        found = load_folds(run_dir / FOLDS_FILE, samples)
        if folds is not None and [sorted(v) for _, v in found] != [sorted(v) for _, v in folds]:
            raise UserError(f"the runs {run_dirs[0]} and {run_dir} hold out different folds; compare runs "
                            "made on the same folds (e.g. those of one parameter_search)")
        folds = folds or found
    return folds


@dataclass
class ModelSource:
    """One model to score: ``kind`` is base, adapter or run (per-fold adapters)."""

    name: str
    kind: str
    path: Path | None = None

    @property
    def spec(self) -> str:
        return "base" if self.path is None else str(self.path)


def model_source(name: str, spec: str) -> ModelSource:
    """What a model argument names: ``base``, an adapter file (checked) or a training run directory."""
    if spec == "base":
        return ModelSource(name, "base")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not is_run(path):
            raise UserError(f"{path} is a directory but not a training run (no {FOLDS_FILE}); "
                            "give an adapter file such as RUN/fold_0/best.pt, a run directory or 'base'")
        return ModelSource(name, "run", path)
    if not path.is_file():
        raise UserError(f"model {name!r}: {path} does not exist (give 'base', an adapter file from "
                        "train such as RUN/fold_0/best.pt, or a run directory)")
    adapters.read_adapter(path)  # refuses files that are not adapters, with the file name
    return ModelSource(name, "adapter", path)


def adapter_run(adapter: Path) -> tuple[Path, int | None] | None:
    """The training run an adapter file belongs to and its fold (None: the final fit), when the
    file still sits where train wrote it (``RUN/fold_k/best.pt``, ``RUN/final/best.pt``)."""
    adapter = Path(adapter)
    run_dir, folder = adapter.parent.parent, adapter.parent.name
    if not is_run(run_dir):
        return None
    if folder == FINAL_DIR:
        return run_dir, None
    if folder.startswith("fold_") and folder[5:].isdigit():
        return run_dir, int(folder[5:])
    return None


def seen_by(adapter: Path, samples: Sequence[Sample]) -> set[int] | None:
    """Indices of ``samples`` the adapter may have learnt from: all but its fold's validation part
    and the fixed test split. That is its training pool, the inner selection split carved from it,
    and the ``--fold_gap`` sections beside the validation part (they border training sections on
    their other side); for the final fit every non-test sample. None when that cannot be known (no
    run next to it, or the run's folds do not fit these samples)."""
    found = adapter_run(adapter)
    if found is None:
        return None
    run_dir, fold = found
    try:
        folds = load_folds(run_dir / FOLDS_FILE, samples)
    except UserError:
        return None
    trainval = set(split_test(samples)[0])
    if fold is None:
        return trainval
    return trainval - set(folds[fold][1]) if 0 <= fold < len(folds) else None


def option_defaults(config: "TrainConfig") -> dict[str, Any]:
    """Every option's default, as config.json writes it: what a record made before the option
    existed means by leaving it out."""
    return type(config)(data_dir="", output_dir="").to_json()


def differences(recorded: dict[str, Any], current: dict[str, Any],
                defaults: dict[str, Any] | None = None) -> list[str]:
    """``key: old -> new`` for each option that ``current`` sets otherwise than ``recorded``, for
    an error message; nested dicts are compared key by key (``key.sub: old -> new``).

    A key that one side lacks counts as its value in ``defaults`` (nested like the records), so an
    option added (or dropped) since the record changes nothing while it keeps its default; a key
    that ``defaults`` does not hold either, or a whole nested dict one side lacks, is not compared.
    """
    defaults = defaults or {}
    out = []
    for key in [*recorded, *(k for k in current if k not in recorded)]:
        fallback = defaults.get(key, _ABSENT)
        if isinstance(fallback, dict):  # a section that one side lacks altogether is not compared
            fallback = _ABSENT
        old, new = recorded.get(key, fallback), current.get(key, fallback)
        if old is _ABSENT or new is _ABSENT:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            nested = defaults.get(key)
            out += [f"{key}.{line}" for line in differences(old, new, nested if isinstance(nested, dict) else None)]
        elif old != new:
            out.append(f"{key}: {old!r} -> {new!r}")
    return out


def claim_output_dir(config: "TrainConfig", resume: bool, overwrite: bool) -> runfiles.OutputDir:
    """The run directory (runfiles' one rule): an existing run needs ``--resume`` with the same
    options, or ``--overwrite``, which removes only the earlier run's files."""
    out = runfiles.OutputDir(config.output_dir, "train")
    config_path = out.path / CONFIG_FILE
    if resume:
        if not config_path.is_file():
            raise UserError(f"--resume: no run to resume in {out.path} (no config.json); start it without --resume")
        diff = differences(read_run_config(out.path), config.to_json(), option_defaults(config))
        if diff:
            shown = ", ".join(diff[:4])
            raise UserError(f"--resume: the options differ from the run in {out.path} ({shown}); resume with "
                            "the same options, or start a new --output_dir")
        return out.claim(overwrite=False, resume=True)
    if config_path.is_file() and not overwrite:
        raise UserError(f"{out.path} holds another run: use --resume to continue it, --overwrite to replace it, "
                        "or a new --output_dir")
    if overwrite and config_path.is_file() and out.owner() is None:
        _remove_unrecorded_run(out.path)
    return out.claim(overwrite)


def _remove_unrecorded_run(path: Path) -> None:
    """A run directory without a manifest: remove the files train writes (by name), so that no
    stale ``last.pt`` is resumed; anything else stays."""
    for name in (CONFIG_FILE, FOLDS_FILE, METRICS_FILE, SUMMARY_FILE, LOG_FILE):
        (path / name).unlink(missing_ok=True)
    for fold_path in path.glob("fold_*"):
        for name in ("best.pt", "last.pt", "done.json"):
            (fold_path / name).unlink(missing_ok=True)
    log.warning("--overwrite: removed the earlier run's files in %s", path)
