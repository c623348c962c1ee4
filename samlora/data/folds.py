"""Leakage-free folds: grouped k-fold and holdout splits, saved to and checked from folds.json.

Folds are grouped so that near-identical pictures never sit on both sides of a split
(:class:`Grouping`): patches keep their source image's group (or a ``--group_by`` id such as the
slide), slices of a volume are grouped in blocks of ``slice_block`` consecutive slices (group id
``"training.tif:block0"``), validation takes contiguous runs of blocks and the ``fold_gap``
sections next to a validation run are used for neither side.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from samlora.core import runfiles
from samlora.core.errors import UserError
from samlora.data.sample import Sample

log = logging.getLogger(__name__)

FOLDS_FILE = "folds.json"
FOLDS_SCHEMA = 2  # the record of save_folds; schema 1 holds no fold_gap (no gap)
Fold = tuple[list[int], list[int]]


@dataclass(frozen=True)
class Grouping:
    """How samples are kept apart when the data is split.

    Slices of a volume go in blocks of ``slice_block`` consecutive sections; the blocks of a fold's
    validation part are one contiguous run per volume, and ``fold_gap`` sections (default:
    ``slice_block``) on each side of it are left out of that fold's training. 2-D images are
    grouped by ``group_by`` (a regular expression on the file path whose first group, or whole
    match, names e.g. the slide or patient), else by their source image (patches stay together).
    """

    slice_block: int = 10
    fold_gap: int | None = None
    group_by: str | None = None

    def __post_init__(self) -> None:
        if self.slice_block < 1:
            raise UserError(f"--slice_block must be at least 1, got {self.slice_block}")
        if self.fold_gap is not None and self.fold_gap < 0:
            raise UserError(f"--fold_gap must be 0 or more sections, got {self.fold_gap}")
        if self.group_by is not None:
            try:
                re.compile(self.group_by)
            except re.error as exc:
                raise UserError(f"--group_by {self.group_by!r} is not a valid regular expression: {exc}") from None

    @property
    def gap(self) -> int:
        """Sections left out of training on each side of a validation run."""
        return self.slice_block if self.fold_gap is None else self.fold_gap

    def group(self, sample: Sample) -> str:
        """The group ``sample`` is split by."""
        if sample.volume is not None and sample.slice_index is not None:
            return f"{sample.volume}:block{sample.slice_index // self.slice_block}"
        if self.group_by is None:
            return sample.group
        match = re.search(self.group_by, sample.source)
        if match is None:
            raise UserError(f"--group_by {self.group_by!r} does not match {sample.source}: every file name must "
                            "carry the group id (e.g. --group_by '^(slide\\d+)_' for slide07_crop3.png)")
        return match.group(1) if match.groups() else match.group(0)

    def record(self) -> dict[str, Any]:
        return {"slice_block": self.slice_block, "fold_gap": self.gap, "group_by": self.group_by}

    def unit(self) -> str:
        """What one group is, in words: the unit a bootstrap resamples (``unit`` in summary.json)."""
        images = f"--group_by {self.group_by!r} ids" if self.group_by else "source images (their patches together)"
        return f"fold groups: {images}; volume sections in blocks of {self.slice_block}"


def grouping_of(options: Any) -> Grouping:
    """The one way to a :class:`Grouping` from options: the attributes of parsed arguments or a
    config (``slice_block``, ``fold_gap``, ``group_by``), or the keys of a mapping such as a run's
    config.json; an absent or None option takes the Grouping's default."""
    get = options.get if isinstance(options, Mapping) else (lambda key: getattr(options, key, None))
    values = {key: get(key) for key in ("slice_block", "fold_gap", "group_by")}
    return Grouping(**{key: value for key, value in values.items() if value is not None})


def split_test(samples: Sequence[Sample]) -> tuple[list[int], list[int]]:
    """Indices of (train + val + unsplit samples, fixed test samples)."""
    test = [i for i, s in enumerate(samples) if s.split == "test"]
    return [i for i, s in enumerate(samples) if s.split != "test"], test


