"""What a parameter search's chosen configuration is worth: a fixed test split, nested cross-validation, or nothing.

A search ranks its configurations by ``cv_dice`` and names the best on the same outer folds
that give that number, so the winner's ``cv_dice`` is a *selection score*: the maximum of noisy
estimates, biased upwards. An unbiased figure needs images the choice never saw:

* ``test_split``: the data has a fixed test split; the chosen configuration, retrained on all
  training data (its ``final/``), is scored once on it.
* ``nested`` (``--nested``): the search is repeated inside each outer fold. Every configuration
  is cross-validated on the fold's training part alone (inner folds grouped and gapped like the
  outer ones); the configuration with the best inner score is the fold's pick, and its run on
  that outer fold (already trained by the search) scores it. The pooled outer scores of the
  picks estimate the whole procedure "search, then take the best", the figure to quote for it.
* ``none``: neither could be made (the reason is recorded).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from samlora.core.errors import UserError
from samlora.data import folds as folds_lib
from samlora.data.sample import Sample
from samlora.training import crossval
from samlora.training.config import TrainConfig

log = logging.getLogger(__name__)

NESTED_DIR = "nested"  # a configuration's inner cross-validations: <run>/nested/outer_<k>/
SELECTION = "cv_dice (selection score)"  # results.csv's ranked_by: what the rows are ordered by
SELECTION_NOTE = ("cv_dice ranks the configurations on the same outer folds that give it: the best one's is a "
                  "selection score, biased upwards; `estimate` is the unbiased figure")
#: The per-image scores a search can rank by (parameter_search --objective), as the logs name them.
LABELS = {"dice": "Dice", "ais_msa": "AIS mSA"}


def nested_dir(config: TrainConfig, outer: int) -> Path:
    """Where ``config``'s inner cross-validation inside outer fold ``outer`` runs."""
    return Path(config.output_dir) / NESTED_DIR / f"outer_{outer}"


def inner_folds(config: TrainConfig, samples: Sequence[Sample],
                folds: Sequence[folds_lib.Fold]) -> list[list[folds_lib.Fold]]:
    """Per outer fold, the folds of its training part (indices into ``samples``): grouped and
    gapped like the outer folds, ``config.num_folds`` of them or one per group when there are
    fewer. A training part of fewer than two groups cannot be cross-validated: a UserError."""
    grouping = folds_lib.grouping_of(config)
    out = []
    for k, (train_idx, _) in enumerate(folds):
        pool = [samples[i] for i in train_idx]
        n_groups = len({grouping.group(s) for s in pool})
        if n_groups < 2:
            raise UserError(f"--nested: the training part of outer fold {k} holds {n_groups} group(s) of images, "
                            "and repeating the search inside it needs at least 2: use fewer --num_folds, more data, "
                            "or drop --nested")
        inner = folds_lib.make_folds(pool, min(config.num_folds, n_groups), seed=config.seed + 2000 + k,
                                     grouping=grouping)
        out.append([([train_idx[j] for j in tr], [train_idx[j] for j in va]) for tr, va in inner])
    return out


def none(reason: str) -> dict[str, Any]:
    """The record when no unbiased estimate could be made."""
    return {"kind": "none", "reason": reason}


def test_split(summary: dict[str, Any], run: str) -> dict[str, Any]:
    """The estimate from a run's final model scored on the fixed test split (``summary["test"]``)."""
    test = {k: v for k, v in summary["test"].items() if k != "scored"}
    return {"kind": "test_split", **test, "run": str(Path(run) / "final"),
            "protocol": "the chosen configuration retrained on all training data, scored once on the fixed test "
                        "split (no image of it took part in the search)"}


def nested(rows: Sequence[dict[str, Any]], n_outer: int, read_summary: Callable[[str], dict[str, Any]],
           samples: Sequence[Sample], grouping: folds_lib.Grouping, seed: int = 0, key: str = "dice") -> dict[str, Any]:
    """The nested estimate from the finished results rows (each with ``nested``: its inner
    cross-validated ``key`` score, the --objective's, per outer fold, None where nothing was
    scored). Per outer fold the row with the best inner score (ties by name) is picked; its run's
    scored images of that outer fold, pooled over the folds, give the estimate
    (:func:`crossval.estimate`). ``per_fold`` gives the pick's inner score and its outer Dice
    (and outer ``key`` score)."""
    complete = [r for r in rows if r["state"] == "complete" and r.get("nested")]
    scored: list[dict[str, Any]] = []
    per_fold = []
    for k in range(n_outer):
        candidates = sorted((r for r in complete if r["nested"][k] is not None),
                            key=lambda r: (-r["nested"][k], r["name"]))
        if not candidates:
            return none(f"no configuration has an inner cross-validated {LABELS[key]} in outer fold {k}")
        pick = candidates[0]
        fold = read_summary(pick["run"])["folds"][k]
        scored += fold["scored"]
        outer = {name: float(np.mean([s[name] for s in fold["scored"]])) if fold["scored"] else None
                 for name in dict.fromkeys(("dice", key))}
        per_fold.append({"fold": k, "chosen": pick["name"], f"inner_cv_{key}": pick["nested"][k],
                         "n_images": len(fold["scored"]), **outer})
    if not scored:
        return none("the picks of the outer folds scored no image")
    return {"kind": "nested", **crossval.estimate(scored, samples, grouping, seed=seed), "per_fold": per_fold,
            "protocol": "the search repeated inside each outer fold: every configuration cross-validated on the "
                        "fold's training part alone, the best one scored once on the outer fold"}


def log_estimate(best: str, estimate: dict[str, Any], key: str = "dice") -> None:
    """One line: which estimate the chosen configuration has (its ``key`` score, the --objective's,
    and its Dice), or why it has none."""
    if estimate["kind"] == "none":
        log.warning("parameter search: no unbiased estimate for %s (%s); its cv_%s is a selection score, "
                    "biased upwards: add a fixed test split to the data, or --nested", best, estimate["reason"], key)
        return
    figures = "; ".join(f"{LABELS[name]} {estimate[name]['mean']:.4f}, 95 % CI [{estimate[name]['ci_low']:.4f}, "
                        f"{estimate[name]['ci_high']:.4f}]" for name in dict.fromkeys((key, "dice")) if name in estimate)
    log.info("parameter search: unbiased estimate of %s (%s): %s over %d images", best, estimate["kind"], figures,
             estimate["n_images"])
