"""folds.py: grouped folds never split an image or a slice block; folds.json round trip."""
from __future__ import annotations

import json

import pytest

from samlora.core.errors import UserError
from samlora.data.dataset import load_dataset, make_patches
from samlora.data.folds import (
    Grouping,
    grouping_of,
    load_folds,
    make_folds,
    make_holdout,
    plan_folds,
    save_folds,
    split_test,
)


def _assert_no_leak(samples, folds, slice_block=10):
    covered = []
    for train, val in folds:
        train_groups = {Grouping(slice_block).group(samples[i]) for i in train}
        val_groups = {Grouping(slice_block).group(samples[i]) for i in val}
        assert val and train and not train_groups & val_groups
        assert not set(train) & set(val)
        covered += val
    return covered


def test_patch_folds_never_split_an_image(shared_data):
    samples = load_dataset(shared_data / "em_vnc", "folders", patch_size=256)
    assert len(samples) == 20 * 4  # 512 px sections: 4 patches each
    folds = make_folds(samples, 5, seed=1)
    covered = _assert_no_leak(samples, folds)
    assert sorted(covered) == list(range(len(samples)))  # every patch validated exactly once
    for train, val in folds:
        val_sources = {samples[i].source for i in val}
        assert all(samples[i].source not in val_sources for i in train)
        assert len(val) == 4 * 4  # balanced: 4 whole images per fold
    assert make_folds(samples, 5, seed=1) == folds
    assert make_folds(samples, 5, seed=2) != folds


def test_stack_folds_keep_slice_blocks_together(em_stack):
    trainval, test = split_test(em_stack)
    with pytest.raises(UserError, match="no training sample once the 5 sections next to it"):
        make_folds(em_stack, 3, seed=0, grouping=Grouping(5))  # the default gap: the middle fold has nothing left
    folds = make_folds(em_stack, 3, seed=0, grouping=Grouping(5, fold_gap=1))
    covered = _assert_no_leak(em_stack, folds, slice_block=5)
    assert sorted(covered) == trainval and not set(covered) & set(test)
    blocks = ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14])
    for _, val in folds:
        assert [em_stack[i].slice_index for i in val] in blocks
        side = {em_stack[i].slice_index: i in val for i in trainval}
        for z in range(14):  # adjacent slices of one block are always on the same side
            if z // 5 == (z + 1) // 5:
                assert side[z] == side[z + 1]
    # with the default blocks of 10 the 15 training slices are 2 groups
    with pytest.raises(UserError, match="cannot make 3 folds from 2 groups"):
        make_folds(em_stack, 3)
    patches = [p for s in em_stack for p in make_patches(s, 512)]
    _assert_no_leak(patches, make_folds(patches, 3, grouping=Grouping(5, fold_gap=1)), slice_block=5)


def test_more_folds_than_groups(cpm15):
    with pytest.raises(UserError, match="cannot make 16 folds from 15 groups"):
        make_folds(cpm15, 16)
    with pytest.raises(UserError, match="at least 2 folds"):
        make_folds(cpm15, 1)


def test_holdout_is_grouped(em_folders):
    patches = [p for s in em_folders for p in make_patches(s, 512)]
    train, val = make_holdout(patches, 0.2, seed=3)
    assert len(val) == 4 and len(train) == 16  # one 512 px patch per section
    assert not {patches[i].group for i in train} & {patches[i].group for i in val}


def test_folds_json_round_trip_and_mismatch(cpm15, em_folders, tmp_path):
    folds = make_folds(cpm15, 3, seed=7)
    path = save_folds(tmp_path, folds, cpm15, seed=7)
    assert path == tmp_path / "folds.json"
    record = json.loads(path.read_text())
    assert record["folds"][0]["val_groups"] == sorted({cpm15[i].group for i in folds[0][1]})
    assert load_folds(path, cpm15) == folds
    with pytest.raises(UserError, match="fresh --output_dir"):
        load_folds(path, em_folders[:15])
    with pytest.raises(UserError, match="fresh --output_dir"):
        load_folds(path, list(reversed(cpm15)))
    run = tmp_path / "run"
    made, found = plan_folds(run, cpm15, 3, seed=7)
    assert made == folds and not found and not run.exists()  # planned, written nowhere
    save_folds(run, made, cpm15, seed=7)
    assert plan_folds(run, cpm15, 3, seed=99) == (folds, True)  # re-used, not re-drawn
    assert plan_folds(run, cpm15, 3, seed=99, reuse=False)[0] != folds  # a run about to be replaced
    with pytest.raises(UserError, match="holds 3 fold"):
        plan_folds(run, cpm15, 5)