def _groups(samples: Sequence[Sample], indices: Sequence[int], grouping: Grouping) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i in indices:
        groups[grouping.group(samples[i])].append(i)
    return groups


def _block_order(samples: Sequence[Sample], groups: dict[str, list[int]]) -> tuple[list[str], list[str]]:
    """(volume block groups in volume and section order, the other groups sorted)."""
    def position(name: str) -> tuple[str, int] | None:
        sample = samples[groups[name][0]]
        if sample.volume is None or sample.slice_index is None:
            return None
        return sample.volume, min(samples[i].slice_index for i in groups[name])

    blocks = sorted((n for n in groups if position(n) is not None), key=position)
    return blocks, sorted(n for n in groups if position(n) is None)


def _gap(samples: Sequence[Sample], candidates: Sequence[int], val: Sequence[int], gap: int) -> set[int]:
    """The ``candidates`` that are slices within ``gap`` sections of a validation slice of their volume."""
    if gap <= 0:
        return set()
    held: dict[str, np.ndarray] = {}
    for volume in {samples[i].volume for i in val if samples[i].volume is not None}:
        held[volume] = np.unique([samples[i].slice_index for i in val if samples[i].volume == volume])
    near = set()
    for i in candidates:
        sample = samples[i]
        zs = held.get(sample.volume) if sample.volume is not None else None
        if zs is None or sample.slice_index is None:
            continue
        pos = np.searchsorted(zs, sample.slice_index)
        distances = [abs(int(zs[p]) - sample.slice_index) for p in (pos - 1, pos) if 0 <= p < len(zs)]
        if min(distances) <= gap:
            near.add(i)
    return near


def _fold(samples: Sequence[Sample], pool: Sequence[int], val: Sequence[int], gap: int) -> Fold:
    """(train, val) of ``pool``: training is the rest of the pool less the slices near validation."""
    val_set = set(val)
    rest = [i for i in pool if i not in val_set]
    near = _gap(samples, rest, val, gap)
    train = [i for i in rest if i not in near]
    if rest and not train:
        raise UserError(f"a validation part leaves no training sample once the {gap} sections next to it are "
                        "left out: use a smaller --fold_gap, fewer folds, or more data")
    return train, sorted(val)


def make_folds(samples: Sequence[Sample], num_folds: int, seed: int = 0,
               grouping: Grouping = Grouping()) -> list[Fold]:
    """Seeded group k-fold over the samples that are not in a fixed test split.

    Volume blocks are cut, in section order, into ``num_folds`` contiguous runs of about equal
    size; other groups are shuffled with ``seed`` and assigned largest first to the fold with the
    fewest samples. No group is on both sides of a split, and no training slice lies within
    ``grouping.gap`` sections of a validation slice of its volume (those slices are left out).

    Returns:
        ``num_folds`` pairs of sorted (train indices, validation indices) into ``samples``.
    """
    if num_folds < 2:
        raise UserError(f"k-fold cross-validation needs at least 2 folds, got {num_folds}; "
                        "use a single train/validation split (make_holdout) instead")
    trainval, test = split_test(samples)
    if not trainval:
        raise UserError(f"all {len(samples)} samples are in the fixed test split; nothing to train on")
    groups = _groups(samples, trainval, grouping)
    if num_folds > len(groups):
        raise UserError(f"cannot make {num_folds} folds from {len(groups)} groups of images "
                        f"(patches of one image, or {grouping.slice_block} consecutive slices, form a group); "
                        f"use at most {len(groups)} folds or a smaller --slice_block")
    blocks, others = _block_order(samples, groups)
    sizes = [0] * num_folds
    members: list[list[int]] = [[] for _ in range(num_folds)]
    total, done = sum(len(groups[n]) for n in blocks), 0
    for name in blocks:  # contiguous runs: a block goes to the fold its middle sample falls in
        fold = min(num_folds - 1, int((done + len(groups[name]) / 2) * num_folds / max(total, 1)))
        members[fold] += groups[name]
        sizes[fold] += len(groups[name])
        done += len(groups[name])
    rng = np.random.default_rng(seed)
    others = [others[i] for i in rng.permutation(len(others))]
    others.sort(key=lambda g: -len(groups[g]))  # stable: equal sizes keep the seeded order
    for name in others:
        fold = int(np.argmin(sizes))
        members[fold] += groups[name]
        sizes[fold] += len(groups[name])
    folds = [_fold(samples, trainval, members[k], grouping.gap) for k in range(num_folds)]
    if test:
        log.info("data: %d fixed test samples are left out of the folds", len(test))
    if any(samples[i].split == "val" for i in trainval):
        log.info("data: k-fold pools the fixed train and val splits")
    return folds


