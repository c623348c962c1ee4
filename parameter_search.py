"""``python main.py parameter_search``: LoRA rank, alpha and learning rate searched with Optuna by many workers.

Every configuration trains on the same folds (one ``folds.json`` at the top) in its own
sub-directory; ``results.csv`` ranks them by the cross-validated estimate (crossval.py: each
fold's checkpoint chosen on an inner split, scored on the outer fold) and ``best_config.json``
names the winner. ``cv_dice`` is the selection score (the winner's is biased upwards: it was
chosen on the folds that give it); ``best_config.json`` ``estimate`` gives the winner an unbiased
figure from a fixed test split or, with ``--nested``, from the search repeated inside each outer
fold (search_estimate.py). The search is an Optuna study (studies.py) in ``--storage``: the same command
started again, on this machine or another one that sees the same output directory, adds a
worker to it. ``--sampler grid`` trains every combination of the lists, ``--sampler tpe`` draws
``--n_trials`` configurations between the bounds; ``--prune`` stops a configuration after a
fold that scores below the median of the finished ones at that fold. A re-run skips finished
work; ``importance.png`` and ``history.png`` show what mattered and how the search went.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import optuna
import torch

from samlora.core import figures, runfiles
from samlora.core.errors import UserError
from samlora.data import dataset as data
from samlora.data import folds as folds_lib
from samlora.data.sample import Sample
from samlora.models import checkpoints
from samlora.models import sam as sam_model
from samlora.training import crossval, runs, search_estimate, studies
from samlora.training.config import TrainConfig, add_train_arguments
from samlora.training.items import check_cache_budget

log = logging.getLogger(__name__)

SEARCH_FILE = "search.json"
GRID_KEYS = studies.SPACE_KEYS + ("lora_blocks",)  # the searched options: not part of the base identity
COLUMNS = ["name", "lora_rank", "lora_alpha", "learning_rate", "cv_dice", "cv_dice_std", "cv_dice_ci_low",
           "cv_dice_ci_high", "cv_iou", "cv_ais_msa", "cv_ais_msa_std", "cv_ais_msa_ci_low", "cv_ais_msa_ci_high",
           "score", "n_images", "folds", "run", "lora_blocks", "augmentation", "ranked_by", "state"]
LIST_FLAGS = ("--lora_ranks", "--lora_alphas", "--learning_rates")
LIST_DEFAULTS = ("2,4,8,16", "2,4,8", "1e-4,3e-4,1e-3")  # a grid; with TPE, the ranges they span
#: --objective -> the per-image score (summary rows, crossval.estimate) that ranks the configurations
OBJECTIVES = {"prompted": "dice", "ais": "ais_msa"}


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
        "parameter_search", help="search LoRA rank, alpha and learning rate (Optuna; many workers share one study)",
        description="Train configurations of --lora_ranks x --lora_alphas x --learning_rates on the same folds and "
                    "rank them by the cross-validated Dice. Start the same command again (here or on another "
                    "machine that sees the same --output_dir) to add a worker to the search.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_arguments(parser, searched=True)  # rank, alpha, rate: the lists below; always cross-validated
    grid = parser.add_argument_group("search space")
    for flag, default, what, extra in zip(LIST_FLAGS, LIST_DEFAULTS, ("LoRA ranks", "LoRA alphas", "learning rates"),
                                          ("", "", ", drawn on a log scale")):
        grid.add_argument(flag, default=default, help=f"comma-separated {what}; with --sampler tpe a range LOW,HIGH"
                                                      f"{extra} (the default is read as its lowest and highest)")
    grid.add_argument("--lora_blocks_grid", nargs="+", default=None, metavar="SPEC",
                      help="encoder blocks to search over, space-separated --lora_blocks specs (e.g. all last3 6-11), a "
                           "categorical choice for either sampler; default: --lora_blocks alone")
    search = parser.add_argument_group("search")
    search.add_argument("--sampler", choices=studies.SAMPLERS, default="grid",
                        help="grid: every combination of the lists, each trained once; tpe: --n_trials draws of "
                             "Optuna's TPE sampler between the bounds, for spaces too large to enumerate")
    search.add_argument("--n_trials", type=int, help="configurations a TPE search trains (all workers together)")
    search.add_argument("--objective", choices=tuple(OBJECTIVES), default="prompted",
                        help="what ranks the configurations (and what --prune and --nested compare): prompted = "
                             "the cross-validated Dice of box / point prompts (cv_dice); ais = the cross-validated "
                             "mSA of automatic instance segmentation (cv_ais_msa; needs --instance_decoder)")
    search.add_argument("--prune", action="store_true",
                        help="stop a configuration after a fold whose Dice is below the median of the finished "
                             "configurations at that fold (Optuna's MedianPruner, folds as steps)")
    search.add_argument("--prune_startup", type=int, default=5,
                        help="with --prune: configurations that finish before any is pruned")
    search.add_argument("--nested", action="store_true",
                        help="without a fixed test split: repeat the search inside each outer fold (every "
                             "configuration cross-validated on the fold's training part) to give the chosen "
                             "configuration an unbiased estimate (best_config.json estimate); trains about "
                             "--num_folds times more; grid sampler, no --prune")
    search.add_argument("--storage", help="the study's database: any URL Optuna accepts, e.g. "
                                          "postgresql://user:password@host/db for workers on several machines; "
                                          "None: sqlite:///<output_dir>/study.db")
    search.add_argument("--study_name", help="the study's name in --storage; None: the name of --output_dir")
    search.add_argument("--heartbeat", type=int, default=60,
                        help="seconds between a worker's heartbeats; a trial without one for twice as long is a "
                             "dead worker's and is trained again by another worker")
    parser.set_defaults(func=run, output_dir=Path("runs/parameter_search"), cross_validation=True, num_folds=3)
    return parser


def search_space(args: argparse.Namespace) -> studies.SearchSpace:
    """The flags as a :class:`studies.SearchSpace`; conflicting flags are one UserError each."""
    if args.sampler == "grid" and args.n_trials is not None:
        raise UserError("--n_trials is for --sampler tpe: --sampler grid trains every combination of the lists "
                        "(drop --n_trials, or add --sampler tpe)")
    if args.sampler == "tpe" and (args.n_trials is None or args.n_trials < 1):
        raise UserError("--sampler tpe needs --n_trials N (N >= 1): how many configurations to train")
    if args.prune_startup < 0:
        raise UserError(f"--prune_startup must be >= 0, got {args.prune_startup}")
    if args.heartbeat < 1:
        raise UserError(f"--heartbeat must be at least 1 second, got {args.heartbeat}")
    if args.objective == "ais" and not args.instance_decoder:
        raise UserError("--objective ais ranks by the AIS decoder's mSA, which only --instance_decoder trains: add "
                        "--instance_decoder or use --objective prompted")
    if args.nested and (args.sampler != "grid" or args.prune):
        raise UserError("--nested needs --sampler grid without --prune: TPE's draws and the pruner's stops are "
                        "decided by the outer folds' scores, which the nested estimate must not see")
    lists = {}
    for key, flag, kind, default in zip(studies.SPACE_KEYS, LIST_FLAGS, (int, float, float), LIST_DEFAULTS):
        text = getattr(args, flag[2:])
        values = parse_list(text, kind, flag)
        if args.sampler == "tpe":
            if len(values) > 2 and text != default:
                raise UserError(f"{flag} {text}: with --sampler tpe give a range LOW,HIGH (e.g. {values[0]},"
                                f"{values[-1]}); a list of values to try is a grid (--sampler grid)")
            values = [min(values), max(values)]  # one value: fixed
        lists[key] = tuple(values)
    return studies.SearchSpace(args.sampler, lists["lora_rank"], lists["lora_alpha"], lists["learning_rate"],
                               args.n_trials, seed=args.seed, lora_blocks=tuple(args.lora_blocks_grid or [args.lora_blocks]))


def config_name(rank: int, alpha: float, lr: float, blocks: str = "all") -> str:
    """The sub-directory of one configuration (LoRA in every encoder block: no blocks part)."""
    spec = blocks.strip().lower().replace(" ", "").replace(",", "+")
    return f"rank{rank}_alpha{alpha:g}_lr{lr:g}" + ("" if spec == "all" else f"_blocks{spec}")


@dataclasses.dataclass
class Search:
    """What every trial of this worker shares."""

    base: TrainConfig
    space: studies.SearchSpace
    samples: Sequence[Sample]
    folds: Sequence[folds_lib.Fold]
    device: torch.device
    num_workers: int
    cache_memory_gb: float
    embeddings: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # frozen encoder: one per image
    inner_folds: list[list[folds_lib.Fold]] | None = None  # --nested: each outer fold's own folds
    has_test: bool = False  # a fixed test split: the winner's estimate
    objective: str = "prompted"  # --objective: OBJECTIVES[objective] ranks the configurations

    @property
    def key(self) -> str:
        """The per-image score that ranks: ``dice`` or ``ais_msa``."""
        return OBJECTIVES[self.objective]


def run(args: argparse.Namespace) -> int:
    """Join (or start) the search's study, train configurations until it is finished, write the results."""
    space = search_space(args)
    studies.quiet_optuna()
    base = TrainConfig.from_args(args)
    device = sam_model.resolve_device(args.device)
    sam_model.autocast(device, base.precision)
    random_weights = checkpoints.resolve_checkpoint(base.model_type, base.checkpoint) is None
    out = runfiles.OutputDir(base.output_dir, "parameter_search", shared=True)
    url = args.storage or studies.default_storage(out.path)
    name = args.study_name or out.path.resolve().name
    samples = data.load_from_options(args)
    has_test = bool(folds_lib.split_test(samples)[1])
    nested = args.nested and not has_test
    if args.nested and has_test:
        log.info("--nested is not needed: the data has a fixed test split, which gives the chosen configuration "
                 "its estimate")
    identity = {**search_identity(base, space, studies.data_fingerprint(samples), nested), "objective": args.objective}
    # options a record of an older search lacks
    defaults = {**studies.identity_defaults(runs.option_defaults(base)), "nested": False, "objective": "prompted"}
    resume = joins(out, identity, defaults, args.overwrite)
    folds = crossval.plan_folds(base, samples, resume)  # impossible folds: refused before any write
    inner = search_estimate.inner_folds(base, samples, folds) if nested else None  # refused before any write too
    variants = [configuration(base, base.lora_rank, base.lora_alpha, base.learning_rate, spec)
                for spec in space.lora_blocks]  # bad specs refused
    check_cache_budget(variants, len(samples), args.cache_memory_gb, None)
    warn_mixed_augmentation(variants)
    if has_study(args, out):  # before out.lock() creates the directory
        studies.precheck(url, name, identity, defaults, args.overwrite, args.heartbeat)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=args.prune_startup) if args.prune else \
        optuna.pruners.NopPruner()
    with out.lock():  # workers starting together: the first claims the directory and creates the study
        resume = joins(out, identity, defaults, args.overwrite)
        storage = studies.open_storage(url, args.heartbeat) if has_study(args, out) else None
        if storage is not None:  # again, now that no worker can start: --overwrite of a live one
            studies.check_storage(storage, url, name, identity, defaults, args.overwrite)
        out.claim(args.overwrite, resume=resume, keep=[studies.STUDY_DB])  # open_study replaces the study in it
        runfiles.write_json(out.path / SEARCH_FILE, identity)
        if not (out.path / folds_lib.FOLDS_FILE).is_file():
            folds_lib.save_folds(out.path, folds, samples, seed=base.seed, grouping=folds_lib.grouping_of(base))
        study = studies.open_study(storage or studies.open_storage(url, args.heartbeat), url, name, identity,
                                   args.overwrite, pruner)
        if (out.path / studies.STUDY_DB).is_file():
            out.add(out.path / studies.STUDY_DB)
    search = Search(base, space, samples, folds, device, args.num_workers, args.cache_memory_gb,
                    inner_folds=inner, has_test=has_test, objective=args.objective)
    with out.active("search.log"):
        log.info("worker %s joins study %r in %s (%s sampler, %d configurations)", studies.worker_name(), name,
                 studies.shown(url), space.sampler, space.budget)
        studies.run_worker(study, space, out.lock, lambda trial: objective(trial, search), args.heartbeat)
        write_outputs(out, search, study, random_weights)
    return 0


