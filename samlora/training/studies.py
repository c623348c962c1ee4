"""Optuna studies that many search workers share: the storage, the search space, who trains what next.

A search is one Optuna study in a database (``--storage``: SQLite by default, PostgreSQL or any
URL Optuna accepts for several machines). Every process started with the same command is a
worker of that study. A worker takes the next piece of work while it holds the lock of the
shared output directory (:class:`runfiles.DirectoryLock`), so two workers never start the same
configuration: it first fails the trials of dead workers (Optuna's heartbeat: no heartbeat for
``2 x --heartbeat`` seconds) and queues each failed configuration again, once (Optuna's
``RetryHeartbeatStaleTrialCallback``, also for trials that stopped with an error), then
either resumes a queued trial or asks the sampler for a new one while fewer than the budget
(the grid's size, or ``--n_trials``) were started. A worker returns when every trial of the
budget has finished, waiting while the last ones run elsewhere, ready to take over a dead
worker's trial.

The study records what it searches (its *identity*: sampler, space, training options and a
fingerprint of the data); a worker whose command differs is refused before it writes anything.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, Trial, TrialState

from samlora.core.errors import UserError
from samlora.core.runfiles import DirectoryLock
from samlora.data.sample import Sample
from samlora.training.runs import differences

log = logging.getLogger(__name__)

STUDY_DB = "study.db"
IDENTITY = "samlora_search"  # the study's user attribute holding the search's identity
SAMPLERS = ("grid", "tpe")
SPACE_KEYS = ("lora_rank", "lora_alpha", "learning_rate")
MAX_RETRIES = 1  # a failed configuration is tried again once: a second failure is its own


@contextlib.contextmanager
def experimental() -> Iterator[None]:
    """Optuna's experimental APIs (the heartbeat and its retries) without their warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


with experimental():
    RETRY = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)  # the storage's and retry_failed's


# --------------------------------------------------------------------------------------------
# The search space
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """What a search tries: every combination of the lists (``grid``), or ``n_trials`` draws of
    Optuna's TPE sampler between the bounds (``tpe``; the learning rate on a log scale).
    ``lora_blocks``: ``--lora_blocks`` specs, a categorical choice in both samplers; the default,
    LoRA in every block, is no dimension at all (a search without it keeps its identity)."""

    sampler: str
    lora_rank: tuple[int, ...]
    lora_alpha: tuple[float, ...]
    learning_rate: tuple[float, ...]
    n_trials: int | None = None
    seed: int = 0
    lora_blocks: tuple[str, ...] = ("all",)

    @property
    def keys(self) -> tuple[str, ...]:
        """The searched hyper-parameters: SPACE_KEYS, and ``lora_blocks`` unless it is all blocks alone."""
        return SPACE_KEYS + (() if self.lora_blocks == ("all",) else ("lora_blocks",))

    @property
    def budget(self) -> int:
        """How many configurations the search trains."""
        if self.sampler == "grid":
            return len(self.lora_rank) * len(self.lora_alpha) * len(self.learning_rate) * len(self.lora_blocks)
        return int(self.n_trials or 0)

    @property
    def fixed(self) -> list[str]:
        """The hyper-parameters with one value in the whole search."""
        return [key for key in self.keys if len(set(getattr(self, key))) == 1]

    def record(self) -> dict[str, Any]:
        """The space as JSON (n_trials left out: a TPE search may be extended)."""
        return {"sampler": self.sampler, **{key: list(getattr(self, key)) for key in self.keys}}

    def suggest(self, trial: Trial) -> tuple[int, float, float, str]:
        """The trial's (rank, alpha, learning rate, LoRA blocks)."""
        if self.sampler == "grid":
            values = (trial.suggest_categorical("lora_rank", list(self.lora_rank)),
                      trial.suggest_categorical("lora_alpha", list(self.lora_alpha)),
                      trial.suggest_categorical("learning_rate", list(self.learning_rate)))
        else:
            values = (trial.suggest_int("lora_rank", self.lora_rank[0], self.lora_rank[-1]),
                      trial.suggest_float("lora_alpha", self.lora_alpha[0], self.lora_alpha[-1]),
                      trial.suggest_float("learning_rate", self.learning_rate[0], self.learning_rate[-1], log=True))
        blocks = trial.suggest_categorical("lora_blocks", list(self.lora_blocks)) if "lora_blocks" in self.keys \
            else self.lora_blocks[0]
        return (*values, blocks)

    def make_sampler(self, started: int) -> optuna.samplers.BaseSampler:
        """The sampler for the next trial. TPE is seeded by the number of trials started so far,
        so a search gives the same trials whichever worker asks (two workers with one seed
        would draw the same first points)."""
        if self.sampler == "grid":
            return optuna.samplers.GridSampler({key: list(getattr(self, key)) for key in self.keys}, seed=self.seed)
        return optuna.samplers.TPESampler(seed=self.seed + started, constant_liar=True)


