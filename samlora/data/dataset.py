"""The data every command reads: samples of any layout, cut into patches, augmented, summarized.

Every command that trains or evaluates reads its data through :func:`load_dataset` (or
:func:`load_from_options`); readers.py holds the layouts it reads (``--data_format``) and
folds.py the leakage-free splits.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from samlora.core.errors import UserError
from samlora.data.folds import Fold, Grouping, grouping_of  # noqa: F401 - grouping_of: used as data.grouping_of
from samlora.data.images import MASK_TYPES, relabel_consecutive
from samlora.data.readers import FORMATS, ReadOptions, layout_parts, read_layout
from samlora.data.sample import Sample

log = logging.getLogger(__name__)


@dataclass
class DataOptions:
    """How a data directory is read and split, with the defaults: the one place they are declared
    (the ``data`` flags, :func:`load_dataset` and :class:`TrainConfig`, a subclass, take them from here)."""

    data_format: str = "auto"
    patch_size: int = 0
    patch_overlap: int = 0
    drop_empty_patches: bool = False
    slice_block: int = 10
    nifti_axis: int = 2
    fold_gap: int | None = None
    group_by: str | None = None
    mask_type: str = "auto"

    @classmethod
    def of(cls, values: Any) -> "DataOptions":
        """The data options among ``values``' attributes (parsed arguments, a config) or keys (a
        run's config.json); a missing or None one takes its default (None is its default for
        ``fold_gap`` and ``group_by``)."""
        get = values.get if isinstance(values, Mapping) else (lambda key: getattr(values, key, None))
        given = {f.name: get(f.name) for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in given.items() if v is not None})


DATA_OPTIONS: tuple[str, ...] = ("data_dir",) + tuple(f.name for f in dataclasses.fields(DataOptions))


def load_dataset(data_dir: str | os.PathLike, data_format: str = DataOptions.data_format,
                 **options: Any) -> list[Sample]:
    """:func:`read_samples` with ``DataOptions(data_format, **options)``: e.g.
    ``load_dataset(root, patch_size=256)``, ``load_dataset(root, "stack", slice_block=2)``; any
    :class:`DataOptions` field is a keyword, and the defaults are its."""
    return read_samples(data_dir, DataOptions(data_format=data_format, **options))


def read_samples(data_dir: str | os.PathLike, options: DataOptions) -> list[Sample]:
    """Read every sample under ``data_dir``, optionally cut into patches.

    Args:
        data_dir: the data directory (any layout in the readers.py docstring, possibly inside
            ``train/``, ``val/``, ``test/`` folders).
        options: ``data_format`` (one of :data:`readers.FORMATS`; ``auto`` detects and logs it);
            ``patch_size``, the side of square patches (0 = whole images; images smaller than it
            stay whole along that side) and ``patch_overlap``, the pixels neighbouring patches
            share (0 <= overlap < patch_size); ``drop_empty_patches``: drop patches (or whole
            images when ``patch_size`` is 0) without objects; ``slice_block``: consecutive volume
            slices that share one fold group; ``nifti_axis``: the axis NIfTI volumes are sliced
            along; ``mask_type``: how label images are read (images.MASK_TYPES; ``auto`` decides
            per file and logs the decisions, warning about close ones). The split options
            (``fold_gap``, ``group_by``) do not change what is read.

    Returns:
        Samples in a deterministic order (sorted files, slices, then patches row by row).
    """
    data_format, patch_size, patch_overlap = options.data_format, options.patch_size, options.patch_overlap
    slice_block, nifti_axis, mask_type = options.slice_block, options.nifti_axis, options.mask_type
    drop_empty_patches = options.drop_empty_patches
    data_dir = Path(data_dir).expanduser()
    if data_format not in FORMATS:
        raise UserError(f"unknown --data_format {data_format!r}; choose one of {', '.join(FORMATS)}")
    if patch_size < 0:
        raise UserError(f"--patch_size must be 0 (whole images) or positive, got {patch_size}")
    if patch_overlap < 0 or (patch_size and patch_overlap >= patch_size):
        raise UserError(f"--patch_overlap must be in 0..patch_size-1, got {patch_overlap} "
                        f"for --patch_size {patch_size}")
    if slice_block < 1:
        raise UserError(f"--slice_block must be at least 1, got {slice_block}")
    if nifti_axis not in (0, 1, 2):
        raise UserError(f"--nifti_axis must be 0, 1 or 2, got {nifti_axis}")
    if mask_type not in MASK_TYPES:
        raise UserError(f"unknown --mask_type {mask_type!r}; choose one of {', '.join(MASK_TYPES)}")
    if not data_dir.is_dir():
        raise UserError(f"--data_dir {data_dir} is not a directory")

    samples: list[Sample] = []
    reading = ReadOptions(slice_block, nifti_axis, mask_type)
    for directory, split, part_format in layout_parts(data_dir, data_format):
        samples += read_layout(part_format, directory, data_dir, split, reading)
    if not samples:
        raise UserError(f"no images found in {data_dir}")
    log_mask_kinds(samples, mask_type)
    if patch_size:
        samples = [p for s in samples for p in make_patches(s, patch_size, patch_overlap)]
    if drop_empty_patches:
        kept = [s for s in samples if s.num_objects > 0]
        log.info("data: dropped %d of %d %s without objects", len(samples) - len(kept), len(samples),
                 "patches" if patch_size else "images")
        if not kept:
            raise UserError(f"empty dataset after filtering: none of the {len(samples)} "
                            f"{'patches' if patch_size else 'images'} from {data_dir} contains an "
                            "object; check the masks or leave out --drop_empty_patches")
        samples = kept
    return samples


# --------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------
def _starts(length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)  # last patch flush with the border, no padding
    return starts


def make_patches(sample: Sample, patch_size: int, overlap: int = 0) -> list[Sample]:
    """Cut ``sample`` into ``patch_size`` squares (copies), row by row, keeping source and group.

    Patches overlap by at least ``overlap`` pixels; the last row / column is shifted to end at the
    border. A side shorter than ``patch_size`` is kept whole. Labels are renumbered 1..N per patch.
    """
    if patch_size <= 0 or overlap < 0 or overlap >= patch_size:
        raise ValueError(f"bad patch_size {patch_size} / overlap {overlap}")
    height, width = sample.labels.shape
    stride = patch_size - overlap
    patches = []
    for y in _starts(height, patch_size, stride):
        for x in _starts(width, patch_size, stride):
            window = (slice(y, y + patch_size), slice(x, x + patch_size))
            patches.append(Sample(
                image=sample.image[window].copy(),
                labels=relabel_consecutive(sample.labels[window]),
                group=sample.group, tag=sample.tag, path=sample.path, source=sample.source,
                label_path=sample.label_path, slice_index=sample.slice_index, volume=sample.volume,
                offset=(sample.offset[0] + y, sample.offset[1] + x), source_shape=sample.source_shape,
                split=sample.split, mask_kind=sample.mask_kind, mask_close=sample.mask_close,
                ignore=None if sample.ignore is None else sample.ignore[window].copy()))
    return patches


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------
DIHEDRAL: tuple[tuple[bool, int], ...] = tuple((flip, turns) for flip in (False, True) for turns in range(4))


def augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
            ignore: np.ndarray | None = None, enabled: bool = True, brightness: float = 0.1,
            contrast: float = 0.1, geometry: tuple[bool, int] | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Random flip + 90-degree rotation (one of the 8 symmetries of the square) applied alike to
    ``image`` (``HxWx3`` uint8), ``labels`` (``HxW``) and ``ignore``; then brightness / contrast
    on the image only (contrast factor in 1 +- ``contrast`` around the mean, shift of up to
    ``brightness`` x 255). ``enabled=False`` (validation) returns the inputs untouched;
    ``geometry`` (flip, quarter turns), one of :data:`DIHEDRAL`, replaces the random draw.

    Returns:
        ``(image, labels, ignore)``; rotations swap H and W of non-square inputs.
    """
    if not enabled:
        return image, labels, ignore
    flip, turns = geometry if geometry is not None else (bool(rng.random() < 0.5), int(rng.integers(4)))

    def geometric(array: np.ndarray) -> np.ndarray:
        if not flip and turns == 0:
            return array  # the identity: no copy
        if flip:
            array = array[:, ::-1]
        return np.ascontiguousarray(np.rot90(array, turns))

    image, labels = geometric(image), geometric(labels)
    ignore = None if ignore is None else geometric(ignore)
    if brightness > 0 or contrast > 0:
        factor = 1.0 + rng.uniform(-contrast, contrast)
        shift = rng.uniform(-brightness, brightness) * 255.0
        mean = float(image.mean())
        image = np.clip((image.astype(np.float32) - mean) * factor + mean + shift, 0, 255)
        image = np.round(image).astype(np.uint8)
    return image, labels, ignore


