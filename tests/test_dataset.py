"""dataset.py: every reader on the real sample data, patches, leakage-free folds, prompts, augment.

Expected values are computed here from the raw files (np.unique on label TIFFs,
cv2.connectedComponents on binary PNGs), never taken from the module under test.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

import dataset
from dataset import (Sample, add_data_arguments, augment, load_dataset, load_folds,
                     load_from_args, load_or_make_folds, make_folds, make_holdout, make_patches,
                     rle_decode, sample_prompts, save_folds, split_test, summarize_dataset)
from errors import UserError


# ---------------------------------------------------------------------------------------------
# helpers (independent of dataset.py)
# ---------------------------------------------------------------------------------------------
def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def n_instances(raw: np.ndarray) -> int:
    return int(np.unique(raw[raw > 0]).size)


def n_components(binary: np.ndarray) -> int:
    return cv2.connectedComponents((binary > 0).astype(np.uint8))[0] - 1


def assert_same_partition(expected: np.ndarray, labels: np.ndarray) -> None:
    """Same foreground and a one-to-one correspondence between the label values."""
    fg = expected > 0
    assert np.array_equal(fg, labels > 0)
    if not fg.any():
        return
    a, b = expected[fg].astype(np.int64), labels[fg].astype(np.int64)
    pairs = np.unique(a * (int(b.max()) + 1) + b).size
    assert pairs == np.unique(a).size == np.unique(b).size


def assert_sample_types(s: Sample) -> None:
    assert s.image.dtype == np.uint8 and s.image.ndim == 3 and s.image.shape[2] == 3
    assert s.labels.dtype == np.int32 and s.labels.shape == s.image.shape[:2]
    n = s.num_objects
    present = np.unique(s.labels)
    assert np.array_equal(present[present > 0], np.arange(1, n + 1))  # consecutive 1..N


def coco_rle_string(counts: list[int]) -> str:
    """pycocotools' compressed RLE string (the encoder side of maskApi.c's rleToString)."""
    out = []
    for i, value in enumerate(counts):
        x = value - counts[i - 2] if i > 2 else value
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def rle_counts(mask: np.ndarray) -> list[int]:
    flat = mask.astype(bool).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    return ([0] + counts) if flat[0] else counts


# ---------------------------------------------------------------------------------------------
# real data, loaded once
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpm15(shared_data):
    return load_dataset(shared_data / "nuclei_cpm15")


@pytest.fixture(scope="module")
def em_folders(shared_data):
    return load_dataset(shared_data / "em_vnc", "folders")


@pytest.fixture(scope="module")
def em_stack(shared_data):
    return load_dataset(shared_data / "em_vnc_stack")


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
    assert total == 2905  # the data README's count
    assert len({s.group for s in cpm15}) == 15
    with caplog.at_level(logging.INFO):
        assert dataset.detect_format(root) == "nuinsseg"
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
        assert s.image.shape == (1000, 1000, 3)
        raw = tifffile.imread(root / "masks" / f"{s.path.stem}.tif")
        assert raw.dtype == np.uint16
        assert s.num_objects == n_instances(raw)
        assert_same_partition(raw, s.labels)
        assert np.array_equal(s.image, read_rgb(s.path))
        assert s.tag == "nuclei_monuseg_train"


def test_dsb_16bit_image_and_nonconsecutive_labels(shared_data):
    root = shared_data / "nuclei_dsb_fluo"
    (s,) = load_dataset(root)
    assert_sample_types(s)
    raw_image = tifffile.imread(root / "images" / "img2d.tif")
    raw_labels = tifffile.imread(root / "masks" / "img2d.tif")
    assert raw_image.dtype == np.uint16
    assert n_instances(raw_labels) == 125 and raw_labels.max() > 125  # not consecutive
    assert s.num_objects == 125
    assert_same_partition(raw_labels, s.labels)
    # grayscale -> 3 equal channels, scaled between the 1st and 99.8th percentile
    gray = s.image[..., 0]
    assert np.array_equal(gray, s.image[..., 1]) and np.array_equal(gray, s.image[..., 2])
    lo, hi = np.percentile(raw_image.astype(np.float64), (1, 99.8))
    expected = np.clip(np.round((raw_image - lo) / (hi - lo) * 255), 0, 255)
    assert np.abs(s.image[..., 0].astype(int) - expected).max() <= 1
    assert s.image.min() == 0 and s.image.max() == 255


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
    assert len(em_stack) == 20
    for name, split, n in (("training", "train", 15), ("testing", "test", 5)):
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
    assert [s.tag for s in em_stack] == ["testing"] * 5 + ["training"] * 15  # sorted file names
    assert split_test(em_stack) == (list(range(5, 20)), list(range(5)))


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
        (3, "images/vnc.tif:block1"), (4, "images/vnc.tif:block2")]
    for z, s in enumerate(samples):
        assert s.num_objects == n_components(truth[z]) and s.image.shape == (200, 300, 3)
    with pytest.raises(UserError, match="holds a stack"):
        load_dataset(tmp_path, "folders")


# ---------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------
def test_rle_decode_matches_pycocotools_vectors():
    # Encoded with pycocotools 2.0.11 (mask.encode on a Fortran-ordered uint8 array).
    expected = np.zeros((7, 9), bool)
    expected[1:5, 2:6] = True
    expected[6, 8] = expected[0, 0] = True
    expected[3:7, 7] = True
    assert np.array_equal(rle_decode({"size": [7, 9], "counts": "01>3E0000090JM"}), expected)
    assert np.array_equal(rle_decode({"size": [7, 9], "counts": b"01>3E0000090JM"}), expected)
    assert coco_rle_string(rle_counts(expected)) == "01>3E0000090JM"
    frame = np.zeros((40, 60), bool)
    frame[5:35, 10:50] = True
    frame[12:20, 20:30] = False
    frame[0:40:3, 55] = True
    encoded = ("e<n0:000000000000000000YON82HN82HN82HN82HN82HN82HN82HN82HN82HN82?0000000000000000"
               "0000000000000000000000S6SOeI0000000000000000000000000n4")
    assert np.array_equal(rle_decode({"size": [40, 60], "counts": encoded}), frame)
    assert np.array_equal(rle_decode({"size": [40, 60], "counts": rle_counts(frame)}), frame)
    with pytest.raises(UserError, match="corrupt"):
        rle_decode({"size": [40, 61], "counts": rle_counts(frame)})


def _write_coco(folder: Path, items: list[tuple[Path, np.ndarray, str]], crowd: bool = False) -> dict:
    """COCO file from real images + instance labels; encoding per image: polygon / rle / rle_str."""
    (folder / "images").mkdir(parents=True)
    images, annotations = [], []
    for image_id, (image_path, labels, encoding) in enumerate(items, start=1):
        shutil.copy(image_path, folder / "images" / image_path.name)
        images.append({"id": image_id, "file_name": image_path.name,
                       "height": labels.shape[0], "width": labels.shape[1]})
        for value in np.unique(labels[labels > 0]):
            mask = labels == value
            if encoding == "polygon":
                contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                               cv2.CHAIN_APPROX_NONE)
                seg = [c.reshape(-1).tolist() for c in contours if len(c) >= 3]
                if not seg:
                    continue
            elif encoding == "rle":
                seg = {"size": list(mask.shape), "counts": rle_counts(mask)}
            else:
                seg = {"size": list(mask.shape), "counts": coco_rle_string(rle_counts(mask))}
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "segmentation": seg, "iscrowd": 0, "area": int(mask.sum())})
        if crowd:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "iscrowd": 1, "segmentation": [[5, 5, 60, 5, 60, 40, 5, 40]]})
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "nucleus"}]}
    (folder / "annotations.json").write_text(json.dumps(data))
    return data


@pytest.fixture(scope="module")
def cpm15_small(shared_data):
    """Two real H&E tiles with their instance labels."""
    root = shared_data / "nuclei_cpm15" / "cpm15 20x"
    return [(root / "tissue images" / f"{n}.png", tifffile.imread(root / "label masks" / f"{n}.tif"))
            for n in ("image02", "image04")]


def test_coco_polygons_rle_and_crowd(cpm15_small, tmp_path, caplog):
    (img_a, lab_a), (img_b, lab_b) = cpm15_small
    data = _write_coco(tmp_path, [(img_a, lab_a, "polygon"), (img_b, lab_b, "rle_str")], crowd=True)
    with caplog.at_level(logging.INFO):
        samples = load_dataset(tmp_path)
    assert "--data_format coco" in caplog.text
    a, b = samples
    for s in samples:
        assert_sample_types(s)
        assert s.split is None and s.label_path == tmp_path / "annotations.json"
    # compressed RLE is exact
    assert b.num_objects == n_instances(lab_b)
    assert_same_partition(lab_b, b.labels)
    assert np.array_equal(b.image, read_rgb(img_b))
    # polygons from contours: every annotation an object, foreground nearly identical
    n_polygons = sum(1 for ann in data["annotations"] if ann["image_id"] == 1 and not ann["iscrowd"])
    assert a.num_objects == n_polygons
    agreement = np.mean((a.labels > 0) == (lab_a > 0))
    assert agreement > 0.99
    # crowd region -> ignore, not an object
    for s in samples:
        crowd = np.zeros(s.labels.shape, np.uint8)
        cv2.fillPoly(crowd, [np.array([[5, 5], [60, 5], [60, 40], [5, 40]], np.int32)], 1)
        assert np.array_equal(s.ignore, crowd > 0)


def test_coco_uncompressed_rle_exact(cpm15_small, tmp_path):
    (img_a, lab_a), _ = cpm15_small
    _write_coco(tmp_path, [(img_a, lab_a, "rle")])
    (s,) = load_dataset(tmp_path, "coco")
    assert_same_partition(lab_a, s.labels)
    assert s.ignore is None


def test_coco_train_val_test_folders(cpm15_small, tmp_path):
    (img_a, lab_a), (img_b, lab_b) = cpm15_small
    for split, item in (("train", (img_a, lab_a, "rle")), ("val", (img_b, lab_b, "rle_str")),
                        ("test", (img_b, lab_b, "rle"))):
        _write_coco(tmp_path / split, [item])
    samples = load_dataset(tmp_path)
    assert [s.split for s in samples] == ["test", "train", "val"]
    assert samples[1].source == "train/images/image02.png"
    assert split_test(samples) == ([1, 2], [0])
    assert make_holdout(samples, 0.5) == ([1], [2])  # the fixed validation split is honoured


def test_coco_roboflow_style_valid_folder(cpm15_small, tmp_path):
    """``valid/_annotations.coco.json`` with the images beside it (Roboflow exports)."""
    (img_a, lab_a), (img_b, lab_b) = cpm15_small
    _write_coco(tmp_path / "train", [(img_a, lab_a, "rle")])
    valid = tmp_path / "valid"
    _write_coco(valid, [(img_b, lab_b, "rle_str")])
    (valid / "annotations.json").rename(valid / "_annotations.coco.json")
    (valid / "images" / "image04.png").rename(valid / "image04.png")
    samples = load_dataset(tmp_path, "coco")
    assert [(s.split, s.source) for s in samples] == [("train", "train/images/image02.png"),
                                                       ("val", "valid/image04.png")]
    assert_same_partition(lab_b, samples[1].labels)


def test_coco_missing_image(cpm15_small, tmp_path):
    (img_a, lab_a), (img_b, lab_b) = cpm15_small
    _write_coco(tmp_path, [(img_a, lab_a, "rle"), (img_b, lab_b, "rle")])
    (tmp_path / "images" / "image04.png").unlink()
    with pytest.raises(UserError, match=r"annotations\.json references 1 image.*image04\.png"):
        load_dataset(tmp_path)


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
    assert len(samples) == 5
    for z, s in enumerate(samples):
        assert_sample_types(s)
        assert s.image.shape == (128, 96, 3) and s.slice_index == z
        assert s.num_objects == n_components(truth[z])
        # int16 is percentile-scaled per volume: ordering of intensities is kept
        order = np.argsort(volume[z].ravel(), kind="stable")
        assert np.all(np.diff(s.image[..., 0].ravel()[order].astype(int)) >= 0)
    sideways = load_dataset(tmp_path, "nifti", nifti_axis=0)
    assert len(sideways) == 128 and sideways[0].image.shape == (96, 5, 3)


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
# patches and folds
# ---------------------------------------------------------------------------------------------
def test_patches_are_crops_that_keep_source_and_group(em_folders):
    source = em_folders[3]
    patches = make_patches(source, 256, overlap=64)
    starts = [0, 192, 384, 576, 768]
    assert [p.offset for p in patches] == [(y, x) for y in starts for x in starts]
    for p in patches:
        y, x = p.offset
        assert p.image.shape == (256, 256, 3) and p.is_patch and not np.shares_memory(p.image, source.image)
        assert np.array_equal(p.image, source.image[y:y + 256, x:x + 256])
        assert_same_partition(source.labels[y:y + 256, x:x + 256], p.labels)
        assert (p.group, p.path, p.source_shape) == (source.group, source.path, (1024, 1024))
        assert p.key == f"{source.source}@{y},{x}:256x256"
    small = make_patches(Sample(image=source.image[:100, :300], labels=source.labels[:100, :300],
                                group="g", tag="t", path=source.path, source="s"), 256)
    assert [p.image.shape for p in small] == [(100, 256, 3), (100, 256, 3)]
    assert [p.offset for p in small] == [(0, 0), (0, 44)]  # last patch flush with the border


def _assert_no_leak(samples, folds, slice_block=10):
    covered = []
    for train, val in folds:
        train_groups = {dataset.fold_group(samples[i], slice_block) for i in train}
        val_groups = {dataset.fold_group(samples[i], slice_block) for i in val}
        assert val and train and not train_groups & val_groups
        assert not set(train) & set(val)
        covered += val
    return covered


def test_patch_folds_never_split_an_image(shared_data):
    samples = load_dataset(shared_data / "em_vnc", "folders", patch_size=256)
    assert len(samples) == 20 * 16
    folds = make_folds(samples, 5, seed=1)
    covered = _assert_no_leak(samples, folds)
    assert sorted(covered) == list(range(len(samples)))  # every patch validated exactly once
    for train, val in folds:
        val_sources = {samples[i].source for i in val}
        assert all(samples[i].source not in val_sources for i in train)
        assert len(val) == 4 * 16  # balanced: 4 whole images per fold
    assert make_folds(samples, 5, seed=1) == folds
    assert make_folds(samples, 5, seed=2) != folds


def test_stack_folds_keep_slice_blocks_together(em_stack):
    trainval, test = split_test(em_stack)
    folds = make_folds(em_stack, 3, seed=0, slice_block=5)
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
    _assert_no_leak(patches, make_folds(patches, 3, slice_block=5), slice_block=5)


def test_more_folds_than_groups(cpm15):
    with pytest.raises(UserError, match="cannot make 16 folds from 15 groups"):
        make_folds(cpm15, 16)
    with pytest.raises(UserError, match="at least 2 folds"):
        make_folds(cpm15, 1)


def test_holdout_is_grouped(em_folders):
    patches = [p for s in em_folders for p in make_patches(s, 512)]
    train, val = make_holdout(patches, 0.2, seed=3)
    assert len(val) == 4 * 4 and len(train) == 16 * 4
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
    made = load_or_make_folds(run, cpm15, 3, seed=7)
    assert made == folds and (run / "folds.json").is_file()
    assert load_or_make_folds(run, cpm15, 3, seed=99) == folds  # re-used, not re-drawn
    with pytest.raises(UserError, match="holds 3 fold"):
        load_or_make_folds(run, cpm15, 5)


def test_summary_lists_counts_tags_and_folds(cpm15):
    folds = make_folds(cpm15, 3)
    text = summarize_dataset(cpm15, folds)
    assert "15 samples" in text and "total 2905" in text
    assert "cpm15 20x 7 samples" in text and "cpm15 40x 8 samples" in text
    assert [line.split(":")[0] for line in text.splitlines() if line.startswith("  fold")] == \
        ["  fold 0", "  fold 1", "  fold 2"]
    assert "val 5 samples / 5 groups" in text and "15 fold groups" in text


def test_data_arguments_and_load_from_args(shared_data, caplog):
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_arguments(parser)
    help_text = parser.format_help()
    for flag in ("--data_dir", "--data_format", "--patch_size", "--patch_overlap",
                 "--drop_empty_patches", "--slice_block", "--nifti_axis", "--max_objects"):
        assert flag in help_text
    args = parser.parse_args(["--data_dir", str(shared_data / "nuclei_dsb_fluo"), "--patch_size", "256"])
    assert (args.data_format, args.slice_block, args.max_objects) == ("auto", 10, 32)
    with caplog.at_level(logging.INFO):
        samples = load_from_args(args)
    assert len(samples) == 4 and "dataset: 4 samples (4 patches)" in caplog.text
    assert sum(s.num_objects for s in samples) >= 125


# ---------------------------------------------------------------------------------------------
# bad input: each a UserError naming the file
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def pair_dir(shared_data, tmp_path):
    """images/ + masks/ with two real nuclei tiles (PNG image, uint16 TIFF labels)."""
    src = shared_data / "nuclei_cpm15" / "cpm15 20x"
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("image02", "image04"):
        shutil.copy(src / "tissue images" / f"{name}.png", tmp_path / "images")
        shutil.copy(src / "label masks" / f"{name}.tif", tmp_path / "masks")
    return tmp_path


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


def test_bad_size_mismatch(pair_dir):
    labels = tifffile.imread(pair_dir / "masks" / "image02.tif")
    tifffile.imwrite(pair_dir / "masks" / "image02.tif", labels[:-3])
    with pytest.raises(UserError, match=r"size mismatch.*image02\.png.*image02\.tif"):
        load_dataset(pair_dir)


def test_bad_corrupt_or_truncated_files(pair_dir):
    png = pair_dir / "images" / "image02.png"
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    with pytest.raises(UserError, match=r"cannot read .*image02\.png.*corrupt"):
        load_dataset(pair_dir)
    png.unlink()
    (pair_dir / "masks" / "image02.tif").unlink()
    tif = pair_dir / "masks" / "image04.tif"
    tif.write_bytes(tif.read_bytes()[: tif.stat().st_size // 2])
    with pytest.raises(UserError, match=r"cannot read .*image04\.tif.*corrupt"):
        load_dataset(pair_dir)
    tif.write_bytes(b"not a tiff at all")
    with pytest.raises(UserError, match=r"cannot read .*image04\.tif"):
        load_dataset(pair_dir)


def test_bad_label_dtype_and_negative_values(pair_dir):
    mask = pair_dir / "masks" / "image02.tif"
    labels = tifffile.imread(mask)
    tifffile.imwrite(mask, labels.astype(np.float32))
    with pytest.raises(UserError, match=r"image02\.tif.*float32.*integers"):
        load_dataset(pair_dir)
    signed = labels.astype(np.int16)
    signed[0, 0] = -1
    tifffile.imwrite(mask, signed)
    with pytest.raises(UserError, match=r"image02\.tif.*negative"):
        load_dataset(pair_dir)


def test_bad_empty_after_filtering(pair_dir):
    for mask in (pair_dir / "masks").iterdir():
        tifffile.imwrite(mask, np.zeros_like(tifffile.imread(mask)))
    assert [s.num_objects for s in load_dataset(pair_dir)] == [0, 0]
    with pytest.raises(UserError, match="empty dataset after filtering"):
        load_dataset(pair_dir, drop_empty_patches=True)
    with pytest.raises(UserError, match="empty dataset after filtering"):
        load_dataset(pair_dir, patch_size=128, drop_empty_patches=True)


def test_bad_stack_slice_count(shared_data, tmp_path):
    volume = tifffile.imread(shared_data / "em_vnc_stack" / "testing.tif")[:, :64, :64]
    truth = tifffile.imread(shared_data / "em_vnc_stack" / "testing_groundtruth.tif")[:, :64, :64]
    tifffile.imwrite(tmp_path / "training.tif", volume, photometric="minisblack")
    tifffile.imwrite(tmp_path / "training_groundtruth.tif", truth[:4], photometric="minisblack")
    with pytest.raises(UserError, match=r"training\.tif has 5 slices.*training_groundtruth\.tif have 4"):
        load_dataset(tmp_path)
    tifffile.imwrite(tmp_path / "training_groundtruth.tif", truth, photometric="minisblack")
    tifffile.imwrite(tmp_path / "extra.tif", volume, photometric="minisblack")
    with pytest.raises(UserError, match=r"extra\.tif has no matching label volume"):
        load_dataset(tmp_path, "stack")


def test_bad_options():
    for kwargs, match in (({"patch_size": -1}, "--patch_size"),
                          ({"patch_size": 64, "patch_overlap": 64}, "--patch_overlap"),
                          ({"slice_block": 0}, "--slice_block"), ({"data_format": "zarr"}, "--data_format")):
        with pytest.raises(UserError, match=match):
            load_dataset(".", **kwargs)


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------
def test_boxes_enclose_masks_and_points_fall_inside_and_outside(cpm15):
    labels = cpm15[0].labels
    prompts = sample_prompts(labels, np.random.default_rng(0), "point", num_points=3, box_jitter=0.0)
    n = labels.max()
    assert len(prompts) == n
    assert prompts.boxes.shape == (n, 4) and prompts.boxes.dtype == np.float32
    assert prompts.points.shape == (n, 6, 2) and prompts.point_labels.shape == (n, 6)
    assert prompts.masks.shape == (n,) + labels.shape and prompts.masks.dtype == bool
    assert prompts.use_points and not prompts.use_boxes and prompts.mask_inputs is None
    for box, pts, pl, mask, obj in zip(prompts.boxes, prompts.points, prompts.point_labels,
                                       prompts.masks, prompts.object_ids, strict=True):
        assert np.array_equal(mask, labels == obj)
        ys, xs = np.nonzero(mask)
        assert box.tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]
        assert pl.tolist() == [1, 1, 1, 0, 0, 0]
        inside = mask[pts[:, 1].astype(int), pts[:, 0].astype(int)]
        assert inside.tolist() == [True, True, True, False, False, False]


def test_box_jitter_is_bounded(cpm15):
    labels = cpm15[1].labels
    exact = sample_prompts(labels, np.random.default_rng(0), box_jitter=0.0).boxes
    jittered = sample_prompts(labels, np.random.default_rng(1), box_jitter=0.1).boxes
    side = np.concatenate([exact[:, 2:] - exact[:, :2] + 1] * 2, axis=1)
    delta = np.abs(jittered - exact)
    assert np.all(delta <= 0.1 * side + 1e-4)
    assert delta.mean() > 0.01
    h, w = labels.shape
    assert np.all(jittered >= 0)
    assert np.all(jittered[:, [0, 2]] <= w - 1) and np.all(jittered[:, [1, 3]] <= h - 1)
    assert np.all(jittered[:, 2] >= jittered[:, 0]) and np.all(jittered[:, 3] >= jittered[:, 1])


def test_prompts_without_objects_cap_mix_and_mask_prompt(cpm15):
    empty = sample_prompts(np.zeros((50, 70), np.int32), np.random.default_rng(0), "mix", num_points=2)
    assert len(empty) == 0
    assert empty.boxes.shape == (0, 4) and empty.points.shape == (0, 4, 2)
    assert empty.point_labels.shape == (0, 4) and empty.masks.shape == (0, 50, 70)
    labels = cpm15[2].labels
    capped = sample_prompts(labels, np.random.default_rng(0), max_objects=5, mask_prompt=True)
    assert len(capped) == 5 and len(set(capped.object_ids.tolist())) == 5
    assert np.array_equal(capped.mask_inputs, capped.masks)
    modes = {(p.use_boxes, p.use_points) for p in
             (sample_prompts(labels, np.random.default_rng(s), "mix", max_objects=2) for s in range(12))}
    assert modes == {(True, False), (False, True), (True, True)}
    full = sample_prompts(np.ones((8, 8), np.int32), np.random.default_rng(0), "point")
    assert full.point_labels.tolist() == [[1, -1]]  # nowhere to put a negative point


def test_negative_points_avoid_ignored_pixels():
    labels = np.zeros((40, 40), np.int32)
    labels[15:25, 15:25] = 1
    ignore = np.ones((40, 40), bool)
    ignore[:, :5] = False
    p = sample_prompts(labels, np.random.default_rng(0), "point", num_points=20, ignore=ignore)
    negatives = p.points[0, 20:]
    assert np.all(negatives[:, 0] < 5)


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
