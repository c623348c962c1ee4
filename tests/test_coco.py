"""coco.py: RLE against pycocotools vectors and round trips, polygons, and COCO files built from real
nuclei labels."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from data_checks import assert_same_partition, assert_sample_types, n_instances, read_rgb

from samlora.core.errors import UserError
from samlora.data.coco import polygons, rle_decode, rle_encode
from samlora.data.dataset import load_dataset
from samlora.data.folds import make_holdout, split_test


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


def test_rle_round_trip_through_the_dataset_reader(em_section_19):
    _, gt = em_section_19
    rng = np.random.default_rng(0)
    cases = [(gt == v) for v in range(1, gt.max() + 1)]
    cases += [np.ones((7, 5), bool), rng.random((9, 11)) > 0.5]
    corner = np.zeros((6, 4), bool)
    corner[0, 0] = corner[-1, -1] = True
    cases.append(corner)
    for mask in cases:
        ys, xs = np.nonzero(mask)
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        rle = rle_encode(mask[box[1]:box[3], box[0]:box[2]], box, mask.shape)
        assert rle["size"] == list(mask.shape) and isinstance(rle["counts"], str)
        np.testing.assert_array_equal(rle_decode(rle), mask)


def test_polygons_outline_the_mask(em_section_19):
    _, gt = em_section_19
    value = np.bincount(gt.ravel())[1:].argmax() + 1  # the largest object
    ys, xs = np.nonzero(gt == value)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    polys = polygons(gt[box[1]:box[3], box[0]:box[2]] == value, box)
    filled = np.zeros(gt.shape, np.uint8)
    for poly in polys:
        cv2.fillPoly(filled, [np.round(np.array(poly).reshape(-1, 2)).astype(np.int32)], 1)
    inter, union = (filled & (gt == value)).sum(), (filled | (gt == value)).sum()
    assert inter / union > 0.95