# --------------------------------------------------------------------------------------------
# Summary and command-line options
# --------------------------------------------------------------------------------------------
def log_mask_kinds(samples: Sequence[Sample], mask_type: str) -> None:
    """Log how the label files were read (``--mask_type``), warning about close automatic calls."""
    kinds = Counter(s.mask_kind for s in samples if s.mask_kind is not None)
    if not kinds:
        return
    log.info("data: masks read as %s (--mask_type %s)", ", ".join(f"{k} ({n})" for k, n in sorted(kinds.items())),
             mask_type)
    close = [s for s in samples if s.mask_close]
    if close:
        log.warning("data: --mask_type auto read %d label file(s) by a small margin, e.g. %s as %s; check them "
                    "and pass --mask_type binary or instance to decide", len(close), close[0].label_path,
                    close[0].mask_kind)


def summarize_dataset(samples: Sequence[Sample], folds: Sequence[Fold] | None = None,
                      grouping: Grouping = Grouping()) -> str:
    """A few lines for the log: counts, sizes, objects per sample, tags, splits and folds."""
    if not samples:
        return "dataset: empty"
    objects = np.array([s.num_objects for s in samples])
    sizes = Counter(f"{s.image.shape[1]}x{s.image.shape[0]}" for s in samples)
    sources = {s.source for s in samples}
    patches = sum(s.is_patch for s in samples)
    groups = {grouping.group(s) for s in samples}
    size_text = ", ".join(f"{size} ({n})" for size, n in sizes.most_common(4))
    if len(sizes) > 4:
        size_text += f", ... {len(sizes)} sizes"
    lines = [
        f"dataset: {len(samples)} samples ({patches} patches) from {len(sources)} files, "
        f"{len(groups)} fold groups",
        f"  sizes (WxH): {size_text}",
        f"  objects per sample: mean {objects.mean():.1f}, min {objects.min()}, max {objects.max()}, "
        f"total {objects.sum()}; {int((objects == 0).sum())} samples without objects",
    ]
    tags: dict[str, list[int]] = defaultdict(list)
    for s in samples:
        tags[s.tag].append(s.num_objects)
    lines.append("  tags: " + ", ".join(f"{t} {len(v)} samples / {sum(v)} objects"
                                          for t, v in sorted(tags.items())))
    splits = Counter(s.split or "unsplit" for s in samples)
    if set(splits) != {"unsplit"}:
        lines.append("  fixed split: " + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())))
    for k, (train, val) in enumerate(folds or []):
        n_train = len({grouping.group(samples[i]) for i in train})
        n_val = len({grouping.group(samples[i]) for i in val})
        lines.append(f"  fold {k}: train {len(train)} samples / {n_train} groups, "
                     f"val {len(val)} samples / {n_val} groups")
    return "\n".join(lines)


