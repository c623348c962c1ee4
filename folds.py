"""Leakage-free folds: grouped k-fold and holdout splits, saved to and checked from folds.json.

Folds are grouped so that near-identical pictures never sit on both sides of a split: patches keep
their source image's group, and slices of a volume are grouped in blocks of ``slice_block``
consecutive slices (group id ``"training.tif:block0"``).
"""
from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

import runfiles
from errors import UserError
from sample import Sample

log = logging.getLogger(__name__)

FOLDS_FILE = "folds.json"
Fold = tuple[list[int], list[int]]


def fold_group(sample: Sample, slice_block: int = 10) -> str:
    """The group a sample is split by: its volume block for slices, else :attr:`Sample.group`."""
    if sample.volume is not None and sample.slice_index is not None:
        return f"{sample.volume}:block{sample.slice_index // slice_block}"
    return sample.group


def split_test(samples: Sequence[Sample]) -> tuple[list[int], list[int]]:
    """Indices of (train + val + unsplit samples, fixed test samples)."""
    test = [i for i, s in enumerate(samples) if s.split == "test"]
    return [i for i, s in enumerate(samples) if s.split != "test"], test


def _groups(samples: Sequence[Sample], indices: Sequence[int], slice_block: int) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i in indices:
        groups[fold_group(samples[i], slice_block)].append(i)
    return groups


def make_folds(samples: Sequence[Sample], num_folds: int, seed: int = 0,
               slice_block: int = 10) -> list[Fold]:
    """Seeded group k-fold over the samples that are not in a fixed test split.

    Groups (see :func:`fold_group`) are shuffled with ``seed``, then assigned largest first to the
    fold with the fewest samples, so folds are balanced and no group is on both sides of a split.

    Returns:
        ``num_folds`` pairs of sorted (train indices, validation indices) into ``samples``.
    """
    if num_folds < 2:
        raise UserError(f"k-fold cross-validation needs at least 2 folds, got {num_folds}; "
                        "use a single train/validation split (make_holdout) instead")
    if slice_block < 1:
        raise UserError(f"--slice_block must be at least 1, got {slice_block}")
    trainval, test = split_test(samples)
    if not trainval:
        raise UserError(f"all {len(samples)} samples are in the fixed test split; nothing to train on")
    groups = _groups(samples, trainval, slice_block)
    if num_folds > len(groups):
        raise UserError(f"cannot make {num_folds} folds from {len(groups)} groups of images "
                        f"(patches of one image, or {slice_block} consecutive slices, form a group); "
                        f"use at most {len(groups)} folds or a smaller --slice_block")
    rng = np.random.default_rng(seed)
    names = sorted(groups)
    names = [names[i] for i in rng.permutation(len(names))]
    names.sort(key=lambda g: -len(groups[g]))  # stable: equal sizes keep the seeded order
    sizes = [0] * num_folds
    members: list[list[int]] = [[] for _ in range(num_folds)]
    for name in names:
        fold = int(np.argmin(sizes))
        members[fold] += groups[name]
        sizes[fold] += len(groups[name])
    folds = []
    for k in range(num_folds):
        val = sorted(members[k])
        val_set = set(val)
        folds.append(([i for i in trainval if i not in val_set], val))
    if test:
        log.info("data: %d fixed test samples are left out of the folds", len(test))
    if any(samples[i].split == "val" for i in trainval):
        log.info("data: k-fold pools the fixed train and val splits")
    return folds


def make_holdout(samples: Sequence[Sample], val_fraction: float = 0.2, seed: int = 0,
                 slice_block: int = 10) -> Fold:
    """One grouped train / validation split of the non-test samples.

    A fixed ``val`` split in the data is used as it is; otherwise seeded shuffled groups go to
    validation until it holds at least ``val_fraction`` of the samples (at least one group, and
    at least one group left for training).
    """
    trainval, _ = split_test(samples)
    fixed_val = [i for i in trainval if samples[i].split == "val"]
    if fixed_val:
        log.info("data: using the fixed validation split (%d samples)", len(fixed_val))
        return [i for i in trainval if samples[i].split != "val"], fixed_val
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"the validation fraction must be between 0 and 1, got {val_fraction}")
    groups = _groups(samples, trainval, slice_block)
    if len(groups) < 2:
        raise UserError(f"cannot split {len(groups)} group(s) into training and validation; "
                        "add images or use a smaller --slice_block")
    rng = np.random.default_rng(seed)
    names = sorted(groups)
    names = [names[i] for i in rng.permutation(len(names))]
    val: list[int] = []
    for name in names[:-1]:
        if val and len(val) >= val_fraction * len(trainval):
            break
        val += groups[name]
    val_set = set(val)
    return [i for i in trainval if i not in val_set], sorted(val)