def search_identity(base: TrainConfig, space: studies.SearchSpace, fingerprint: str,
                    nested: bool = False) -> dict[str, Any]:
    """What the search is (search.json, the study's identity): the training options it does not
    search, its space, the data's fingerprint and whether it is repeated inside the folds."""
    return {"base": {k: v for k, v in base.to_json().items() if k not in GRID_KEYS + ("output_dir",)},
            "space": space.record(), "data": fingerprint, "nested": nested}


def augmentation(config: TrainConfig) -> str:
    """What a configuration trains with (results.csv's ``augmentation``): a cached encoder start
    (frozen encoder, late LoRA) sees only its fixed flip / rotation views, without intensity changes."""
    if not config.augment:
        return "none"
    if config.cached:
        return f"{config.augment_variants} fixed flip/rotation view(s), no intensity"
    return "random flip/rotation (8 views) + intensity"


def warn_mixed_augmentation(configs: Sequence[TrainConfig]) -> None:
    """Say up front when the searched LoRA blocks train with different augmentation."""
    kinds = {config.lora_blocks: augmentation(config) for config in configs}
    if len(set(kinds.values())) > 1:
        log.warning("the searched --lora_blocks train with different augmentation (%s): a cached encoder start "
                    "gets fixed views only; a difference in cv_dice between them includes the augmentation "
                    "(results.csv: augmentation)", "; ".join(f"{k}: {v}" for k, v in kinds.items()))