def data_fingerprint(samples: Sequence[Sample]) -> str:
    """SHA-256 over every sample's key, pixels and labels: the same data on every machine."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(sample.key.encode())
        digest.update(sample.image.tobytes())
        digest.update(sample.labels.tobytes())
    return digest.hexdigest()


def identity_defaults(options: dict[str, Any]) -> dict[str, Any]:
    """What an identity recorded before an option existed means by leaving it out (for
    :func:`runs.differences`): ``options``, every training option's default, for its ``base``;
    LoRA in every block for its ``space``."""
    return {"base": options, "space": {"lora_blocks": list(SearchSpace.lora_blocks)}}


# --------------------------------------------------------------------------------------------
# Storage and study
# --------------------------------------------------------------------------------------------
def default_storage(output_dir: str | Path) -> str:
    """``sqlite:///<output_dir>/study.db``."""
    return f"sqlite:///{Path(output_dir) / STUDY_DB}"


def shown(url: str) -> str:
    """The URL with its password hidden."""
    try:
        import sqlalchemy

        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL that does not parse is shown as given
        return url


def quiet_optuna() -> None:
    """Optuna's errors go to our log; its per-trial lines are ours (a failed trial's error is
    reported once, by main, without Optuna's traceback)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


def open_storage(url: str, heartbeat: int) -> RDBStorage:
    """Optuna's database storage with heartbeats every ``heartbeat`` s (a trial without one for
    twice that is a dead worker's, queued again); an unusable URL is a UserError."""
    sqlite = url.startswith("sqlite")
    hint = ("check the path (its folder must exist)" if sqlite else
            "check the URL, that the server runs and accepts connections from this machine, and the credentials")
    try:
        return _rdb_storage(url, heartbeat, {"connect_args": {"timeout": 60}} if sqlite else None)
    except ImportError:
        raise UserError(f"--storage {shown(url)}: the database driver for this URL is not installed (PostgreSQL: "
                        "psycopg, pinned in requirements.txt)") from None
    except Exception as exc:  # noqa: BLE001 - sqlalchemy's errors, Optuna's schema check: one line each
        import sqlalchemy

        if isinstance(exc, sqlalchemy.exc.ArgumentError):
            raise UserError(f"--storage {shown(url)} is not a database URL Optuna accepts (e.g. "
                            "sqlite:///runs/search/study.db or postgresql://user:password@host/db)") from None
        if isinstance(exc, (sqlalchemy.exc.SQLAlchemyError, RuntimeError)):
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise UserError(f"cannot open the study storage {shown(url)} ({reason}): {hint}") from None
        raise


CREATE_ATTEMPTS = 5


def _rdb_storage(url: str, heartbeat: int, engine_kwargs: dict[str, Any] | None) -> RDBStorage:
    """``RDBStorage``, tried again while another worker is creating the tables of a new database
    (workers of a job array start together)."""
    import sqlalchemy

    for attempt in range(CREATE_ATTEMPTS):
        try:
            with experimental():  # the heartbeat
                return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                                  grace_period=2 * heartbeat, heartbeat_stale_trial_callback=RETRY)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError) as exc:
            race = not isinstance(exc, sqlalchemy.exc.OperationalError) or "already exists" in str(exc)
            if attempt + 1 == CREATE_ATTEMPTS or not race:  # a duplicate table, type or row: a race
                raise
            time.sleep(1.0 + attempt)
    raise AssertionError("not reached")


def find_study(storage: RDBStorage, name: str) -> optuna.Study | None:
    """The study ``name`` in ``storage``, or None."""
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return None
    return optuna.load_study(study_name=name, storage=storage)