def log_summary(samples: Sequence[Sample], folds: Sequence[Fold] | None = None,
                grouping: Grouping = Grouping()) -> None:
    """Log :func:`summarize_dataset` line by line at INFO."""
    for line in summarize_dataset(samples, folds, grouping).splitlines():
        log.info("%s", line)


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True,
                       data_dir_help: str = "") -> argparse._ArgumentGroup:
    """Add the ``data`` option group shared by every command that reads data.

    ``data_dir_help`` is appended to the help of ``--data_dir`` (e.g. where its default comes from).
    """
    defaults = DataOptions()
    group = parser.add_argument_group("data")
    group.add_argument("--data_dir", type=Path, required=required,
                       help="data directory (images/ + masks/, NuInsSeg organ folders, EPFL TIFF "
                            "stacks, COCO annotations.json or NIfTI volumes; optionally in "
                            "train/ val/ test/ folders)" + data_dir_help)
    group.add_argument("--data_format", choices=FORMATS, default=defaults.data_format,
                       help="layout of --data_dir; auto detects it and logs what it found")
    group.add_argument("--patch_size", type=int, default=defaults.patch_size,
                       help="cut images into square patches of this side in pixels (e.g. 256); "
                            "0 = whole images. Patches of one image stay in one fold")
    group.add_argument("--patch_overlap", type=int, default=defaults.patch_overlap,
                       help="pixels shared by neighbouring patches (less than --patch_size)")
    group.add_argument("--drop_empty_patches", action="store_true",
                       help="drop patches (whole images when --patch_size is 0) without objects")
    group.add_argument("--slice_block", type=int, default=defaults.slice_block,
                       help="consecutive slices of a volume that always share a fold, so "
                            "neighbouring near-identical slices never sit on both sides")
    group.add_argument("--nifti_axis", type=int, choices=(0, 1, 2), default=defaults.nifti_axis,
                       help="axis NIfTI volumes are sliced along (after RAS reorientation; 2 = axial)")
    group.add_argument("--fold_gap", type=int, default=defaults.fold_gap,
                       help="sections on each side of a validation run of a volume left out of that fold's "
                            "training (default: --slice_block)")
    group.add_argument("--group_by", default=defaults.group_by, metavar="REGEX",
                       help="2-D images: a regular expression on the file path whose first group (or match) is "
                            "the id that must not straddle a split, e.g. '^(slide\\d+)_' or '/(patient\\w+)/'")
    group.add_argument("--mask_type", choices=MASK_TYPES, default=defaults.mask_type,
                       help="binary = foreground masks, split into objects by connected components; instance = "
                            "each value one object; auto decides per dataset from the values and logs it")
    return group


def load_from_options(options: Any) -> list[Sample]:
    """:func:`read_samples` of ``options.data_dir`` with its data options (attributes of
    ``options``, e.g. parsed arguments or a TrainConfig, or keys of a mapping such as a run's
    config); logs the summary."""
    get = options.get if isinstance(options, Mapping) else (lambda key: getattr(options, key))
    samples = read_samples(get("data_dir"), DataOptions.of(options))
    log_summary(samples, grouping=grouping_of(options))
    return samples
