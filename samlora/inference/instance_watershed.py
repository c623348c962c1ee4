"""AIS post-processing: the decoder's three maps -> instance labels by a seeded watershed.

micro-sam's ``InstanceSegmentationWithDecoder.generate`` with torch_em's
``watershed_from_center_and_boundary_distances``:

1. the foreground map is smoothed (Gaussian, sigma ``foreground_smoothing``), the two distance
   maps too (sigma ``distance_smoothing``); kernels reach ``ceil(3 sigma)`` pixels and mirror at the
   image edge, as vigra's / bioimage_cpp's;
2. foreground = smoothed foreground > ``foreground_threshold``;
3. seeds = 8-connected components of (centre distance < ``center_distance_threshold``) and
   (boundary distance < ``boundary_distance_threshold``) on the foreground;
4. a seeded watershed of the boundary-distance map (4-connected flooding, heights quantised to
   65,536 levels as bioimage_cpp's), confined to the foreground; foreground pieces without a seed
   stay background;
5. objects under ``min_size`` pixels are removed and the rest renumbered 1..n.

The flooding is skimage's ``watershed`` (scipy's ``watershed_ift`` does not keep objects from
growing through the high background); the rest is scipy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_EIGHT = np.ones((3, 3), dtype=bool)
_LEVELS = 65535  # heights are quantised to uint16
TRUNCATE = 3.0  # Gaussian kernels reach ceil(3 sigma) pixels (vigra's default window)


@dataclass(frozen=True)
class WatershedOptions:
    """The thresholds of the seeded watershed; defaults are micro-sam's (``generate``'s)."""

    center_distance_threshold: float = 0.5
    boundary_distance_threshold: float = 0.5
    foreground_threshold: float = 0.5
    foreground_smoothing: float = 1.0
    distance_smoothing: float = 1.6
    min_size: int = 0

    def __post_init__(self) -> None:
        for name in ("center_distance_threshold", "boundary_distance_threshold", "foreground_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("foreground_smoothing", "distance_smoothing"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0 (0: no smoothing), got {getattr(self, name)}")
        if self.min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {self.min_size}")


def smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    """HxW float32 Gaussian smoothing (radius ``ceil(3 sigma)``, mirrored edges); sigma 0: a copy."""
    image = np.asarray(image, dtype=np.float32)
    if sigma <= 0:
        return image.copy()
    return ndimage.gaussian_filter(image, sigma, mode="mirror", radius=math.ceil(TRUNCATE * sigma))


def seeded_watershed(heights: np.ndarray, seeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Flood HxW ``heights`` from the labelled ``seeds`` (int, 0 = none) inside ``mask`` (bool).

    skimage's priority flooding with 4-connected steps (as bioimage_cpp's), on heights quantised
    to 65,536 levels over the foreground's range (as bioimage_cpp's). Returns HxW int32 labels
    (the seeds' values); pixels outside the mask, and foreground pieces that hold no seed, are 0.
    """
    from skimage.segmentation import watershed

    seeds = np.where(mask, seeds, 0).astype(np.int32)
    if not seeds.any():
        return np.zeros(heights.shape, dtype=np.int32)
    inside = heights[mask]
    low, high = float(inside.min()), float(inside.max())
    scale = _LEVELS / (high - low) if high > low else 0.0
    levels = np.zeros(heights.shape, dtype=np.uint16)
    levels[mask] = np.round((inside - low) * scale).astype(np.uint16)
    return watershed(levels, seeds, connectivity=1, mask=mask).astype(np.int32)


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """HxW labels without the objects of fewer than ``min_size`` pixels, renumbered 1..n in
    the order of their values (int32)."""
    flat = labels.ravel()
    values, inverse, sizes = np.unique(flat, return_inverse=True, return_counts=True)
    keep = (values > 0) & (sizes >= min_size)
    lut = np.zeros(len(values), dtype=np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1)
    return lut[inverse].reshape(labels.shape)


def maps_to_instances(maps: np.ndarray, options: WatershedOptions = WatershedOptions()) -> np.ndarray:
    """3xHxW maps (foreground, centre distance, boundary distance; instance_decoder.MAP_NAMES) ->
    HxW int32 instance labels, 0 background, objects 1..n (module docstring)."""
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[0] != 3:
        raise ValueError(f"expected 3xHxW maps (foreground, centre, boundary distance), got shape {maps.shape}")
    foreground = smooth(maps[0], options.foreground_smoothing) > options.foreground_threshold
    center = smooth(maps[1], options.distance_smoothing)
    boundary = smooth(maps[2], options.distance_smoothing)
    markers = (center < options.center_distance_threshold) & (boundary < options.boundary_distance_threshold)
    seeds, _ = ndimage.label(markers & foreground, structure=_EIGHT)
    labels = seeded_watershed(boundary, seeds, foreground)
    return remove_small(labels, options.min_size)
