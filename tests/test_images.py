"""images.py through the loader: 16-bit scaling, label renumbering, and files it must refuse.

Expected values are computed here from the raw files, never taken from the module under test.
"""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from data_checks import assert_same_partition, assert_sample_types, n_instances
from dataset import load_dataset
from errors import UserError


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
