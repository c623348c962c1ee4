"""Checks for the data tests, independent of the modules under test.

Expected values come from the raw files (np.unique on label TIFFs, cv2.connectedComponents on
binary PNGs), never from images.py, readers.py or dataset.py.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from samlora.data.sample import Sample


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
