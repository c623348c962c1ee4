"""The sample record: one 2-D image, slice or patch with its instance labels."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(eq=False)
class Sample:
    """One 2-D training / evaluation example: a whole image, a volume slice or a patch of either.

    Attributes:
        image: ``HxWx3`` uint8 RGB.
        labels: ``HxW`` int32 instance labels, 0 background, objects numbered 1..N.
        group: fold group; patches keep their source's group, volume slices share one per block.
        tag: tissue / organ / volume name, for per-tag summaries and metrics.
        path: the image (or volume) file the pixels came from.
        source: ``path`` relative to the data directory (stable across machines; used in keys).
        label_path: the label file, None for COCO.
        slice_index: index of the slice in its volume (None for 2-D images).
        volume: volume id (relative path) for slices, None for 2-D images.
        offset: ``(y, x)`` of the patch's top-left corner in its source image.
        source_shape: ``(H, W)`` of the whole source image or slice.
        split: "train" / "val" / "test" when the data has a fixed split, else None.
        ignore: ``HxW`` bool of ambiguous pixels (NuInsSeg vague areas, COCO crowd) or None.
        mask_kind: how the label file was read: "binary" (components), "instance", or None
            (COCO polygons); ``mask_close``: ``--mask_type auto`` decided by a small margin.
    """

    image: np.ndarray
    labels: np.ndarray
    group: str
    tag: str
    path: Path
    source: str
    label_path: Path | None = None
    slice_index: int | None = None
    volume: str | None = None
    offset: tuple[int, int] = (0, 0)
    source_shape: tuple[int, int] | None = None
    split: str | None = None
    ignore: np.ndarray | None = None
    mask_kind: str | None = None
    mask_close: bool = False

    def __post_init__(self) -> None:
        if self.source_shape is None:
            self.source_shape = tuple(self.image.shape[:2])  # type: ignore[assignment]

    def __repr__(self) -> str:
        h, w = self.image.shape[:2]
        return (f"Sample({self.key!r}, {w}x{h}, {self.num_objects} objects, group={self.group!r}, "
                f"tag={self.tag!r}, split={self.split!r})")

    @property
    def num_objects(self) -> int:
        """Number of instances (labels are consecutive 1..N)."""
        return int(self.labels.max()) if self.labels.size else 0

    @property
    def is_patch(self) -> bool:
        return tuple(self.image.shape[:2]) != tuple(self.source_shape) or self.offset != (0, 0)

    @property
    def key(self) -> str:
        """Unique, machine-independent id: ``source[slice]@y,x:HxW``."""
        key = self.source
        if self.slice_index is not None:
            key += f"[{self.slice_index}]"
        if self.is_patch:
            h, w = self.image.shape[:2]
            key += f"@{self.offset[0]},{self.offset[1]}:{h}x{w}"
        return key
