"""parameter_search: LoRA settings on the same grouped folds, ranked, finished ones skipped; an
Optuna study that several worker processes share (each configuration trained once, a killed
worker's trial taken over), TPE and median pruning."""
from __future__ import annotations

import collections
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import REPO, SMALL, TINY_TRAIN

from main import main
from samlora.training import studies, trainer


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file (all values as strings)."""
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


# The cheapest real training: random-weight MobileSAM at 256 px on 128 px crops, frozen encoder
# (each image embedded once per worker), LoRA on the decoder only, 2 prompts, 2 folds, 1 epoch.
FAST = [*SMALL, "--freeze_encoder", "--lora_targets", "decoder", "--max_objects", "2", "--no_augment",
        "--val_fraction", "0.25", "--epochs", "1", "--num_folds", "2"]
GRID = ["--lora_ranks", "2,4", "--lora_alphas", "2", "--learning_rates", "1e-3,3e-3"]  # 4 configurations
# TINY_TRAIN without its --lora_rank / --lora_alpha: a search sets them from its lists
TINY_SEARCH = TINY_TRAIN[:TINY_TRAIN.index("--lora_rank")]

# A worker process: main.py with one intra-op thread, every finished training of a fold logged
# to $TRAINED_LOG ("configuration fold"), and with $BLOCK_IN_FOLD set, its first fold blocks
# after creating that file (the test kills it there, mid-trial).
WORKER = '''
import os, sys, time
sys.path.insert(0, os.environ["REPO"])
import torch
torch.set_num_threads(1)
from samlora.training import studies
from samlora.training import trainer
original = trainer.run_fold
def run_fold(config, samples, plan, shared):
    if os.environ.get("BLOCK_IN_FOLD"):
        open(os.environ["BLOCK_IN_FOLD"], "w").close()
        time.sleep(600)
    result = original(config, samples, plan, shared)
    with open(os.environ["TRAINED_LOG"], "a") as fh:
        fh.write(f"{os.path.basename(config.output_dir)} {plan.fold}\\n")
    return result
trainer.run_fold = run_fold
import main
sys.exit(main.main(sys.argv[1:]))
'''


def start_worker(cwd: Path, data: Path, *extra: str, block: Path | None = None) -> subprocess.Popen:
    """``parameter_search`` of the 4-configuration grid into ``cwd/search`` (a relative path, so
    that two searches in two folders write the same text), as a separate process. Heartbeats
    every 2 s: a killed worker's trial is taken over 4 s after its last one, and a worker slowed
    by a busy machine is not declared dead."""
    cwd.mkdir(exist_ok=True)
    (cwd / "worker.py").write_text(WORKER)
    env = {**os.environ, "REPO": str(REPO), "TRAINED_LOG": str(cwd / "trained.log"), "OMP_NUM_THREADS": "1"}
    env.pop("BLOCK_IN_FOLD", None)
    if block is not None:
        env["BLOCK_IN_FOLD"] = str(block)
    argv = ["parameter_search", "--data_dir", str(data), "--output_dir", "search", *FAST, *GRID,
            "--heartbeat", "2", *extra]
    return subprocess.Popen([sys.executable, "worker.py", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]


def trained(cwd: Path) -> collections.Counter:
    """How often each (configuration, fold) was trained to its end."""
    return collections.Counter(tuple(line.split()) for line in (cwd / "trained.log").read_text().splitlines())


def trials(search: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="search", storage=f"sqlite:///{search / 'study.db'}").get_trials()


def each_trained_once(cwd: Path) -> None:
    names = {f"rank{r}_alpha2_lr{lr}" for r in (2, 4) for lr in ("0.001", "0.003")}
    assert trained(cwd) == {(name, str(fold)): 1 for name in names for fold in (0, 1)}
    done = [t for t in trials(cwd / "search") if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["name"] for t in done) == sorted(names)


def test_help_offers_no_flag_that_a_trial_overrides() -> None:
    """Every trial sets rank, alpha and learning rate from the lists and cross-validates: the
    single-value flags of train would be ignored, so the search does not offer them."""
    from samlora.training.config import SEARCHED_OPTIONS

    done = subprocess.run([sys.executable, str(REPO / "main.py"), "parameter_search", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    flags = set(re.findall(r"^  (--\w+)", done.stdout, re.MULTILINE))  # the options, not the help texts
    overridden = {f"--{name}" for name in (*studies.SPACE_KEYS, *SEARCHED_OPTIONS)}
    assert overridden == {"--lora_rank", "--lora_alpha", "--learning_rate", "--cross_validation"}
    assert not flags & overridden, sorted(flags & overridden)
    assert {"--lora_ranks", "--lora_alphas", "--learning_rates", "--num_folds", "--lora_dropout"} <= flags
    assert main(["parameter_search", "--lora_rank", "4"]) == 2  # refused by argparse, not ignored


@pytest.mark.slow
def test_two_workers_share_a_grid_and_agree_with_one(em4: Path, tmp_path: Path) -> None:
    """Two workers started together on one SQLite study train each of the 4 configurations once
    (both folds), and write results.csv / best_config.json identical to a single worker's."""
    workers = [start_worker(tmp_path / "one", em4)] + [start_worker(tmp_path / "two", em4) for _ in range(2)]
    for proc in workers:  # the single worker runs beside the pair: the test's time is the pair's
        finish(proc)
    for cwd in (tmp_path / "one", tmp_path / "two"):
        each_trained_once(cwd)
        assert {t.state for t in trials(cwd / "search")} == {optuna.trial.TrialState.COMPLETE}
    for name in ("results.csv", "best_config.json"):
        assert (tmp_path / "one" / "search" / name).read_text() == (tmp_path / "two" / "search" / name).read_text()
    rows = (tmp_path / "two" / "search" / "results.csv").read_text().splitlines()
    assert len(rows) == 5 and all(row.endswith(",complete") for row in rows[1:])
    assert (tmp_path / "two" / "search" / "history.png").is_file()
    assert (tmp_path / "two" / "search" / "importance.png").is_file()


