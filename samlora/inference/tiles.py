"""Tiles of large images: overlapping windows, and objects that two tiles found merged back into one.

SAM sees a tile at its input size, so a 4096 px EM section is segmented as tiles of about the
model's input side; objects cut by a tile border are found by both neighbours and merged here.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from samlora.data.instances import Instance


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the fewest tiles of side ``tile`` that cover ``length`` with neighbours
    sharing at least ``overlap`` pixels (spread evenly)."""
    if tile <= 0 or length <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in 0..{tile - 1}, got {overlap}")
    count = -(-(length - overlap) // (tile - overlap))  # fewest tiles with at least that overlap
    return np.linspace(0, length - tile, count).round().astype(int).tolist()


def tile_windows(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(y0, x0, y1, x1) windows covering an HxW image; one window when it fits in ``tile``."""
    return [(y, x, min(y + tile, height) if tile > 0 else height, min(x + tile, width) if tile > 0 else width)
            for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap)]


def _mask_in(inst: Instance, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    """The instance's mask inside the window (y0, x0, y1, x1) of the image, window-sized."""
    out = np.zeros((y1 - y0, x1 - x0), bool)
    wx0, wy0, wx1, wy1 = inst.window
    ax0, ay0, ax1, ay1 = max(wx0, x0), max(wy0, y0), min(wx1, x1), min(wy1, y1)
    if ax1 > ax0 and ay1 > ay0:
        out[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0] = inst.mask[ay0 - wy0:ay1 - wy0, ax0 - wx0:ax1 - wx0]
    return out


def _same_object(a: Instance, b: Instance, shared: tuple[int, int, int, int], threshold: float) -> bool:
    """Whether two tiles' objects are one: their masks agree (IoU >= ``threshold``) inside the
    window both tiles saw."""
    ma, mb = _mask_in(a, *shared), _mask_in(b, *shared)
    union = np.count_nonzero(ma | mb)
    return union > 0 and np.count_nonzero(ma & mb) >= threshold * union


def _union(a: Instance, b: Instance) -> Instance:
    x0, y0 = min(a.window[0], b.window[0]), min(a.window[1], b.window[1])
    x1, y1 = max(a.window[2], b.window[2]), max(a.window[3], b.window[3])
    mask = np.zeros((y1 - y0, x1 - x0), bool)
    for part in (a, b):
        mask[part.window[1] - y0:part.window[3] - y0, part.window[0] - x0:part.window[2] - x0] |= part.mask
    return Instance((x0, y0, x1, y1), mask, max(a.score, b.score), max(a.confidence, b.confidence), a.label)


def merge_tiles(instances: Sequence[Instance], tiles: Sequence[int],
                windows: Sequence[tuple[int, int, int, int]], threshold: float = 0.5) -> list[Instance]:
    """Merge the objects that neighbouring tiles found twice.

    ``tiles[i]`` is the index into ``windows`` ((y0, x0, y1, x1)) of the tile instance i came
    from. Highest score first, an instance is united with an already kept object from another
    tile when, inside the window the two tiles share, their masks have IoU >= ``threshold``:
    both tiles saw those pixels, so the same object looks the same there, however much of it
    each tile cut off. Window overlaps are tested vectorised; masks only for touching windows.
    """
    order = sorted(range(len(instances)), key=lambda i: -instances[i].score)
    kept: list[Instance] = []
    kept_tiles: list[set[int]] = []
    kept_windows = np.zeros((0, 4), np.int64)
    for i in order:
        inst, tile = instances[i], tiles[i]
        window = np.array(inst.window)
        touching = np.flatnonzero((np.minimum(kept_windows[:, 2], window[2]) > np.maximum(kept_windows[:, 0], window[0]))
                                  & (np.minimum(kept_windows[:, 3], window[3]) > np.maximum(kept_windows[:, 1], window[1])))
        target = None
        for k in touching:
            if tile in kept_tiles[k]:
                continue
            for other in kept_tiles[k]:
                (ay0, ax0, ay1, ax1), (by0, bx0, by1, bx1) = windows[tile], windows[other]
                shared = (max(ay0, by0), max(ax0, bx0), min(ay1, by1), min(ax1, bx1))
                if shared[2] > shared[0] and shared[3] > shared[1] and \
                        _same_object(inst, kept[k], shared, threshold):
                    target = k
                    break
            if target is not None:
                break
        if target is None:
            kept.append(inst)
            kept_tiles.append({tile})
            kept_windows = np.vstack([kept_windows, window[None]])
        else:
            kept[target] = _union(kept[target], inst)
            kept_tiles[target].add(tile)
            kept_windows[target] = kept[target].window
    return kept
