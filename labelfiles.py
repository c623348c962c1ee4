"""Label files of ``detect predict``: segment an image or stack file, write its labels, overlay and COCO entries."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tifffile
from tqdm import tqdm

import runfiles
from coco import CocoWriter
from figures import draw_instances
from images import read_planes, to_rgb
from inference import Segmenter

log = logging.getLogger(__name__)


def write_labels(path: Path, labels: np.ndarray) -> None:
    """Instance labels as a zlib TIFF (uint16 when they fit, else uint32), napari/tifffile-readable."""
    dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    axes = "ZYX" if labels.ndim == 3 else "YX"
    runfiles.atomic_write(path, lambda fh: tifffile.imwrite(fh, labels.astype(dtype), compression="zlib",
                                                            photometric="minisblack", metadata={"axes": axes}))


def output_paths(output_dir: Path, path: Path, with_overlay: bool) -> dict[str, Path]:
    """The files ``detect predict`` writes for the input ``path``."""
    paths = {"labels": output_dir / f"{path.stem}_labels.tif"}
    if with_overlay:
        paths["overlay"] = output_dir / f"{path.stem}_overlay.png"
    return paths


def segment_file(path: Path, name: str, segmenter: Segmenter, coco: CocoWriter,
                 outputs: dict[str, Path]) -> int:
    """Segment one image or stack, write its label TIFF and overlay; returns the object count."""
    planes, is_stack = read_planes(path)
    labels = np.zeros(planes.shape[:3], np.uint32)
    offset, empty, best = 0, 0, (-1, 0)
    for z in tqdm(range(len(planes)), desc=name, unit="slice", leave=False, disable=None if is_stack else True):
        image = to_rgb(planes[z], path)
        slice_labels, kept = segmenter(image)
        count = len(kept)
        labels[z] = np.where(slice_labels > 0, slice_labels.astype(np.uint32) + offset, 0)
        coco.add(name, slice_labels, kept, frame=z if is_stack else None, label_offset=offset)
        offset += count
        empty += count == 0
        best = max(best, (count, -z))
    if offset == 0:
        log.warning("no objects found in %s: wrote an empty label map (lower --conf, or check "
                    "--yolo_model / --model_path)", name)
    elif is_stack and empty:
        log.warning("no objects found in %d of %d slices of %s", empty, len(planes), name)
    write_labels(outputs["labels"], labels if is_stack else labels[0])
    if "overlay" in outputs:
        z = -best[1]
        runfiles.write_png(outputs["overlay"], draw_instances(to_rgb(planes[z]), labels[z], thickness=1, fill_alpha=0.45))
        if is_stack:
            log.info("%s: overlay of slice %d (the one with most objects)", name, z)
    log.info("%s: %d objects%s -> %s", name, offset, f" in {len(planes)} slices" if is_stack else "",
             outputs["labels"])
    return offset