def has_study(args: argparse.Namespace, out: runfiles.OutputDir) -> bool:
    """Whether the study's database may hold the study already: any --storage, or the default
    SQLite file once it exists (it is created only after the directory is claimed)."""
    return bool(args.storage) or (out.path / studies.STUDY_DB).is_file()


def joins(out: runfiles.OutputDir, identity: dict[str, Any], defaults: dict[str, Any], overwrite: bool) -> bool:
    """Whether this worker joins a search already in ``out`` (same options and data); refuses
    another search's directory unless ``overwrite``, and a directory of other files. Changes nothing."""
    path = out.path / SEARCH_FILE
    previous = runfiles.read_json(path, "a parameter search") if path.is_file() else None
    # another space, or the same one nested, on the same data and options may share the directory
    # (its study tells them apart): its finished configurations are read, not trained again
    def shared(record: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in record.items() if k not in ("space", "nested", "objective")}

    diff = [] if previous is None else runs.differences(shared(previous), shared(identity), defaults)
    if diff and not overwrite:
        raise UserError(f"{out.path} holds a search with other options or data ({'; '.join(diff[:3])}): use the "
                        "same options, --overwrite, or a new --output_dir")
    # a directory this command claimed but whose search.json is not written yet: a worker starting now
    resume = not overwrite and (previous is not None or out.owner() == out.command)
    out.check(overwrite, resume=resume)
    return resume