def check_study(study: optuna.Study, identity: dict[str, Any], defaults: dict[str, Any], url: str,
                overwrite: bool) -> None:
    """Refuse a study of another search (unless ``overwrite``; ``defaults``: see
    :func:`identity_defaults`), and an ``overwrite`` of a study whose trials are running on live workers."""
    where = f"study {study.study_name!r} in {shown(url)}"
    if overwrite:
        with experimental():
            optuna.storages.fail_stale_trials(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if running:
            raise UserError(f"--overwrite: {len(running)} trial(s) of {where} are running on other workers; stop "
                            "them first, or start this worker without --overwrite to join the search")
        return
    recorded = study.user_attrs.get(IDENTITY)
    if recorded is None:
        return
    diff = differences(recorded, identity, defaults)
    if diff:
        raise UserError(f"{where} was made for another search ({'; '.join(diff[:3])}): use the same options "
                        "and data, another --study_name (configurations finished in this --output_dir are reused), "
                        "or --overwrite to start afresh")


def check_storage(storage: RDBStorage, url: str, name: str, identity: dict[str, Any], defaults: dict[str, Any],
                  overwrite: bool) -> None:
    """The study ``name`` in ``storage``, if there is one yet, fits (:func:`check_study`)."""
    study = find_study(storage, name)
    if study is not None:
        check_study(study, identity, defaults, url, overwrite)


def precheck(url: str, name: str, identity: dict[str, Any], defaults: dict[str, Any], overwrite: bool,
             heartbeat: int) -> None:
    """Before the output directory is created: the storage opens and its study (if any) fits."""
    storage = open_storage(url, heartbeat)
    try:
        check_storage(storage, url, name, identity, defaults, overwrite)
    finally:
        storage.engine.dispose()


def open_study(storage: RDBStorage, url: str, name: str, identity: dict[str, Any], overwrite: bool,
               pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """The search's study, joined, created or (``overwrite``) made afresh; call it holding the
    output directory's lock, after :func:`check_storage`, so that workers starting together create
    it once. Its sampler is set by :func:`run_worker` before each trial."""
    if overwrite and find_study(storage, name) is not None:
        optuna.delete_study(study_name=name, storage=storage)
        log.warning("--overwrite: deleted the earlier study %r in %s", name, shown(url))
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True,
                                pruner=pruner)
    if IDENTITY not in study.user_attrs:
        study.set_user_attr(IDENTITY, identity)
    return study


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------
def worker_name() -> str:
    """``host:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclasses.dataclass
class Progress:
    """Where the study stands: what can be started, what is running elsewhere."""

    started: int  # trials ever created, retries included
    fresh: int  # trials the sampler proposed (not retries): at most the budget
    waiting: int  # queued retries
    running: int
    budget: int

    @classmethod
    def of(cls, study: optuna.Study, budget: int) -> "Progress":
        trials = study.get_trials(deepcopy=False)
        return cls(started=len(trials), fresh=sum(not tries_before(t) for t in trials),
                    waiting=sum(t.state == TrialState.WAITING for t in trials),
                    running=sum(t.state == TrialState.RUNNING for t in trials), budget=budget)

    @property
    def startable(self) -> bool:
        return self.waiting > 0 or self.fresh < self.budget

    @property
    def finished(self) -> bool:
        return not self.startable and self.running == 0


def tries_before(trial: FrozenTrial) -> list[int]:
    """The numbers of the earlier tries of the trial's configuration, the first one first
    (Optuna's retry history; empty for a first try)."""
    with experimental():
        return RetryHeartbeatStaleTrialCallback.retry_history(trial)


def retried(trials: Sequence[FrozenTrial], number: int) -> bool:
    """Whether trial ``number`` was queued again (a later trial is its retry)."""
    return any(tries_before(t)[-1:] == [number] for t in trials)


def retry_failed(study: optuna.Study) -> None:
    """Queue again every failed trial that is a first try and was not retried yet: a dead
    worker's (Optuna fails those whose heartbeat stopped, and the storage's :data:`RETRY` queues
    them) or one that stopped with an error (an interrupt, a crash). A retry that fails too is
    not tried again. Called under the directory lock, so no trial is queued twice."""
    running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    with experimental():
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        if trial.state != TrialState.FAIL:
            continue
        queue = len(tries_before(trial)) < MAX_RETRIES and not retried(trials, trial.number)
        if queue:
            RETRY(study, trial)
        stale = trial.number in running
        if queue or stale:
            why = "its worker stopped sending heartbeats" if stale else "it stopped before it finished"
            log.warning("trial %d (%s): %s; %s", trial.number, trial.user_attrs.get("name", trial.params), why,
                        "queued again" if queue or retried(trials, trial.number) else
                        f"not tried again (tried {MAX_RETRIES + 1} times)")


def given_up(study: optuna.Study, number: int) -> bool:
    """Whether trial ``number`` was failed and queued again by another worker (its heartbeats
    came too late), rather than stopped by an error of its own."""
    trials = study.get_trials(deepcopy=False)
    return trials[number].state == TrialState.FAIL and retried(trials, number)


def run_worker(study: optuna.Study, space: SearchSpace, lock: Callable[[], DirectoryLock],
               objective: Callable[[Trial], float], heartbeat: int) -> None:
    """Run trials until the study's budget is finished (see the module docstring).

    ``lock()`` gives the output directory's lock, held while the next trial is chosen and
    released by the time ``objective`` starts. While the last trials run on other workers, the
    study is looked at again every ``heartbeat`` seconds.
    """
    announced = False  # the wait for other workers' trials
    while True:
        held = lock().acquire()
        try:
            retry_failed(study)
            progress = Progress.of(study, space.budget)
            if progress.startable:
                announced = False
                study.sampler = space.make_sampler(progress.started)

                mine: list[int] = []

                def unlocked(trial: Trial) -> float:
                    mine.append(trial.number)
                    held.release()  # the trial is ours (RUNNING): others may choose theirs
                    return objective(trial)

                try:
                    study.optimize(unlocked, n_trials=1)
                except Exception:
                    if not (mine and given_up(study, mine[0])):
                        raise
                    log.warning("trial %d was given up by the study (no heartbeat for %d s: a stalled machine?) and "
                                "queued again while this worker trained it; the retry reads what it finished. Raise "
                                "--heartbeat if this machine stalls", mine[0], 2 * heartbeat)
                continue
        finally:
            held.release()
        if progress.finished:
            return
        if not announced:
            announced = True
            log.info("%d trial(s) running on other workers: waiting for them (a dead worker's trial is taken "
                     "over after %d s without its heartbeat)", progress.running, 2 * heartbeat)
        time.sleep(heartbeat)


# --------------------------------------------------------------------------------------------
# What the study found
# --------------------------------------------------------------------------------------------
RESULT = "result"  # a finished trial's user attribute: its results row


def result_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per configuration (the first trial that completed it): completed ones best first
    (ties by name), then pruned ones by name. The order does not depend on which worker ran what."""
    rows: dict[str, dict[str, Any]] = {}
    for state in (TrialState.COMPLETE, TrialState.PRUNED):  # a configuration finished once counts as finished
        for trial in study.get_trials(deepcopy=False, states=(state,)):
            row = trial.user_attrs.get(RESULT)
            if row is not None:
                rows.setdefault(row["name"], row)
    done = sorted((r for r in rows.values() if r["state"] == "complete"), key=lambda r: (-r.get("score", r["cv_dice"]), r["name"]))
    return done + sorted((r for r in rows.values() if r["state"] != "complete"), key=lambda r: r["name"])


def history(study: optuna.Study) -> list[tuple[int, float, str, str]]:
    """``(trial number, score, state, name)`` of every completed or pruned trial (a pruned one's
    score: its last reported fold)."""
    out = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        name = trial.user_attrs.get("name", str(trial.params))
        if trial.state == TrialState.COMPLETE:
            out.append((trial.number, float(trial.value), "complete", name))
        elif trial.intermediate_values:
            last = trial.intermediate_values[max(trial.intermediate_values)]
            out.append((trial.number, float(last), "pruned", name))
    return out


def importances(study: optuna.Study, seed: int) -> dict[str, float] | None:
    """fANOVA importance of each hyper-parameter for the cross-validated Dice (Optuna), or None
    when the completed trials cannot say (fewer than two, or nothing varied)."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(completed) < 2 or len({json.dumps(t.params, sort_keys=True) for t in completed}) < 2:
        return None
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        return optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError) as exc:
        log.info("no parameter importance: %s", exc)
        return None


def trial_of(trial: Trial) -> str:
    """``trial N`` (``, a retry of trial M``) for log lines."""
    earlier = tries_before(trial.study.get_trials(deepcopy=False)[trial.number])
    return f"trial {trial.number}" + (f" (a retry of trial {earlier[0]})" if earlier else "")
