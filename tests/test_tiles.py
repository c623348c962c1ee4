"""tiles.py: tile windows that cover an image with overlap, and merging objects cut by tiles."""
from __future__ import annotations

import numpy as np
import pytest

from samlora.data.instances import Instance, paint_instances
from samlora.inference.tiles import merge_tiles, tile_starts, tile_windows
from samlora.metrics.scores import instance_metrics


@pytest.mark.parametrize("length,tile,overlap", [(1024, 1024, 128), (1100, 1024, 128), (2000, 512, 64),
                                                 (640, 512, 64), (300, 256, 0), (100, 0, 0)])
def test_tiles_cover_with_overlap(length: int, tile: int, overlap: int) -> None:
    starts = tile_starts(length, tile, overlap)
    size = tile if 0 < tile < length else length
    covered = np.zeros(length, bool)
    for s in starts:
        assert 0 <= s and s + size <= length
        covered[s:s + size] = True
    assert covered.all()
    assert all(a + size - b >= overlap for a, b in zip(starts, starts[1:]))
    assert len(tile_windows(length, length, tile, overlap)) == len(starts) ** 2


def tile_crops(gt: np.ndarray, windows: list) -> tuple[list[Instance], list[int]]:
    """Each tile's view of the ground truth: every object it sees, cut at the tile edges."""
    instances, tiles = [], []
    for index, (y0, x0, y1, x1) in enumerate(windows):
        crop = gt[y0:y1, x0:x1]
        for value in np.unique(crop[crop > 0]):
            ys, xs = np.nonzero(crop == value)
            box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            instances.append(Instance(box, crop[box[1]:box[3], box[0]:box[2]] == value, 1.0, 1.0).shifted(y0, x0))
            tiles.append(index)
    return instances, tiles


def test_tile_merge_rebuilds_objects_cut_by_tiles(em_section_19) -> None:
    """Ground-truth objects cut into tiles, merged back: the label map equals the ground truth."""
    _, gt = em_section_19
    windows = tile_windows(*gt.shape, 192, 32)  # 3x3 tiles over the 512 px section
    assert len(windows) == 9
    instances, tiles = tile_crops(gt, windows)
    assert len(instances) > gt.max()  # some objects were cut
    merged = merge_tiles(instances, tiles, windows, 0.5)
    labels, _ = paint_instances(merged, gt.shape)
    scores = instance_metrics(gt, labels)
    assert scores["f1"] == 1.0 and scores["aji"] == pytest.approx(1.0)


def test_tile_merge_joins_long_objects_and_keeps_neighbours_apart() -> None:
    """A bar much longer than the tile overlap is one object; two touching objects stay two."""
    gt = np.zeros((100, 300), np.int32)
    gt[40:60, 10:290] = 1  # crosses two tile seams, 4x the overlap on each side
    gt[70:90, 100:140] = 2
    gt[70:90, 140:180] = 3  # 2 and 3 touch at column 140; both lie in tile overlaps
    windows = tile_windows(*gt.shape, 128, 32)
    instances, tiles = tile_crops(gt, windows)
    labels, kept = paint_instances(merge_tiles(instances, tiles, windows, 0.5), gt.shape)
    assert len(kept) == 3
    assert instance_metrics(gt, labels)["aji"] == pytest.approx(1.0)
