"""dataset.py: patches, the loader's options and filtering, the summary, augmentation."""
from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest
import tifffile
from data_checks import assert_same_partition

from samlora.core.errors import UserError
from samlora.data.dataset import (
    add_data_arguments,
    augment,
    load_dataset,
    load_from_options,
    make_patches,
    summarize_dataset,
)
from samlora.data.folds import make_folds
from samlora.data.sample import Sample


# ---------------------------------------------------------------------------------------------
# patches
# ---------------------------------------------------------------------------------------------
def test_patches_are_crops_that_keep_source_and_group(em_folders):
    source = em_folders[3]
    patches = make_patches(source, 256, overlap=64)
    starts = [0, 192, 256]  # 512 px sections: the last patch flush with the border
    assert [p.offset for p in patches] == [(y, x) for y in starts for x in starts]
    for p in patches:
        y, x = p.offset
        assert p.image.shape == (256, 256, 3) and p.is_patch and not np.shares_memory(p.image, source.image)
        assert np.array_equal(p.image, source.image[y:y + 256, x:x + 256])
        assert_same_partition(source.labels[y:y + 256, x:x + 256], p.labels)
        assert (p.group, p.path, p.source_shape) == (source.group, source.path, (512, 512))
        assert p.key == f"{source.source}@{y},{x}:256x256"
    small = make_patches(Sample(image=source.image[:100, :300], labels=source.labels[:100, :300],
                                group="g", tag="t", path=source.path, source="s"), 256)
    assert [p.image.shape for p in small] == [(100, 256, 3), (100, 256, 3)]
    assert [p.offset for p in small] == [(0, 0), (0, 44)]  # last patch flush with the border


# ---------------------------------------------------------------------------------------------
# the loader's options, filtering and summary
# ---------------------------------------------------------------------------------------------
def test_summary_lists_counts_tags_and_folds(cpm15):
    folds = make_folds(cpm15, 3)
    text = summarize_dataset(cpm15, folds)
    assert "15 samples" in text and "total 867" in text  # tests/data/README.md's count
    assert "cpm15 20x 7 samples" in text and "cpm15 40x 8 samples" in text
    assert [line.split(":")[0] for line in text.splitlines() if line.startswith("  fold")] == \
        ["  fold 0", "  fold 1", "  fold 2"]
    assert "val 5 samples / 5 groups" in text and "15 fold groups" in text


def test_data_arguments_and_load_from_options(shared_data, caplog):
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_arguments(parser)
    help_text = parser.format_help()
    for flag in ("--data_dir", "--data_format", "--patch_size", "--patch_overlap",
                 "--drop_empty_patches", "--slice_block", "--nifti_axis"):
        assert flag in help_text
    args = parser.parse_args(["--data_dir", str(shared_data / "nuclei_dsb_fluo"), "--patch_size", "256"])
    assert (args.data_format, args.slice_block) == ("auto", 10)
    with caplog.at_level(logging.INFO):
        samples = load_from_options(args)
    assert len(samples) == 4 and "dataset: 4 samples (4 patches)" in caplog.text
    assert sum(s.num_objects for s in samples) >= 125


def test_data_defaults_are_declared_once():
    """DataOptions holds the data defaults: the flags, load_dataset's keywords, TrainConfig (a
    subclass) and a run's config.json (missing keys, None) all take them from there."""
    import dataclasses
    import inspect

    from samlora.data.dataset import DataOptions, read_samples
    from samlora.training.config import TrainConfig

    defaults = DataOptions()
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    args = parser.parse_args(["--data_dir", "d"])
    assert DataOptions.of(args) == defaults
    assert DataOptions.of({"patch_size": 256, "mask_type": None}) == dataclasses.replace(defaults, patch_size=256)
    config = TrainConfig(data_dir="d", output_dir="o", slice_block=2)
    assert isinstance(config, DataOptions) and DataOptions.of(config) == dataclasses.replace(defaults, slice_block=2)
    assert list(inspect.signature(load_dataset).parameters) == ["data_dir", "data_format", "options"]
    assert list(inspect.signature(read_samples).parameters) == ["data_dir", "options"]
    with pytest.raises(TypeError, match="slice_blok"):
        load_dataset(".", slice_blok=2)


def test_bad_empty_after_filtering(pair_dir):
    for mask in (pair_dir / "masks").iterdir():
        tifffile.imwrite(mask, np.zeros_like(tifffile.imread(mask)))
    assert [s.num_objects for s in load_dataset(pair_dir)] == [0, 0]
    with pytest.raises(UserError, match="empty dataset after filtering"):
        load_dataset(pair_dir, drop_empty_patches=True)
    with pytest.raises(UserError, match="empty dataset after filtering"):
        load_dataset(pair_dir, patch_size=128, drop_empty_patches=True)


def test_bad_options():
    for kwargs, match in (({"patch_size": -1}, "--patch_size"),
                          ({"patch_size": 64, "patch_overlap": 64}, "--patch_overlap"),
                          ({"slice_block": 0}, "--slice_block"), ({"data_format": "zarr"}, "--data_format")):
        with pytest.raises(UserError, match=match):
            load_dataset(".", **kwargs)


# ---------------------------------------------------------------------------------------------
# augmentation
# ---------------------------------------------------------------------------------------------
def _dihedral(array: np.ndarray) -> list[np.ndarray]:
    return [np.rot90(a, k) for a in (array, array[:, ::-1]) for k in range(4)]


def test_augment_moves_image_and_labels_together(cpm15):
    labels = cpm15[0].labels[:120, :200].copy()
    lut = np.random.default_rng(0).integers(0, 256, size=(labels.max() + 1, 3)).astype(np.uint8)
    image = lut[labels]  # each label painted in its own color
    ignore = np.zeros(labels.shape, bool)
    ignore[:30, :50] = True
    seen = set()
    for seed in range(24):
        img, lab, ign = augment(image, labels, np.random.default_rng(seed), ignore=ignore,
                                brightness=0, contrast=0)
        assert np.array_equal(img, lut[lab])
        matches = [k for k, t in enumerate(_dihedral(labels))
                   if t.shape == lab.shape and np.array_equal(t, lab)]
        assert matches
        assert any(np.array_equal(t, ign) for t in _dihedral(ignore))
        seen.add(matches[0])
    assert len(seen) == 8  # all flips and rotations occur
    # brightness / contrast: labels untouched, pixels of one label keep one shared color
    img, lab, _ = augment(image, labels, np.random.default_rng(5), brightness=0.3, contrast=0.3)
    assert any(np.array_equal(t, lab) for t in _dihedral(labels))
    for value in np.unique(lab)[:20]:
        assert np.unique(img[lab == value], axis=0).shape[0] == 1
    assert not np.array_equal(img, lut[lab])
    same = augment(image, labels, np.random.default_rng(0), ignore=ignore, enabled=False)
    assert same[0] is image and same[1] is labels and same[2] is ignore