def configuration(base: TrainConfig, rank: int, alpha: float, lr: float, blocks: str = "all") -> TrainConfig:
    """One configuration of the search, checked, in its own sub-directory."""
    config = dataclasses.replace(base, lora_rank=rank, lora_alpha=alpha, learning_rate=lr, lora_blocks=blocks,
                                 output_dir=str(Path(base.output_dir) / config_name(rank, alpha, lr, blocks)))
    config.validate()
    return config


def objective(trial: optuna.Trial, search: Search) -> float:
    """Train the trial's configuration (or read its finished summary): its cross-validated score
    of --objective (``search.key``).
    The results row is kept in the trial, so that any worker can write results.csv."""
    config = configuration(search.base, *search.space.suggest(trial))
    name = Path(config.output_dir).name
    trial.set_user_attr("name", name)
    summary_path = Path(config.output_dir) / runs.SUMMARY_FILE
    if summary_path.is_file():
        summary = runfiles.read_json(summary_path, "a finished training run")
        log.info("%s: %s finished earlier, skipped", studies.trial_of(trial), name)
        for fold in summary["cv_estimate"]["per_fold"]:  # for the pruner (none without --prune)
            if fold.get(search.key) is not None:
                trial.report(fold[search.key], fold["fold"])
    else:
        log.info("%s: %s, training %d fold(s) on worker %s", studies.trial_of(trial), name, len(search.folds),
                 studies.worker_name())
        summary = train_configuration(config, search, pruning(trial, config, search.key))
    row = result_row(config, summary, search.key)
    if search.inner_folds is not None:
        row["nested"] = nested_scores(config, search)
    trial.set_user_attr(studies.RESULT, row)
    return row["score"]


