"""search_estimate.py: the nested estimate and its report follow the search's --objective."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from samlora.data import dataset as data
from samlora.data import folds as folds_lib
from samlora.training import search_estimate


def fake_rows() -> tuple[list[dict], dict[str, dict]]:
    """Two finished configurations over two outer folds of images 0, 1 | 2, 3: ``a`` has the
    better inner AIS mSA in fold 0, ``b`` in fold 1 (their inner Dice says the opposite)."""
    rows = [{"name": "a", "run": "a", "state": "complete", "nested": [0.6, 0.1]},
            {"name": "b", "run": "b", "state": "complete", "nested": [0.2, 0.5]}]

    def scored(indices: list[int], msa: float) -> list[dict]:
        return [{"index": i, "dice": 0.9 - msa, "iou": 0.5, "ais_msa": msa} for i in indices]

    summaries = {"a": {"folds": [{"scored": scored([0, 1], 0.4)}, {"scored": scored([2, 3], 0.3)}]},
                 "b": {"folds": [{"scored": scored([0, 1], 0.2)}, {"scored": scored([2, 3], 0.7)}]}}
    return rows, summaries


def test_nested_under_objective_ais_picks_and_reports_the_ais_msa(em4: Path, caplog) -> None:
    """With ``key="ais_msa"`` each outer fold's pick is the best inner AIS mSA, ``per_fold`` names
    that score (``inner_cv_ais_msa``, the outer ``ais_msa`` beside the Dice), the estimate holds
    the AIS mSA, and the log line gives it first."""
    rows, summaries = fake_rows()
    samples = data.load_dataset(em4)
    estimate = search_estimate.nested(rows, 2, summaries.__getitem__, samples, folds_lib.Grouping(), key="ais_msa")
    assert [f["chosen"] for f in estimate["per_fold"]] == ["a", "b"]
    first = estimate["per_fold"][0]
    assert first["inner_cv_ais_msa"] == 0.6 and "inner_cv_dice" not in first
    assert first["ais_msa"] == pytest.approx(0.4) and first["dice"] == pytest.approx(0.5)
    assert estimate["ais_msa"]["mean"] == pytest.approx((0.4 * 2 + 0.7 * 2) / 4)
    with caplog.at_level(logging.INFO):
        search_estimate.log_estimate("a", estimate, "ais_msa")
    line = caplog.records[-1].getMessage()
    assert line.index("AIS mSA 0.5500") < line.index("Dice")


def test_nested_by_default_ranks_and_reports_the_dice(em4: Path) -> None:
    """The default key is the Dice: the per-fold record is as before (``inner_cv_dice``)."""
    rows, summaries = fake_rows()
    estimate = search_estimate.nested(rows, 2, summaries.__getitem__, data.load_dataset(em4), folds_lib.Grouping())
    assert set(estimate["per_fold"][0]) == {"fold", "chosen", "inner_cv_dice", "n_images", "dice"}