def make_holdout(samples: Sequence[Sample], val_fraction: float = 0.2, seed: int = 0,
                 grouping: Grouping = Grouping(), pool: Sequence[int] | None = None) -> Fold:
    """One grouped train / validation split of ``pool`` (default: the non-test samples).

    A fixed ``val`` split in the data is used as it is; otherwise validation takes a seeded
    contiguous run of volume blocks, or seeded shuffled groups, until it holds at least
    ``val_fraction`` of the pool (at least one group, and at least one group left for training).
    Slices within ``grouping.gap`` sections of validation are left out of training.
    """
    trainval = list(pool) if pool is not None else split_test(samples)[0]
    fixed_val = [i for i in trainval if samples[i].split == "val"]
    if fixed_val and pool is None:
        log.info("data: using the fixed validation split (%d samples)", len(fixed_val))
        return _fold(samples, trainval, fixed_val, grouping.gap)
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"the validation fraction must be between 0 and 1, got {val_fraction}")
    groups = _groups(samples, trainval, grouping)
    if len(groups) < 2:
        raise UserError(f"cannot split {len(groups)} group(s) into training and validation; "
                        "add images or use a smaller --slice_block")
    blocks, others = _block_order(samples, groups)
    rng = np.random.default_rng(seed)
    if blocks and not others:  # a seeded contiguous run of blocks
        need = val_fraction * len(trainval)
        runs = []
        for start in range(len(blocks)):
            run, count = [], 0
            for name in blocks[start:]:
                if count >= need:
                    break
                run.append(name)
                count += len(groups[name])
            if count >= need and len(run) < len(blocks):
                runs.append(run)
        names = runs[int(rng.integers(len(runs)))] if runs else blocks[-1:]
    else:
        order = sorted(groups)
        order = [order[i] for i in rng.permutation(len(order))]
        names = []
        for name in order[:-1]:
            if names and sum(len(groups[n]) for n in names) >= val_fraction * len(trainval):
                break
            names.append(name)
    return _fold(samples, trainval, [i for n in names for i in groups[n]], grouping.gap)