def nested_scores(config: TrainConfig, search: Search) -> list[float | None]:
    """``--nested``: the configuration cross-validated inside each outer fold's training part
    (finished ones read), its inner cross-validated ``search.key`` score per outer fold (None:
    nothing scored)."""
    scores = []
    for k, inner in enumerate(search.inner_folds or []):
        run = dataclasses.replace(config, output_dir=str(search_estimate.nested_dir(config, k)), final_fit=False)
        path = Path(run.output_dir) / runs.SUMMARY_FILE
        if path.is_file():
            summary = runfiles.read_json(path, "a finished inner cross-validation")
        else:
            log.info("%s: the search inside outer fold %d (%d inner folds)", Path(config.output_dir).name, k,
                     len(inner))
            summary = train_configuration(run, search, None, inner)
        cv = summary["cv_estimate"]
        scores.append(float(cv[search.key]["mean"]) if cv["n_images"] else None)
    return scores


def pruning(trial: optuna.Trial, config: TrainConfig, key: str = "dice") -> Callable[[int, dict[str, Any]], None]:
    """``after_fold`` for crossval.run_training: report the fold's ``key`` score (the per-image
    score of --objective: Dice or AIS mSA; Optuna step = fold) and
    stop the configuration when the pruner says so (its row says ``pruned``; without --prune,
    Optuna's NopPruner never does). A trial the study gave up (late heartbeats) reports nothing
    more: its run goes on to the end, which its retry reads."""
    def after_fold(fold: int, result: dict[str, Any]) -> None:
        if not result["scored"]:
            return
        score = float(np.mean([r[key] for r in result["scored"]]))
        try:
            trial.report(score, fold)
        except optuna.exceptions.UpdateFinishedTrialError:  # given up by the study: finished for its retry
            return
        if trial.should_prune():
            row = {**config_columns(config), "folds": fold + 1, "state": "pruned"}
            trial.set_user_attr(studies.RESULT, row)
            label = search_estimate.LABELS[key]
            log.info("%s: pruned after fold %d (%s %.4f, below the median of the finished configurations)",
                     row["name"], fold, label, score)
            raise optuna.TrialPruned(f"fold {fold}: {label} {score:.4f} below the median")
    return after_fold


def train_configuration(config: TrainConfig, search: Search, after_fold: Callable[[int, dict[str, Any]], None] | None,
                        folds: Sequence[folds_lib.Fold] | None = None) -> dict[str, Any]:
    """Train one configuration on the shared folds (or ``folds``) in its sub-directory (resuming
    a dead or interrupted worker's folds); its summary."""
    resume = (Path(config.output_dir) / runs.CONFIG_FILE).is_file()
    # the search owns its sub-directories: one a worker claimed but never started is taken over
    out = runs.claim_output_dir(config, resume=resume, overwrite=not resume)
    with out.active():  # run_training writes the shared folds there: `evaluate --cv_run` works on it
        return crossval.run_training(config, search.samples, search.device, search.num_workers,
                                     folds=search.folds if folds is None else folds,
                                     cache_memory_gb=search.cache_memory_gb, embeddings=search.embeddings,
                                     after_fold=after_fold)


def config_columns(config: TrainConfig) -> dict[str, Any]:
    """The columns of results.csv that name a configuration (finished or pruned)."""
    return {"name": Path(config.output_dir).name, "lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha,
            "learning_rate": config.learning_rate, "run": config.output_dir, "lora_blocks": config.lora_blocks,
            "augmentation": augmentation(config)}