def test_volume_folds_are_contiguous_runs_with_a_gap(shared_data, tmp_path):
    """20 consecutive EM sections, blocks of 2, 4 folds, a gap of 2 sections: every validation part
    is one run of sections and no training section lies within 2 sections of it."""
    samples = load_dataset(shared_data / "em_vnc", "stack", slice_block=2)
    assert [s.slice_index for s in samples] == list(range(20))
    grouping = Grouping(2, fold_gap=2)
    folds = make_folds(samples, 4, grouping=grouping)
    assert sorted(i for _, val in folds for i in val) == list(range(20))
    for train, val in folds:
        zs = sorted(samples[i].slice_index for i in val)
        assert zs == list(range(zs[0], zs[-1] + 1))  # one contiguous run
        assert train and all(min(abs(samples[i].slice_index - z) for z in zs) > 2 for i in train)
    path = save_folds(tmp_path, folds, samples, grouping=grouping)
    record = json.loads(path.read_text())
    assert record["fold_gap"] == 2 and record["folds"][1]["gap"] and "fold_gap" in record["guarantee"]
    assert load_folds(path, samples) == folds
    record["folds"][1]["train"] += record["folds"][1]["gap"]  # training that reaches into the gap
    path.write_text(json.dumps(record))
    with pytest.raises(UserError, match="within 2 sections of validation"):
        load_folds(path, samples)
    assert Grouping(5).gap == 5  # the default gap is the block size
    train, val = make_holdout(samples, 0.25, seed=3, grouping=grouping)
    zs = sorted(samples[i].slice_index for i in val)
    assert len(zs) >= 5 and zs == list(range(zs[0], zs[-1] + 1))
    assert all(min(abs(samples[i].slice_index - z) for z in zs) > 2 for i in train)


def test_group_by_keeps_the_crops_of_one_slide_together(shared_data, tmp_path):
    import shutil

    src = shared_data / "nuclei_cpm15" / "cpm15 20x"
    images = sorted((src / "tissue images").glob("*.png"))[:6]
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for k, image in enumerate(images):  # three slides, two crops each
        name = f"slide{'ABC'[k // 2]}_crop{k % 2}"
        shutil.copy(image, tmp_path / "images" / f"{name}.png")
        shutil.copy(src / "label masks" / f"{image.stem}.tif", tmp_path / "masks" / f"{name}.tif")
    samples = load_dataset(tmp_path)
    grouping = Grouping(group_by=r"(slide[A-Z])_")
    assert {grouping.group(s) for s in samples} == {"slideA", "slideB", "slideC"}
    for train, val in make_folds(samples, 3, grouping=grouping):
        assert not {grouping.group(samples[i]) for i in train} & {grouping.group(samples[i]) for i in val}
        assert len(val) == 2
    with pytest.raises(UserError, match="does not match images/slideA_crop0.png"):
        Grouping(group_by=r"patient\d+").group(samples[0])
    with pytest.raises(UserError, match="not a valid regular expression"):
        Grouping(group_by="(")


def test_one_way_to_a_grouping_from_options(tmp_path):
    """Parsed arguments, a TrainConfig, a run's config.json and a folds.json all give their
    Grouping through grouping_of; absent options take the Grouping's defaults."""
    import argparse

    from samlora.training.config import TrainConfig

    args = argparse.Namespace(slice_block=4, fold_gap=None, group_by=r"(slide\d)_", data_dir="x")
    assert grouping_of(args) == Grouping(4, None, r"(slide\d)_")
    config = TrainConfig(data_dir="", output_dir="", slice_block=3, fold_gap=1)
    assert grouping_of(config) == Grouping(3, 1)
    assert grouping_of(config.to_json()) == Grouping(3, 1)
    assert grouping_of({}) == grouping_of(argparse.Namespace()) == Grouping()
    with pytest.raises(UserError, match="--slice_block must be at least 1"):
        grouping_of({"slice_block": 0})


def test_folds_recorded_without_a_gap_still_load(tmp_path, em_stack):
    """folds.json carries its schema; one without ``fold_gap`` (schema 1) was made with no gap:
    it loads as such."""
    from samlora.data import folds as folds_lib

    folds = make_folds(em_stack, 3, grouping=Grouping(5, fold_gap=0))
    path = save_folds(tmp_path, folds, em_stack, grouping=Grouping(5, fold_gap=0))
    record = json.loads(path.read_text())
    assert record["schema"] == folds_lib.FOLDS_SCHEMA and "version" not in record
    del record["fold_gap"], record["schema"]
    path.write_text(json.dumps(record))
    assert load_folds(path, em_stack) == folds