def save_folds(path: str | os.PathLike, folds: Sequence[Fold], samples: Sequence[Sample],
               seed: int | None = None, grouping: Grouping = Grouping()) -> Path:
    """Write the folds (indices, group ids, sample keys, the slices left out as gap) to ``path``
    (a file or a directory, which gets ``folds.json``). Returns the file written."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":  # a (run) directory
        path = path / FOLDS_FILE
    trainval, test = split_test(samples)
    record = {
        "format": "samlora-folds", runfiles.SCHEMA: FOLDS_SCHEMA, "seed": seed, **grouping.record(),
        "guarantee": "no group on both sides of a split; no training slice within fold_gap sections of a "
                     "validation slice of its volume",
        "samples": [{"key": s.key, "group": grouping.group(s), "split": s.split} for s in samples],
        "test": test,
        "folds": [{"train": list(map(int, train)), "val": list(map(int, val)),
                   "gap": sorted(set(trainval) - set(train) - set(val)),
                   "train_groups": sorted({grouping.group(samples[i]) for i in train}),
                   "val_groups": sorted({grouping.group(samples[i]) for i in val}),
                   "val_paths": sorted({samples[i].source for i in val})}
                  for train, val in folds],
    }
    return runfiles.write_json(path, record)


def _grouping_of(record: dict[str, Any]) -> Grouping:
    """The grouping a folds.json record was made with (``slice_block`` required; schema 1 holds no
    ``fold_gap``: no gap)."""
    return grouping_of({"fold_gap": 0, **record, "slice_block": int(record["slice_block"])})


def load_folds(path: str | os.PathLike, samples: Sequence[Sample]) -> list[Fold]:
    """Read folds written by :func:`save_folds` and check they were made for these ``samples``
    and keep their promise (groups apart, the gap around validation slices)."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":  # a (run) directory
        path = path / FOLDS_FILE
    fresh = "use a fresh --output_dir, or the same data and data options as the run that wrote it"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        grouping = _grouping_of(record)
        stored = record["samples"]
        folds = [(list(f["train"]), list(f["val"])) for f in record["folds"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot read {path}: {exc}; {fresh}") from exc
    if len(stored) != len(samples):
        raise UserError(f"{path} was made for {len(stored)} samples but the data now has "
                        f"{len(samples)}; {fresh}")
    for i, (entry, sample) in enumerate(zip(stored, samples, strict=True)):
        if entry.get("key") != sample.key or entry.get("group") != grouping.group(sample):
            raise UserError(f"{path} does not match the data: sample {i} was {entry.get('key')!r} "
                            f"(group {entry.get('group')!r}), now {sample.key!r}; {fresh}")
    for train, val in folds:
        if any(not 0 <= i < len(samples) for i in train + val):
            raise UserError(f"{path} has sample indices out of range; {fresh}")
        shared = {grouping.group(samples[i]) for i in train} & {grouping.group(samples[i]) for i in val}
        if shared:
            raise UserError(f"{path} puts group {sorted(shared)[0]!r} on both sides of a split; {fresh}")
        if _gap(samples, train, val, grouping.gap):
            raise UserError(f"{path} trains on slices within {grouping.gap} sections of validation; {fresh}")
    return folds


def plan_folds(output_dir: str | os.PathLike, samples: Sequence[Sample], num_folds: int, seed: int = 0,
               val_fraction: float = 0.2, grouping: Grouping = Grouping(),
               reuse: bool = True) -> tuple[list[Fold], bool]:
    """The folds of ``output_dir``, written nowhere: ``(folds, found)``. Its ``folds.json`` is
    re-used when there is one (checked against the samples and the fold count), else the folds are
    made: ``num_folds`` >= 2 gives k folds, 1 one grouped holdout split with ``val_fraction``.
    Commands plan their folds before they claim an output directory, so bad options write nothing;
    ``reuse=False`` ignores a folds.json there (a run about to be replaced)."""
    path = Path(output_dir) / FOLDS_FILE
    if reuse and path.is_file():
        folds = load_folds(path, samples)
        if len(folds) != max(num_folds, 1):
            raise UserError(f"{path} holds {len(folds)} fold(s) but {num_folds} were asked for; "
                            "use a fresh --output_dir or the same number of folds")
        log.info("data: re-using the folds in %s", path)
        return folds, True
    folds = make_folds(samples, num_folds, seed, grouping=grouping) if num_folds >= 2 else \
        [make_holdout(samples, val_fraction, seed, grouping=grouping)]
    return folds, False


def select_split(samples: Sequence[Sample], split: str, folds: Sequence[Fold] | None,
                 data_dir: Path) -> tuple[list[int], dict[int, int]]:
    """Indices of the images to score and, for ``val``, the fold of each."""
    if split == "all":
        return list(range(len(samples))), {}
    if split == "test":
        _, test = split_test(samples)
        if not test:
            raise UserError(f"--split test: {data_dir} has no fixed test split (no test/ folder, no "
                            "testing* volume); use --split all, or --split val with --cv_run RUN")
        return test, {}
    if folds is None:
        raise UserError("--split val needs a training run (--cv_run RUN, or a run directory in "
                        "--compare) whose folds say which images were held out")
    fold_of: dict[int, int] = {}
    for k, (_, val) in enumerate(folds):
        for i in val:
            fold_of.setdefault(int(i), k)
    return sorted(fold_of), fold_of