def result_row(config: TrainConfig, summary: dict[str, Any], key: str = "dice") -> dict[str, Any]:
    """A finished configuration's row of results.csv; ``score``: its cross-validated ``key``
    (the --objective's per-image score) that ranks it."""
    cv = summary["cv_estimate"]
    ais = {f"cv_ais_msa{suffix}": cv["ais_msa"][field] for suffix, field in
           (("", "mean"), ("_std", "std"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high"))} if "ais_msa" in cv else {}
    if key not in cv:
        raise UserError(f"{config.output_dir}: its summary has no cross-validated {key} to rank by (--objective ais "
                        "needs a run trained with --instance_decoder)")
    return {**config_columns(config), "cv_dice": cv["dice"]["mean"], "cv_dice_std": cv["dice"]["std"],
            "cv_dice_ci_low": cv["dice"]["ci_low"], "cv_dice_ci_high": cv["dice"]["ci_high"],
            "cv_iou": cv["iou"]["mean"], **ais, "score": cv[key]["mean"], "n_images": cv["n_images"],
            "folds": len(summary["folds"]), "state": "complete",
            "ranked_by": search_estimate.SELECTION if key == "dice" else "cv_ais_msa (selection score)"}


def write_outputs(out: runfiles.OutputDir, search: Search, study: optuna.Study, random_weights: bool) -> None:
    """results.csv, best_config.json (with the winner's unbiased estimate), history.png and
    importance.png from the study."""
    root, base, space = out.path, search.base, search.space
    rows = studies.result_rows(study)
    if not rows or rows[0]["state"] != "complete":
        log.warning("parameter search: no configuration finished yet; nothing to rank")
        return
    with out.lock():  # a final fit for the test split is trained once, whichever workers finish together
        estimate = winner_estimate(rows, search)
    write_results(root, base, rows, estimate, search.key)
    figures.save_search_history(root / "history.png", studies.history(study), "parameter search: cross-validated "
                                f"{search_estimate.LABELS[search.key]} per trial", random_weights)
    importance = studies.importances(study, base.seed)
    if importance is None:
        log.info("importance.png: needs at least two finished configurations that differ")
    else:
        done = sum(r["state"] == "complete" for r in rows)
        figures.save_importance(root / "importance.png", importance, f"what mattered (fANOVA, {done} configurations)",
                                random_weights, fixed=space.fixed)


def winner_estimate(rows: Sequence[dict[str, Any]], search: Search) -> dict[str, Any]:
    """The best row's unbiased estimate (search_estimate.py): its final model on the fixed test
    split (trained now unless ``--final_fit`` made it), the nested estimate, or none."""
    best = rows[0]
    if search.has_test:
        return search_estimate.test_split(final_fit_summary(best, search), best["run"])
    if search.inner_folds is not None:
        return search_estimate.nested(rows, len(search.folds), lambda run: runfiles.read_json(
            Path(run) / runs.SUMMARY_FILE, "a finished training run"), search.samples,
                                      folds_lib.grouping_of(search.base), seed=search.base.seed, key=search.key)
    return search_estimate.none("the data has no fixed test split and the search ran without --nested")


def final_fit_summary(best: dict[str, Any], search: Search) -> dict[str, Any]:
    """The best configuration's summary with its final model's test score: read when it has one,
    else its final fit trained now in its run (the folds are read from their done.json)."""
    summary = runfiles.read_json(Path(best["run"]) / runs.SUMMARY_FILE, "a finished training run")
    if "test" in summary:
        return summary
    config = dataclasses.replace(configuration(search.base, best["lora_rank"], best["lora_alpha"],
                                               best["learning_rate"], best["lora_blocks"]), final_fit=True)
    log.info("%s: retrained on all training data for the fixed test split (the chosen configuration's estimate)",
             best["name"])
    out = runfiles.OutputDir(config.output_dir, "train").claim(overwrite=False, resume=True)
    with out.active():
        return crossval.run_training(config, search.samples, search.device, search.num_workers, folds=search.folds,
                                     cache_memory_gb=search.cache_memory_gb, embeddings=search.embeddings)


def write_results(root: Path, base: TrainConfig, results: list[dict[str, Any]], estimate: dict[str, Any],
                  key: str = "dice") -> None:
    """results.csv (rows in the order given: best first) and best_config.json; logs the ranking by
    the cross-validated ``key`` score (the --objective's)."""
    runfiles.write_csv(root / "results.csv", [{"ranked_by": search_estimate.SELECTION, **r} for r in results], COLUMNS)
    best = results[0]
    runfiles.write_json(root / "best_config.json", {
        **best, "selection_score": search_estimate.SELECTION_NOTE, "estimate": estimate,
        "config": {**base.to_json(), "lora_rank": best["lora_rank"], "lora_alpha": best["lora_alpha"],
                   "learning_rate": best["learning_rate"], "lora_blocks": best["lora_blocks"],
                   "output_dir": str(root / best["name"])}})
    label, column = search_estimate.LABELS[key], f"cv_{key}"
    log.info("parameter search: %d configurations; best %s with cross-validated %s %.4f +- %.4f (its selection "
             "score)", len(results), best["name"], label, best[column], best[f"{column}_std"])
    for r in results:
        if r["state"] == "complete":
            log.info("  %-28s %s %.4f +- %.4f [%.4f, %.4f]", r["name"], label, r[column], r[f"{column}_std"],
                     r[f"{column}_ci_low"], r[f"{column}_ci_high"])
        else:
            log.info("  %-28s pruned after %d fold(s)", r["name"], r["folds"])
    search_estimate.log_estimate(best["name"], estimate, key)
