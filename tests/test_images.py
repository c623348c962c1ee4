"""images.py through the loader: 16-bit scaling, label renumbering, and files it must refuse.

Expected values are computed here from the raw files, never taken from the module under test.
"""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
from data_checks import assert_same_partition, assert_sample_types, n_instances

from samlora.core.errors import UserError
from samlora.data.dataset import load_dataset


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


# ---------------------------------------------------------------------------------------------
# bad input: each a UserError naming the file
# ---------------------------------------------------------------------------------------------
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


def _write_pair(root, name, image, mask):
    import cv2

    for sub, pixels in (("images", image), ("masks", mask)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / sub / f"{name}.png"), pixels)


def _components(binary) -> int:
    import cv2

    return cv2.connectedComponents(binary.astype(np.uint8), connectivity=8)[0] - 1


def test_mask_type_auto_reads_antialiased_and_resized_masks_as_binary(shared_data, tmp_path, caplog):
    """A real 0/255 mitochondria mask, blurred (antialiased edges) and resized with linear
    interpolation: both have hundreds of grey values, and both are still 13 objects (section 00 of tests/data)."""
    import logging

    import cv2

    image = cv2.imread(str(shared_data / "em_vnc" / "images" / "00.png"), cv2.IMREAD_GRAYSCALE)
    mask = cv2.imread(str(shared_data / "em_vnc" / "masks" / "00.png"), cv2.IMREAD_GRAYSCALE)
    assert set(np.unique(mask)) == {0, 255} and _components(mask > 0) == 13
    blurred = cv2.GaussianBlur(mask, (5, 5), 1.5)
    resized = cv2.resize(mask, (700, 700), interpolation=cv2.INTER_LINEAR)
    assert len(np.unique(blurred)) > 100 and len(np.unique(resized)) > 100  # many grey values
    _write_pair(tmp_path, "blurred", image, blurred)
    _write_pair(tmp_path, "resized", cv2.resize(image, (700, 700)), resized)
    with caplog.at_level(logging.INFO):
        samples = load_dataset(tmp_path, "folders")
    by_name = {s.source: s for s in samples}
    assert by_name["images/blurred.png"].num_objects == _components(blurred > 127) == 13
    assert by_name["images/resized.png"].num_objects == _components(resized > 127)
    assert all(s.mask_kind == "binary" for s in samples)
    assert "masks read as binary (2)" in caplog.text
    # read as instances, every grey value would be an object of its own
    as_instances = load_dataset(tmp_path, "folders", mask_type="instance")
    assert all(s.num_objects > 100 for s in as_instances)


def test_mask_type_auto_keeps_instance_labels_and_flags_close_calls(cpm15, caplog):
    from samlora.data.images import mask_kind

    assert {s.mask_kind for s in cpm15} == {"instance"}
    ramp = np.zeros((10, 10), np.uint16)
    ramp[:5] = 255
    ramp[5, :9] = 200  # 50 of 59 non-zero pixels at the top value
    assert mask_kind(ramp) == mask_kind(ramp, "auto") and mask_kind(ramp).kind == "binary"
    few = np.zeros((10, 10), np.uint16)
    few[:5] = 255
    few[5:9] = 100  # 50 of 90: a 0/255-like mask, but by a small margin
    kind = mask_kind(few)
    assert kind.kind == "binary" and kind.close
    ids = np.arange(100).reshape(10, 10) % 7  # seven ids, none dominating
    assert mask_kind(ids).kind == "instance" and not mask_kind(ids).close
    assert mask_kind(ids, "binary").kind == "binary"
    with pytest.raises(ValueError, match="mask_type"):
        mask_kind(ids, "semantic")