def save_folds(path: str | os.PathLike, folds: Sequence[Fold], samples: Sequence[Sample],
               slice_block: int = 10, seed: int | None = None) -> Path:
    """Write the folds (indices, group ids and sample keys) to ``path`` (a file or a directory,
    which gets ``folds.json``). Returns the file written."""
    path = Path(path)
    if path.is_dir():
        path = path / FOLDS_FILE
    _, test = split_test(samples)
    record = {
        "format": "samlora-folds", "version": 1, "seed": seed, "slice_block": slice_block,
        "samples": [{"key": s.key, "group": fold_group(s, slice_block), "split": s.split}
                    for s in samples],
        "test": test,
        "folds": [{"train": list(map(int, train)), "val": list(map(int, val)),
                   "train_groups": sorted({fold_group(samples[i], slice_block) for i in train}),
                   "val_groups": sorted({fold_group(samples[i], slice_block) for i in val}),
                   "val_paths": sorted({samples[i].source for i in val})}
                  for train, val in folds],
    }
    return runfiles.write_json(path, record)


def load_folds(path: str | os.PathLike, samples: Sequence[Sample]) -> list[Fold]:
    """Read folds written by :func:`save_folds` and check they were made for these ``samples``."""
    path = Path(path)
    if path.is_dir():
        path = path / FOLDS_FILE
    fresh = "use a fresh --output_dir, or the same data and data options as the run that wrote it"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        slice_block = int(record["slice_block"])
        stored = record["samples"]
        folds = [(list(f["train"]), list(f["val"])) for f in record["folds"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot read {path}: {exc}; {fresh}") from exc
    if len(stored) != len(samples):
        raise UserError(f"{path} was made for {len(stored)} samples but the data now has "
                        f"{len(samples)}; {fresh}")
    for i, (entry, sample) in enumerate(zip(stored, samples, strict=True)):
        if entry.get("key") != sample.key or entry.get("group") != fold_group(sample, slice_block):
            raise UserError(f"{path} does not match the data: sample {i} was {entry.get('key')!r} "
                            f"(group {entry.get('group')!r}), now {sample.key!r}; {fresh}")
    for train, val in folds:
        if any(not 0 <= i < len(samples) for i in train + val):
            raise UserError(f"{path} has sample indices out of range; {fresh}")
        shared = {fold_group(samples[i], slice_block) for i in train} & \
                 {fold_group(samples[i], slice_block) for i in val}
        if shared:
            raise UserError(f"{path} puts group {sorted(shared)[0]!r} on both sides of a split; {fresh}")
    return folds


def load_or_make_folds(output_dir: str | os.PathLike, samples: Sequence[Sample], num_folds: int,
                       seed: int = 0, slice_block: int = 10, val_fraction: float = 0.2) -> list[Fold]:
    """Re-use ``output_dir/folds.json`` when it exists (checked), else make and write it.

    ``num_folds`` >= 2 gives k folds; 1 gives one grouped holdout split with ``val_fraction``.
    """
    path = Path(output_dir) / FOLDS_FILE
    if path.is_file():
        folds = load_folds(path, samples)
        if len(folds) != max(num_folds, 1):
            raise UserError(f"{path} holds {len(folds)} fold(s) but {num_folds} were asked for; "
                            "use a fresh --output_dir or the same number of folds")
        log.info("data: re-using the folds in %s", path)
        return folds
    folds = make_folds(samples, num_folds, seed, slice_block) if num_folds >= 2 else \
        [make_holdout(samples, val_fraction, seed, slice_block)]
    save_folds(path, folds, samples, slice_block=slice_block, seed=seed)
    log.info("data: wrote %s", path)
    return folds


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
