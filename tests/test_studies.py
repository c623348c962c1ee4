"""studies.py: the search space, a study's identity, opening a storage that another worker is creating."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from samlora.core.errors import UserError
from samlora.data.sample import Sample
from samlora.training import studies


def test_grid_and_tpe_spaces() -> None:
    grid = studies.SearchSpace("grid", (2, 4, 8), (4.0,), (1e-4, 1e-3), seed=3)
    assert grid.budget == 6 and grid.fixed == ["lora_alpha"]
    assert grid.record() == {"sampler": "grid", "lora_rank": [2, 4, 8], "lora_alpha": [4.0],
                             "learning_rate": [1e-4, 1e-3]}
    tpe = studies.SearchSpace("tpe", (2, 16), (2.0, 8.0), (1e-5, 1e-3), n_trials=30)
    assert tpe.budget == 30 and "n_trials" not in tpe.record()  # a TPE search may be extended
    assert studies.SearchSpace("grid", (2,), (4.0,), (1e-3,), lora_blocks=("all",)).record() == {
        "sampler": "grid", "lora_rank": [2], "lora_alpha": [4.0], "learning_rate": [1e-3]}  # no blocks dimension


def test_lora_blocks_are_a_categorical_dimension() -> None:
    """``--lora_blocks_grid``: the specs multiply the grid and are suggested as a category by
    either sampler; a single late spec is recorded too (it is not the default)."""
    import optuna

    grid = studies.SearchSpace("grid", (2, 4), (4.0,), (1e-3,), seed=0, lora_blocks=("all", "last3"))
    assert grid.budget == 4 and grid.record()["lora_blocks"] == ["all", "last3"]
    assert grid.fixed == ["lora_alpha", "learning_rate"]
    study = optuna.create_study(direction="maximize", sampler=grid.make_sampler(0))
    seen = set()
    study.optimize(lambda trial: (seen.add(grid.suggest(trial)), 0.5)[1], n_trials=4)
    assert seen == {(r, 4.0, 1e-3, b) for r in (2, 4) for b in ("all", "last3")}
    tpe = studies.SearchSpace("tpe", (2, 8), (2.0, 8.0), (1e-4, 1e-2), n_trials=3, lora_blocks=("6-11", "last3"))
    trial = optuna.create_study(sampler=tpe.make_sampler(0)).ask()
    assert tpe.suggest(trial)[3] in ("6-11", "last3")
    assert studies.SearchSpace("grid", (2,), (4.0,), (1e-3,), lora_blocks=("last3",)).record()["lora_blocks"] == ["last3"]


def test_differences_name_what_changed() -> None:
    old = {"space": {"lora_rank": [2, 4]}, "data": "a", "base": {"epochs": 3}}
    new = {"space": {"lora_rank": [2, 8]}, "data": "a", "base": {"epochs": 3}, "extra": 1}
    assert studies.differences(old, new) == ["space.lora_rank: [2, 4] -> [2, 8]"]
    assert studies.differences({}, new) == []


def test_the_data_fingerprint_sees_one_pixel() -> None:
    image, labels = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.int32)
    sample = Sample(image, labels, "g", "t", Path("a.png"), "a.png")
    before = studies.data_fingerprint([sample])
    image[3, 3, 0] = 1
    assert studies.data_fingerprint([sample]) != before


def test_opening_waits_while_another_worker_creates_the_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers of a job array open a new database together: the one that loses the race to
    create a table tries again instead of stopping."""
    import sqlalchemy

    calls = []

    def storage(url, **kwargs):
        calls.append(url)
        if len(calls) == 1:
            raise sqlalchemy.exc.IntegrityError("CREATE TABLE studies", {}, Exception("duplicate key value"))
        return "storage"

    monkeypatch.setattr(studies, "RDBStorage", storage)
    monkeypatch.setattr(studies.time, "sleep", lambda s: None)
    assert studies.open_storage("postgresql://u@db/x", heartbeat=5) == "storage" and len(calls) == 2


def test_a_password_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlalchemy

    def refused(url, **kwargs):
        raise sqlalchemy.exc.OperationalError("connect", {}, Exception("connection refused"))

    monkeypatch.setattr(studies, "RDBStorage", refused)
    with pytest.raises(UserError) as error:
        studies.open_storage("postgresql://me:hunter2@db:5432/x", heartbeat=5)
    assert "hunter2" not in str(error.value) and "postgresql://me:***@db:5432/x" in str(error.value)


def test_a_failing_configuration_is_tried_twice_and_the_search_ends(tmp_path: Path) -> None:
    """A configuration that fails every time (an error, or a worker that dies) is queued again
    once: its retry's failure is final, and the worker started after it finds the search over."""
    import optuna

    from samlora.core.runfiles import DirectoryLock

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = studies.open_study(studies.open_storage(url, heartbeat=60), url, "s", {}, False,
                               optuna.pruners.NopPruner())
    space = studies.SearchSpace("grid", (2,), (4.0,), (1e-3,))

    def fails(trial: optuna.Trial) -> float:
        raise RuntimeError("always")

    ended = False
    for _ in range(4):  # each start of a worker: the trial's error stops it
        try:
            studies.run_worker(study, space, lambda: DirectoryLock(tmp_path), fails, heartbeat=60)
            ended = True
            break
        except RuntimeError:
            pass
    trials = study.get_trials()
    assert ended and [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 2
    assert studies.tries_before(trials[1]) == [0]
