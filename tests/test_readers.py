"""readers.py: every layout on the real sample data, layout detection, pairing errors.

Expected values are computed here from the raw files, never taken from the module under test.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from collections import Counter

import cv2
import numpy as np
import pytest
import tifffile
from data_checks import assert_same_partition, assert_sample_types, n_components, n_instances, read_rgb

from samlora.core.errors import UserError
from samlora.data import readers
from samlora.data.dataset import load_dataset
from samlora.data.folds import split_test


def test_nuinsseg_layout_cpm15(shared_data, cpm15, caplog):
    root = shared_data / "nuclei_cpm15"
    assert len(cpm15) == 15
    assert Counter(s.tag for s in cpm15) == {"cpm15 20x": 7, "cpm15 40x": 8}
    total = 0
    for s in cpm15:
        assert_sample_types(s)
        raw = tifffile.imread(root / s.tag / "label masks" / f"{s.path.stem}.tif")
        assert s.label_path == root / s.tag / "label masks" / f"{s.path.stem}.tif"
        assert s.num_objects == n_instances(raw)
        assert_same_partition(raw, s.labels)
        assert np.array_equal(s.image, read_rgb(s.path))
        assert s.group == s.source == f"{s.tag}/tissue images/{s.path.name}"
        assert s.split is None and s.ignore is None and s.slice_index is None
        total += s.num_objects
    assert total == 867  # tests/data/README.md's count
    assert len({s.group for s in cpm15}) == 15
    with caplog.at_level(logging.INFO):
        assert readers.detect_format(root) == "nuinsseg"
    assert "nuinsseg" in caplog.text


def test_nuinsseg_modified_labels_and_vague_areas(shared_data, tmp_path):
    src = shared_data / "nuclei_cpm15" / "cpm15 20x"
    organ = tmp_path / "human kidney"
    for sub in ("tissue images", "label masks", "label masks modify", "vague areas/mask binary"):
        (organ / sub).mkdir(parents=True)
    shutil.copy(src / "tissue images" / "image02.png", organ / "tissue images")
    raw = tifffile.imread(src / "label masks" / "image02.tif")
    tifffile.imwrite(organ / "label masks" / "image02.tif", raw)
    modified = raw.copy()
    modified[modified % 3 == 0] = 0  # drop a third of the nuclei
    tifffile.imwrite(organ / "label masks modify" / "image02.tif", modified)
    vague = np.zeros(raw.shape, np.uint8)
    vague[10:60, 20:90] = 255
    cv2.imwrite(str(organ / "vague areas" / "mask binary" / "image02.png"), vague)

    (s,) = load_dataset(tmp_path)
    assert s.tag == "human kidney"
    assert s.num_objects == n_instances(modified)
    assert s.label_path.parent.name == "label masks modify"
    assert np.array_equal(s.ignore, vague > 0)
    patches = load_dataset(tmp_path, patch_size=128)
    for p in patches:
        y, x = p.offset
        assert np.array_equal(p.ignore, (vague > 0)[y:y + 128, x:x + 128])


def test_folders_monuseg_uint16_instances(shared_data):
    root = shared_data / "nuclei_monuseg_train"
    samples = load_dataset(root)
    assert len(samples) == 13
    for s in samples:
        assert_sample_types(s)
        assert s.image.shape == (288, 288, 3)
        raw = tifffile.imread(root / "masks" / f"{s.path.stem}.tif")
        assert raw.dtype == np.uint16
        assert s.num_objects == n_instances(raw)
        assert_same_partition(raw, s.labels)
        assert np.array_equal(s.image, read_rgb(s.path))
        assert s.tag == "nuclei_monuseg_train"


def test_em_vnc_folders_binary_masks(shared_data, em_folders):
    root = shared_data / "em_vnc"
    assert len(em_folders) == 20
    for s in em_folders:
        assert_sample_types(s)
        raw_mask = cv2.imread(str(root / "masks" / s.path.name), cv2.IMREAD_UNCHANGED)
        raw_image = cv2.imread(str(s.path), cv2.IMREAD_UNCHANGED)
        assert s.num_objects == n_components(raw_mask) > 0
        assert np.array_equal(s.labels > 0, raw_mask > 0)
        assert np.array_equal(s.image, np.repeat(raw_image[:, :, None], 3, axis=2))
        assert s.slice_index is None and s.group == f"images/{s.path.name}"
    assert len({s.group for s in em_folders}) == 20


def test_em_vnc_auto_reads_numbered_slices_as_one_volume(shared_data, caplog):
    with caplog.at_level(logging.INFO):
        samples = load_dataset(shared_data / "em_vnc")
    assert "numbered slices" in caplog.text and "stack" in caplog.text
    assert [s.slice_index for s in samples] == list(range(20))
    assert [s.path.stem for s in samples] == [f"{i:02d}" for i in range(20)]
    assert [s.group for s in samples] == ["images:block0"] * 10 + ["images:block1"] * 10


def test_em_stack_epfl_layout(shared_data, em_stack):
    root = shared_data / "em_vnc_stack"
    assert len(em_stack) == 19  # sections 00-14 and 16-19: section 15 left out between them (no leak)
    for name, split, n in (("training", "train", 15), ("testing", "test", 4)):
        volume = tifffile.imread(root / f"{name}.tif")
        truth = tifffile.imread(root / f"{name}_groundtruth.tif")
        part = [s for s in em_stack if s.tag == name]
        assert len(part) == n == volume.shape[0]
        for z, s in enumerate(part):
            assert_sample_types(s)
            assert (s.slice_index, s.split, s.volume) == (z, split, f"{name}.tif")
            assert s.group == f"{name}.tif:block{z // 10}"
            assert np.array_equal(s.image[..., 1], volume[z])
            assert s.num_objects == n_components(truth[z])
            assert np.array_equal(s.labels > 0, truth[z] > 0)
    assert [s.tag for s in em_stack] == ["testing"] * 4 + ["training"] * 15  # sorted file names
    assert split_test(em_stack) == (list(range(4, 19)), list(range(4)))


def test_stack_volumes_in_image_and_mask_folders(shared_data, tmp_path):
    volume = tifffile.imread(shared_data / "em_vnc_stack" / "testing.tif")[:, :200, :300]
    truth = tifffile.imread(shared_data / "em_vnc_stack" / "testing_groundtruth.tif")[:, :200, :300]
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "images" / "vnc.tif", volume, photometric="minisblack")
    tifffile.imwrite(tmp_path / "masks" / "vnc.tif", truth, photometric="minisblack")
    samples = load_dataset(tmp_path, slice_block=2)
    assert [(s.slice_index, s.group) for s in samples] == [
        (0, "images/vnc.tif:block0"), (1, "images/vnc.tif:block0"), (2, "images/vnc.tif:block1"),
        (3, "images/vnc.tif:block1")]
    for z, s in enumerate(samples):
        assert s.num_objects == n_components(truth[z]) and s.image.shape == (200, 300, 3)
    with pytest.raises(UserError, match="holds a stack"):
        load_dataset(tmp_path, "folders")


# ---------------------------------------------------------------------------------------------
# NIfTI
# ---------------------------------------------------------------------------------------------
def test_nifti_volumes_along_axis(shared_data, tmp_path):
    nib = pytest.importorskip("nibabel")
    volume = tifffile.imread(shared_data / "em_vnc_stack" / "testing.tif")[:, 200:328, 300:396]
    truth = tifffile.imread(shared_data / "em_vnc_stack" / "testing_groundtruth.tif")[:, 200:328, 300:396]
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(np.moveaxis(volume, 0, 2).astype(np.int16) * 10, affine),
             tmp_path / "images" / "brain01.nii.gz")
    nib.save(nib.Nifti1Image(np.moveaxis(truth, 0, 2).astype(np.float32) / 255, affine),
             tmp_path / "labels" / "brain01.nii.gz")  # float, integral: accepted for NIfTI
    samples = load_dataset(tmp_path)
    assert len(samples) == len(volume) == 4  # the test stack's 4 sections
    for z, s in enumerate(samples):
        assert_sample_types(s)
        assert s.image.shape == (128, 96, 3) and s.slice_index == z
        assert s.num_objects == n_components(truth[z])
        # int16 is percentile-scaled per volume: ordering of intensities is kept
        order = np.argsort(volume[z].ravel(), kind="stable")
        assert np.all(np.diff(s.image[..., 0].ravel()[order].astype(int)) >= 0)
    sideways = load_dataset(tmp_path, "nifti", nifti_axis=0)
    assert len(sideways) == 128 and sideways[0].image.shape == (96, 4, 3)


def test_nifti_suffix_pairs_and_bad_float_labels(tmp_path):
    nib = pytest.importorskip("nibabel")
    image = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    labels = np.zeros((4, 5, 3), np.float32)
    labels[1:3, 1:3, 1] = 1
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "case.nii.gz")
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "case_seg.nii.gz")
    samples = load_dataset(tmp_path)
    assert [s.num_objects for s in samples] == [0, 1, 0]
    nib.save(nib.Nifti1Image(labels * 0.5, np.eye(4)), tmp_path / "case_seg.nii.gz")
    with pytest.raises(UserError, match="case_seg.nii.gz.*float"):
        load_dataset(tmp_path)
    # nnU-Net layout: imagesTr/case_0000.nii.gz + labelsTr/case.nii.gz, and a dataset.json
    nnunet = tmp_path / "nnunet"
    for sub in ("imagesTr", "labelsTr"):
        (nnunet / sub).mkdir(parents=True)
    nib.save(nib.Nifti1Image(image, np.eye(4)), nnunet / "imagesTr" / "case_0000.nii.gz")
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.eye(4)), nnunet / "labelsTr" / "case.nii.gz")
    (nnunet / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1}}))
    samples = load_dataset(nnunet)
    assert [(s.split, s.num_objects) for s in samples] == [("train", 0), ("train", 1), ("train", 0)]


def test_nifti_without_nibabel_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "a_seg.nii.gz").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(UserError, match="pip install nibabel"):
        load_dataset(tmp_path, "nifti")


# ---------------------------------------------------------------------------------------------
# bad input: each a UserError naming the file
# ---------------------------------------------------------------------------------------------
def test_bad_no_images(tmp_path, pair_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images found"):
        load_dataset(empty)
    with pytest.raises(UserError, match="not a directory"):
        load_dataset(tmp_path / "missing")
    for f in (pair_dir / "images").iterdir():
        f.unlink()
    with pytest.raises(UserError, match="no images found in .*images"):
        load_dataset(pair_dir, "folders")


def test_bad_image_without_mask_and_mask_without_image(pair_dir):
    (pair_dir / "masks" / "image04.tif").rename(pair_dir / "image04.tif")
    with pytest.raises(UserError, match=r"1 image\(s\) without a mask.*image04\.png"):
        load_dataset(pair_dir)
    (pair_dir / "image04.tif").rename(pair_dir / "masks" / "image04.tif")
    (pair_dir / "images" / "image02.png").unlink()
    with pytest.raises(UserError, match=r"1 mask\(s\) without an image.*image02\.tif"):
        load_dataset(pair_dir)


def test_bad_stack_slice_count(shared_data, tmp_path):
    volume = tifffile.imread(shared_data / "em_vnc_stack" / "testing.tif")[:, :64, :64]
    truth = tifffile.imread(shared_data / "em_vnc_stack" / "testing_groundtruth.tif")[:, :64, :64]
    tifffile.imwrite(tmp_path / "training.tif", volume, photometric="minisblack")
    tifffile.imwrite(tmp_path / "training_groundtruth.tif", truth[:3], photometric="minisblack")
    with pytest.raises(UserError, match=r"training\.tif has 4 slices.*training_groundtruth\.tif have 3"):
        load_dataset(tmp_path)
    tifffile.imwrite(tmp_path / "training_groundtruth.tif", truth, photometric="minisblack")
    tifffile.imwrite(tmp_path / "extra.tif", volume, photometric="minisblack")
    with pytest.raises(UserError, match=r"extra\.tif has no matching label volume"):
        load_dataset(tmp_path, "stack")


def test_em_test_stack_does_not_border_the_training_stack(em_stack, em_volume):
    """The EPFL-layout test data (conftest.write_em_stacks) is one volume split in two stacks:
    each stack section is found among the 20 consecutive sections, and at least one section lies
    between the last training and the first testing section (a test section next to a training
    one is nearly the same image: a leak)."""
    images = em_volume[0]
    where = {}
    for s in em_stack:
        hits = [z for z in range(len(images)) if np.array_equal(s.image[..., 1], images[z])]
        assert len(hits) == 1, s
        where.setdefault(s.tag, []).append(hits[0])
    train, test = sorted(where["training"]), sorted(where["testing"])
    assert train == list(range(train[0], train[-1] + 1)) and test == list(range(test[0], test[-1] + 1))
    assert test[0] - train[-1] >= 2 or train[0] - test[-1] >= 2, (train, test)