@pytest.mark.slow
def test_a_killed_worker_is_taken_over(em4: Path, tmp_path: Path) -> None:
    """A worker killed in the middle of its trial (SIGKILL: no clean-up at all) and started again:
    the study finishes, its trial retried once, every configuration trained to its end once."""
    cwd, marker = tmp_path / "run", tmp_path / "blocked"
    first = start_worker(cwd, em4, block=marker)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.2)
    other = start_worker(cwd, em4)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    again = start_worker(cwd, em4)
    finish(other)
    finish(again)
    each_trained_once(cwd)
    study = trials(cwd / "search")
    failed = [t for t in study if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1  # the killed worker's trial ...
    retries = [t for t in study if t.system_attrs.get("failed_trial") == failed[0].number]
    assert [(t.state, t.params) for t in retries] == [(optuna.trial.TrialState.COMPLETE, failed[0].params)]
    assert len((cwd / "search" / "results.csv").read_text().splitlines()) == 5


@pytest.mark.slow
def test_a_tpe_search_draws_within_the_bounds(em4: Path, tmp_path: Path, one_thread) -> None:
    out = tmp_path / "tpe"
    argv = ["parameter_search", "--data_dir", str(em4), "--output_dir", str(out), *FAST, "--sampler", "tpe",
            "--n_trials", "4", "--lora_ranks", "2,8", "--lora_alphas", "1,4", "--learning_rates", "1e-4,1e-2"]
    assert main(argv) == 0
    study = optuna.load_study(study_name="tpe", storage=f"sqlite:///{out / 'study.db'}")
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(study.trials) == len(done) == 4
    assert study.trials[0].distributions["learning_rate"].log  # the rate on a log scale
    for t in done:
        assert 2 <= t.params["lora_rank"] <= 8 and 1 <= t.params["lora_alpha"] <= 4
        assert 1e-4 <= t.params["learning_rate"] <= 1e-2
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + len({t.user_attrs["name"] for t in done})
    assert (out / "history.png").is_file() and (out / "importance.png").is_file()


def fake_run_fold(calls: list[str]) -> Any:
    """trainer.run_fold without training: the n-th configuration to start scores 0.9 - 0.1 n on
    every fold (so each after the first is below the median of the finished ones)."""
    order: list[str] = []

    def run_fold(config, samples, plan, shared):
        name = Path(config.output_dir).name
        calls.append(name)
        if name not in order:
            order.append(name)
        dice = 0.9 - 0.1 * order.index(name)
        return {"fold": plan.fold, "best_epoch": 0, "selection": "fake", "adapter": "none",
                "scored": [{"index": i, "key": samples[i].key, "dice": dice, "iou": dice / 2} for i in plan.score_idx]}
    return run_fold


@pytest.mark.slow
def test_pruning_stops_configurations_below_the_median(em4: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """--prune: after the first configuration finishes, each later one scores below the median
    at fold 0 and is stopped there; results.csv ranks the finished one and lists the pruned."""
    calls: list[str] = []
    monkeypatch.setattr(trainer, "run_fold", fake_run_fold(calls))
    out = tmp_path / "pruned"
    argv = ["parameter_search", "--data_dir", str(em4), "--output_dir", str(out), *FAST, *GRID, "--prune",
            "--prune_startup", "1"]
    assert main(argv) == 0
    assert len(calls) == 2 + 3  # both folds of the first, fold 0 of the three others
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert [r["state"] for r in rows] == ["complete", "pruned", "pruned", "pruned"]
    assert [r["folds"] for r in rows] == ["2", "1", "1", "1"]  # folds trained
    assert json.loads((out / "best_config.json").read_text())["name"] == calls[0]
    assert not (out / "importance.png").exists()  # one finished configuration says nothing about importance
    monkeypatch.setattr(trainer, "run_fold", lambda *a, **k: pytest.fail("re-trained finished work"))
    before = (out / "results.csv").read_text()
    assert main(argv) == 0  # a re-run: nothing left to do
    assert (out / "results.csv").read_text() == before


@pytest.mark.slow
def test_parameter_search_ranks_and_skips(em6: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "search"
    argv = ["parameter_search", "--data_dir", str(em6), "--output_dir", str(out), *TINY_SEARCH,
            "--lora_ranks", "2", "--lora_alphas", "4", "--learning_rates", "1e-3", "--num_folds", "2",
            "--epochs", "1", "--lora_blocks_grid", "all", "last2"]  # blocks searched like rank (vit_t: last stage)
    assert main(argv) == 0
    lines = (out / "results.csv").read_text().strip().splitlines()
    assert lines[0].startswith("name,lora_rank,lora_alpha,learning_rate,cv_dice,cv_dice_std")
    dices = [float(line.split(",")[4]) for line in lines[1:]]
    assert len(dices) == 2 and dices == sorted(dices, reverse=True)
    names = {row["name"]: row["lora_blocks"] for row in csv.DictReader(lines)}
    assert names == {"rank2_alpha4_lr0.001": "all", "rank2_alpha4_lr0.001_blockslast2": "last2"}
    best = json.loads((out / "best_config.json").read_text())
    assert best["cv_dice"] == dices[0] and best["config"]["lora_blocks"] == best["lora_blocks"]
    late = torch.load(out / "rank2_alpha4_lr0.001_blockslast2" / "fold_0" / "best.pt", weights_only=True)
    assert late["config"]["blocks"] == [8, 9]
    # every configuration trained on the same folds
    folds = {json.dumps(json.loads((d / "folds.json").read_text())["folds"]) for d in out.glob("rank*")}
    assert len(list(out.glob("rank*"))) == 2 and len(folds) == 1
    assert json.loads((out / "folds.json").read_text())["folds"] == json.loads(folds.pop())
    # a re-run skips finished configurations
    monkeypatch.setattr(trainer, "run_fold", lambda *a, **k: pytest.fail("re-trained a finished configuration"))
    assert main(argv) == 0


@pytest.mark.slow
def test_an_interrupted_search_continues_where_it_stopped(em4: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the second configuration: exit 130; the same command again queues that trial
    again (Optuna's retry), finishes the rest and trains no finished fold twice."""
    calls: list[str] = []
    fake = fake_run_fold(calls)

    def interrupted(config, samples, fold, *args, **kwargs):
        if len(set(calls)) == 1 and Path(config.output_dir).name not in calls:
            raise KeyboardInterrupt
        return fake(config, samples, fold, *args, **kwargs)

    monkeypatch.setattr(trainer, "run_fold", interrupted)
    out = tmp_path / "search"
    argv = ["parameter_search", "--data_dir", str(em4), "--output_dir", str(out), *FAST, *GRID]
    assert main(argv) == 130
    monkeypatch.setattr(trainer, "run_fold", fake)
    assert main(argv) == 0
    assert sorted(collections.Counter(calls).values()) == [2, 2, 2, 2]  # 4 configurations x 2 folds, once each
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}").trials
    assert [t.state.name for t in study].count("COMPLETE") == 4
    failed = [t for t in study if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and any(t.system_attrs.get("failed_trial") == failed[0].number for t in study)


@pytest.mark.slow
def test_a_worker_given_up_for_late_heartbeats_goes_on(em4: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose trial the study failed while it was still training (its heartbeats came
    too late, as on a stalled machine) goes on with the next configuration; the queued retry
    reads the finished run instead of training it again."""
    calls: list[str] = []
    fake = fake_run_fold(calls)
    out = tmp_path / "search"

    def given_up(config, samples, fold, *args, **kwargs):
        result = fake(config, samples, fold, *args, **kwargs)
        if len(calls) == 2:  # the first configuration's last fold: another worker declares it dead
            storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'study.db'}")
            study = optuna.load_study(study_name="search", storage=storage)
            running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))[0]
            storage.set_trial_state_values(running._trial_id, optuna.trial.TrialState.FAIL)
            studies.RETRY(study, running)  # as the study's heartbeat does
        return result

    monkeypatch.setattr(trainer, "run_fold", given_up)
    argv = ["parameter_search", "--data_dir", str(em4), "--output_dir", str(out), *FAST, *GRID]
    assert main(argv) == 0
    assert sorted(collections.Counter(calls).values()) == [2, 2, 2, 2]  # nothing trained twice
    assert len((out / "results.csv").read_text().splitlines()) == 5


def test_a_search_recorded_before_an_option_existed_still_joins(tmp_path: Path) -> None:
    """search.json and the study's identity, written before a training option existed, lack it:
    the option at its default joins the search, another value is refused, and so is another space."""
    import copy

    import parameter_search
    from samlora.core import runfiles
    from samlora.core.errors import UserError
    from samlora.training import runs
    from samlora.training.config import TrainConfig

    out = runfiles.OutputDir(tmp_path / "search", "parameter_search", shared=True)
    base = TrainConfig(data_dir="d", output_dir=str(out.path))
    identity = parameter_search.search_identity(base, studies.SearchSpace("grid", (2,), (4.0,), (1e-3,)), "data")
    defaults = studies.identity_defaults(runs.option_defaults(base))
    older = copy.deepcopy(identity)
    del older["base"]["max_objects"]  # a search made before --max_objects
    out.claim(overwrite=False)
    runfiles.write_json(out.path / parameter_search.SEARCH_FILE, older)
    assert parameter_search.joins(out, identity, defaults, overwrite=False)
    study = optuna.create_study()
    study.set_user_attr(studies.IDENTITY, older)
    studies.check_study(study, identity, defaults, "sqlite://", overwrite=False)
    changed = {**identity, "base": {**identity["base"], "max_objects": 3}}
    with pytest.raises(UserError, match="base.max_objects: 32 -> 3"):
        parameter_search.joins(out, changed, defaults, overwrite=False)
    with pytest.raises(UserError, match="base.max_objects: 32 -> 3"):
        studies.check_study(study, changed, defaults, "sqlite://", overwrite=False)
    blocks = {**identity, "space": {**identity["space"], "lora_blocks": ["all", "last3"]}}
    with pytest.raises(UserError, match=r"space.lora_blocks: \['all'\] -> \['all', 'last3'\]"):
        studies.check_study(study, blocks, defaults, "sqlite://", overwrite=False)


@pytest.mark.slow
def test_overwrite_replaces_the_study_in_its_database(em4: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """--overwrite of a finished search: the study is made afresh in the same study.db (opened once
    under the lock, before the directory is cleared), and every configuration is trained again."""
    calls: list[str] = []
    monkeypatch.setattr(trainer, "run_fold", fake_run_fold(calls))
    out = tmp_path / "search"
    argv = ["parameter_search", "--data_dir", str(em4), "--output_dir", str(out), *FAST, *GRID]
    assert main(argv) == 0 and main([*argv, "--overwrite"]) == 0
    assert sorted(collections.Counter(calls).values()) == [4, 4, 4, 4]
    assert [t.state for t in trials(out)] == [optuna.trial.TrialState.COMPLETE] * 4
    assert len((out / "results.csv").read_text().splitlines()) == 5


def noisy_run_fold(calls: list[tuple[str, str, list[int], list[int]]]) -> Any:
    """trainer.run_fold without training: every image's Dice is a fixed pseudo-random number of
    (configuration, image), so no configuration is truly better; each call is recorded as
    (configuration, run directory, training + selection indices, scored indices)."""
    import zlib

    from samlora.core import runfiles

    def run_fold(config, samples, plan, shared):
        name = Path(config.output_dir).name if "nested" not in Path(config.output_dir).parts else \
            Path(config.output_dir).parents[1].name
        calls.append((name, config.output_dir, sorted([*plan.train_idx, *plan.select_idx]), list(plan.score_idx)))
        rows = [{"index": i, "key": samples[i].key, "iou": 0.0,
                 "dice": 0.3 + 0.6 * (zlib.crc32(f"{name}/{samples[i].key}".encode()) % 1000) / 1000}
                for i in plan.score_idx]
        result = {"fold": plan.fold, "best_epoch": 0, "selection": "fake", "adapter": "none", "scored": rows,
                  "train_size": len(plan.train_idx)}  # as trainer.run_fold records it (the final fit's steps)
        runfiles.write_json(plan.directory / "done.json",
                            result)  # as trainer.run_fold does: a finished fold is read, not trained again
        return result
    return run_fold


@pytest.mark.slow
def test_nested_search_gives_the_winner_an_unbiased_estimate(em4: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """--nested: each configuration is cross-validated again inside each outer fold's training
    part (never on that fold's images); per outer fold the best inner score picks a configuration,
    whose outer-fold images give best_config.json's estimate (kind nested). results.csv says that
    cv_dice is the selection score."""

    calls: list[tuple[str, str, list[int], list[int]]] = []
    monkeypatch.setattr(trainer, "run_fold", noisy_run_fold(calls))
    out = tmp_path / "search"
    argv = ["parameter_search", "--data_dir", str(em4), "--output_dir", str(out), *FAST, *GRID, "--nested"]
    assert main(argv) == 0
    outer = json.loads((out / "folds.json").read_text())["folds"]
    for name, run, trained_on, scored in calls:
        if "nested" in Path(run).parts:  # the search inside outer fold k sees only that fold's training part
            k = int(Path(run).name.split("_")[1])
            assert set(trained_on) | set(scored) <= set(outer[k]["train"])
    assert len(calls) == 4 * 2 + 4 * 2 * 2  # 4 configurations x (2 outer folds + 2 x 2 inner folds)
    rows = read_csv(out / "results.csv")
    assert {r["ranked_by"] for r in rows} == {"cv_dice (selection score)"}
    best = json.loads((out / "best_config.json").read_text())
    estimate = best["estimate"]
    assert estimate["kind"] == "nested" and "selection score" in best["selection_score"]
    scored = []
    for k, fold in enumerate(estimate["per_fold"]):
        inner = {r["name"]: json.loads((out / r["name"] / "nested" / f"outer_{k}" / "summary.json").read_text())
                 ["cv_estimate"]["dice"]["mean"] for r in rows}
        assert fold["chosen"] == max(sorted(inner), key=lambda n: inner[n])  # the best inner score picks
        chosen = json.loads((out / fold["chosen"] / "summary.json").read_text())["folds"][k]["scored"]
        assert {s["index"] for s in chosen} == set(outer[k]["val"])
        scored += [s["dice"] for s in chosen]
    assert estimate["n_images"] == 4 and estimate["dice"]["mean"] == pytest.approx(sum(scored) / 4)
    assert best["cv_dice"] >= max(float(r["cv_dice"]) for r in rows)  # the winner's score is the maximum
    monkeypatch.setattr(trainer, "run_fold", lambda *a, **k: pytest.fail("re-trained finished work"))
    assert main(argv) == 0  # a re-run reads every inner cross-validation


@pytest.mark.slow
def test_the_winner_is_scored_once_on_the_fixed_test_split(em_split: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With a fixed test split the chosen configuration alone is retrained on all training data
    (its final/) and scored once on the test images: best_config.json estimate, kind test_split.
    The test images take no part in ranking (no configuration's folds score them)."""
    calls: list[tuple[str, str, list[int], list[int]]] = []
    monkeypatch.setattr(trainer, "run_fold", noisy_run_fold(calls))
    out = tmp_path / "search"
    argv = ["parameter_search", "--data_dir", str(em_split), "--output_dir", str(out), *FAST, *GRID,
            "--slice_block", "1", "--fold_gap", "0"]  # two training sections: two folds
    assert main(argv) == 0
    test = json.loads((out / "folds.json").read_text())["test"]
    best = json.loads((out / "best_config.json").read_text())
    finals = [c for c in calls if Path(c[1]).name == "final" or c[3] == test]
    assert len(calls) == 4 * 2 + 1 and len(finals) == 1 and finals[0][0] == best["name"]
    assert all(not set(c[3]) & set(test) for c in calls if c not in finals)
    estimate = best["estimate"]
    assert estimate["kind"] == "test_split" and estimate["n_images"] == len(test) == 1
    summary = json.loads((out / best["name"] / "summary.json").read_text())
    assert estimate["dice"] == summary["test"]["dice"]
    assert estimate["run"] == str(Path(best["run"]) / "final")
    monkeypatch.setattr(trainer, "run_fold", lambda *a, **k: pytest.fail("re-trained finished work"))
    assert main(argv) == 0  # the final fit is read


@pytest.mark.slow
def test_search_marks_the_augmentation_of_each_lora_blocks_setting(em4: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """--lora_blocks_grid all last2: late LoRA (a cached encoder start) trains on fixed views
    without intensity changes, full-depth LoRA on random ones with them; the search says so up
    front and results.csv's augmentation column names each; without a test split or --nested the
    winner's estimate is none, with the reason."""

    monkeypatch.setattr(trainer, "run_fold", noisy_run_fold([]))
    out = tmp_path / "search"
    argv = ["parameter_search", "--data_dir", str(em4), "--output_dir", str(out), *SMALL, "--max_objects", "2",
            "--epochs", "1", "--num_folds", "2", "--lora_ranks", "2", "--lora_alphas", "2", "--learning_rates",
            "1e-3", "--lora_blocks_grid", "all", "last2"]
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    rows = {r["lora_blocks"]: r["augmentation"] for r in read_csv(out / "results.csv")}
    assert rows == {"all": "random flip/rotation (8 views) + intensity",
                    "last2": "2 fixed flip/rotation view(s), no intensity"}
    assert any("different augmentation" in r.getMessage() for r in caplog.records)
    assert any("no unbiased estimate" in r.getMessage() for r in caplog.records)
    estimate = json.loads((out / "best_config.json").read_text())["estimate"]
    assert estimate["kind"] == "none" and "--nested" in estimate["reason"]


@pytest.mark.parametrize("extra", [("--sampler", "tpe", "--n_trials", "2"), ("--prune",)])
def test_nested_refuses_what_the_outer_scores_steer(em4: Path, tmp_path: Path, extra: tuple[str, ...],
                                                    caplog) -> None:
    """--nested with TPE or --prune (both decided by the outer folds' scores): one line, exit 2."""
    argv = ["parameter_search", "--data_dir", str(em4), "--output_dir", str(tmp_path / "s"), *FAST,
            "--lora_ranks", "2,4", "--lora_alphas", "2,4", "--learning_rates", "1e-4,1e-3", "--nested", *extra]
    assert main(argv) == 2
    assert any("--nested needs --sampler grid without --prune" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "s").exists()


def test_nested_refuses_an_outer_fold_it_cannot_split(em3: Path, tmp_path: Path, caplog) -> None:
    """Three consecutive sections in blocks of two, two folds: one outer fold trains on a single
    block, which cannot be cross-validated inside: one line, exit 2, nothing written."""
    argv = ["parameter_search", "--data_dir", str(em3), "--output_dir", str(tmp_path / "s"), *FAST,
            "--slice_block", "2", "--fold_gap", "0", "--lora_ranks", "2", "--lora_alphas", "2",
            "--learning_rates", "1e-3", "--nested"]
    assert main(argv) == 2
    assert any("--nested: the training part of outer fold" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_a_finished_search_gets_its_nested_estimate_later(em4: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The same command with --nested and another --study_name in a finished search's directory
    reads the outer runs and trains only the searches inside the folds."""
    calls: list[tuple[str, str, list[int], list[int]]] = []
    monkeypatch.setattr(trainer, "run_fold", noisy_run_fold(calls))
    out = tmp_path / "search"
    argv = ["parameter_search", "--data_dir", str(em4), "--output_dir", str(out), *FAST, *GRID]
    assert main(argv) == 0
    assert json.loads((out / "best_config.json").read_text())["estimate"]["kind"] == "none"
    calls.clear()
    assert main([*argv, "--nested", "--study_name", "nested"]) == 0
    assert len(calls) == 4 * 2 * 2 and all("nested" in Path(c[1]).parts for c in calls)
    assert json.loads((out / "best_config.json").read_text())["estimate"]["kind"] == "nested"


def test_objective_ais_needs_the_instance_decoder(em4: Path, tmp_path: Path) -> None:
    out = tmp_path / "search"
    assert main(["parameter_search", "--data_dir", str(em4), "--output_dir", str(out), *FAST, *GRID,
                 "--objective", "ais"]) == 2
    assert not out.exists()


@pytest.mark.slow
def test_objective_ais_ranks_by_the_ais_msa(em4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--objective ais: the rows' score is their cv_ais_msa, and they are ordered by it."""
    from samlora.models import instance_decoder
    from samlora.training import ais

    monkeypatch.setattr(ais, "new_decoder", lambda size: instance_decoder.InstanceDecoder(initial_features=8,
                                                                                          image_size=size))
    out = tmp_path / "search"
    assert main(["parameter_search", "--data_dir", str(em4), "--output_dir", str(out), *FAST,
                 "--lora_ranks", "2", "--lora_alphas", "2", "--learning_rates", "1e-3,3e-3",
                 "--instance_decoder", "--objective", "ais"]) == 0
    rows = read_csv(out / "results.csv")
    assert len(rows) == 2 and all(r["score"] == r["cv_ais_msa"] != "" for r in rows)
    assert float(rows[0]["score"]) >= float(rows[1]["score"])
    assert {r["ranked_by"] for r in rows} == {"cv_ais_msa (selection score)"}
    assert json.loads((out / "search.json").read_text())["objective"] == "ais"
