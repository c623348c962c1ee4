"""Which images an evaluation scores: the data of the run, the split, never silently an image a model trained on.

Without ``--split``: a training run's validation folds (each image scored by the fold that held it
out); with adapters, the data's fixed test split, else the images none of them has seen: its fold's
validation part only (their runs' folds.json say which). Training, inner-selection and fold-gap
sections count as seen (runs.seen_by); they are scored only with ``--include_training_images``
(rows marked ``seen_in_training``). Every model gets the same prompts (prompts.object_prompts), and
``grouping`` names each row's fold group, the unit every interval resamples.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from samlora.core.errors import OptionError, UserError
from samlora.data import dataset as data
from samlora.data import folds as folds_lib
from samlora.data.prompts import EVAL_PROMPTS, Prompts, object_prompts
from samlora.data.sample import Sample
from samlora.training import runs

log = logging.getLogger(__name__)

AUTOMATIC_MODES = ("amg", "ais", "apg")  # no ground truth used: SAM's generator, the instance decoder, its prompts
MODE_ALIASES = {"auto": "amg"}  # the automatic mask generator's earlier name
PROMPT_MODES = (*EVAL_PROMPTS, "yolo", *AUTOMATIC_MODES)


def parse_modes(prompt: str) -> tuple[str, ...]:
    """``"ais,apg,auto"`` -> ``("ais", "apg", "amg")``: one prompt of :data:`PROMPT_MODES`, or
    several automatic modes side by side (aliases: :data:`MODE_ALIASES`); an :class:`OptionError`
    names what is wrong."""
    items = [item.strip() for item in str(prompt).split(",")]
    if not all(items):
        raise OptionError(f"{{prompt}} {prompt!r}: an empty mode; write modes separated by commas, e.g. ais,apg,amg")
    unknown = [m for m in items if m not in PROMPT_MODES and m not in MODE_ALIASES]
    if unknown:
        raise OptionError(f"{{prompt}} {prompt!r}: unknown mode {unknown[0]!r}; use one of "
                          f"{', '.join(PROMPT_MODES)} ({', '.join(f'{a} = {m}' for a, m in MODE_ALIASES.items())})")
    modes = tuple(MODE_ALIASES.get(m, m) for m in items)
    if len(set(modes)) < len(modes):
        raise OptionError(f"{{prompt}} {prompt!r}: a mode is given twice (auto is amg); give each once")
    if len(modes) > 1 and any(m not in AUTOMATIC_MODES for m in modes):
        raise OptionError(f"{{prompt}} {prompt!r}: only the automatic modes ({', '.join(AUTOMATIC_MODES)}) go side "
                          "by side in one run; box, point and yolo prompts take a run each")
    return modes


@dataclass
class SelectOptions:
    """How the scored images and their prompts are chosen (``evaluate``'s options of the same names).

    ``prompt``: box / point / yolo, or one or more automatic modes comma-separated (amg, ais, apg;
    :func:`parse_modes`, written back in canonical form: ``auto`` becomes ``amg``); automatic modes
    keep images without objects and use no prompts;
    ``max_objects``: prompt a seeded subset of this many objects per image (0 = all);
    ``include_training_images``: allow images an adapter was trained on (rows marked).
    """

    prompt: str = "box"
    max_objects: int = 0
    seed: int = 0
    include_training_images: bool = False

    def __post_init__(self) -> None:
        self.prompt = ",".join(parse_modes(self.prompt))

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes of ``prompt`` in the order given."""
        return tuple(self.prompt.split(","))

    @property
    def automatic(self) -> bool:
        """Whether the modes use no ground-truth prompts (:data:`AUTOMATIC_MODES`)."""
        return all(m in AUTOMATIC_MODES for m in self.modes)


@dataclass
class Selection:
    """The scored images: ``indices`` into ``samples``, ``fold_of`` (val split) and prompts."""

    samples: list[Sample]
    split: str
    indices: list[int]
    fold_of: dict[int, int]
    num_folds: int
    prompts: dict[int, Prompts]
    seen: dict[Path, set[int] | None] = field(default_factory=dict)  # adapter -> images it has seen
    grouping: folds_lib.Grouping = field(default_factory=folds_lib.Grouping)  # the bootstrap's unit


def data_options(given: data.DataOptions, data_dir: Path | None, run_dirs: Sequence[Path],
                 run_config: Mapping[str, Any] | None) -> tuple[Path, data.DataOptions]:
    """``(data_dir, options)``: the run's data options (its folds only fit them; ``data_dir`` may
    move the data), else the ``given`` ones. ``data_dir`` is checked."""
    options = given
    where = ""
    if run_config is not None:
        options = data.DataOptions.of({**dataclasses.asdict(given), **run_config})
        if data_dir is None:
            data_dir = run_config.get("data_dir")
            where = f" (from {run_dirs[0] / runs.CONFIG_FILE}; pass {{data_dir}} if the data moved)"
        log.info("data options of the run %s: %s", run_dirs[0],
                 ", ".join(f"{k}={v}" for k, v in {"data_dir": data_dir, **dataclasses.asdict(options)}.items()))
    if data_dir is None:
        raise OptionError("{data_dir} is required (or {cv_run} RUN to evaluate a run on its own data)")
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise OptionError(f"data directory {data_dir} does not exist or is not a directory{where}")
    return data_dir, options


def select_data(options: SelectOptions, data_dir: Path, data_options: data.DataOptions, split: str | None,
                run_dirs: Sequence[Path], sources: Sequence[runs.ModelSource]) -> Selection:
    """Load the data, pick the images (never, silently, ones a model trained on) and make their
    prompts (shared by every model)."""
    samples = data.read_samples(data_dir, data_options)
    if all(s.num_objects == 0 for s in samples):
        raise UserError(f"{data_dir}: no labelled object in any of its {len(samples)} masks; evaluation "
                        "needs ground truth (check the mask files)")
    folds = runs.common_folds(samples, run_dirs)
    seen = {s.path: runs.seen_by(s.path, samples) for s in sources if s.kind == "adapter"}
    indices, fold_of, split = choose_images(samples, split, folds, data_dir, seen)
    check_seen(samples, indices, seen, split, options.include_training_images)
    grouping = data.grouping_of(data_options)
    data.log_summary([samples[i] for i in indices], grouping=grouping)
    if not options.automatic:
        kept = [i for i in indices if samples[i].num_objects > 0]
        if len(kept) < len(indices):
            log.info("%d of %d images have no objects and are skipped (nothing to prompt)",
                     len(indices) - len(kept), len(indices))
        if not kept:
            raise OptionError(f"{{split}} {split}: none of the selected images of {data_dir} has a labelled "
                            "object; choose another split")
        indices = kept
    log.info("evaluating %d images (split %s) with %s prompts", len(indices), split, options.prompt)
    kind = "point" if options.prompt == "point" else "box"
    prompts = {i: object_prompts(samples[i].labels, kind, samples[i].ignore,
                                 0 if options.automatic else options.max_objects,
                                 np.random.default_rng([options.seed, i])) for i in indices}
    return Selection(samples, split, indices, fold_of, len(folds or ()), prompts, seen, grouping)


def choose_images(samples: Sequence[Sample], split: str | None, folds: Sequence[folds_lib.Fold] | None,
                  data_dir: Path, seen: Mapping[Path, set[int] | None]) -> tuple[list[int], dict[int, int], str]:
    """``(indices, fold of each for val, split name)``. Without ``--split``: a run's validation
    folds; with adapters the fixed test split, else the images none of them has seen (the
    validation part of each adapter's fold: training, selection and gap sections are seen)."""
    has_test = bool(folds_lib.split_test(samples)[1])
    if split is None and folds is None and seen and not has_test:
        if any(s is None for s in seen.values()):
            unknown = next(p for p, s in seen.items() if s is None)
            raise OptionError(f"cannot tell which images {unknown} has seen (it is not in the run directory "
                              f"train wrote) and {data_dir} has no fixed test split: give the run's adapter in "
                              "place, {cv_run} RUN, or {split} all {include_training_images} to score every "
                              "image with the rows marked")
        trained = set().union(*seen.values())
        held_out = [i for i in range(len(samples)) if i not in trained]
        if not held_out:
            raise OptionError(f"the adapters have seen every image of {data_dir} (trained on it, chose epochs on it "
                              "or left it out as a fold gap): evaluate them on other data, "
                              "or pass {split} all {include_training_images} (rows marked seen_in_training)")
        log.info("images: the %d of %d that no adapter has seen (its fold's validation part; training, inner "
                 "selection and --fold_gap sections count as seen; from their runs' folds.json)", len(held_out),
                 len(samples))
        return held_out, {}, "held-out"
    if split is None:
        split = "val" if folds is not None else "test" if has_test else "all"
    indices, fold_of = folds_lib.select_split(samples, split, folds, data_dir)
    return indices, fold_of, split


def check_seen(samples: Sequence[Sample], indices: Sequence[int], seen: Mapping[Path, set[int] | None],
               split: str, include_training_images: bool = False) -> None:
    """Refuse images an adapter trained on (or may have) unless ``include_training_images``."""
    for path, trained in seen.items():
        hits = [i for i in indices if i in trained] if trained is not None else \
            ([] if split in ("test", "held-out") else list(indices))
        if hits and not include_training_images:
            what = f"{len(hits)} of the {len(indices)} images" if trained is not None else "possibly all images"
            raise OptionError(f"{{split}} {split}: {path} has seen {what} in training (e.g. {samples[hits[0]].key}: "
                              "a training, inner-selection or fold-gap section); leave "
                              "{split} out to score held-out images only, or pass {include_training_images} to "
                              "score them with the rows marked seen_in_training")
        if hits:
            log.warning("%s is scored on %d images it has seen in training (training, inner-selection or fold-gap "
                        "sections): those rows are marked seen_in_training",
                        path, len(hits))
