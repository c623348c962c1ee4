"""Label files of ``detect predict``: segment an image file, write its labels, overlay, maps and COCO
entries; label and map stacks streamed section by section to a BigTIFF or a Zarr array.

The instance decoder's maps (``--write_maps``, modes ais / apg) are float32 TIFFs, channels first
(instance_decoder.MAP_NAMES: foreground, centre distance, boundary distance), the input's size:
``<stem>_maps.tif`` of shape 3xHxW (axes CYX) for an image, Zx3xHxW (axes ZCYX, a BigTIFF written
section by section) for a stack or Zarr volume.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tifffile

from samlora.core import runfiles
from samlora.core.figures import draw_instances
from samlora.data.coco import CocoWriter
from samlora.data.images import file_stem, read_image_file, to_rgb
from samlora.data.volume_io import is_zarr
from samlora.inference.segmenter import EMPTY_HINT, Segmenter

log = logging.getLogger(__name__)


def write_labels(path: Path, labels: np.ndarray) -> None:
    """Instance labels as a zlib TIFF (uint16 when they fit, else uint32), napari/tifffile-readable."""
    dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    axes = "ZYX" if labels.ndim == 3 else "YX"
    runfiles.atomic_write(path, lambda fh: tifffile.imwrite(fh, labels.astype(dtype), compression="zlib",
                                                            photometric="minisblack", metadata={"axes": axes}))


def write_maps(path: Path, maps: np.ndarray) -> None:
    """The decoder's 3xHxW maps as a float32 zlib TIFF, channels first (axes CYX)."""
    runfiles.atomic_write(path, lambda fh: tifffile.imwrite(
        fh, np.asarray(maps, np.float32), compression="zlib", photometric="minisblack", metadata={"axes": "CYX"}))


def output_paths(output_dir: Path, path: Path, with_overlay: bool, with_maps: bool = False) -> dict[str, Path]:
    """The files ``detect predict`` writes for the input ``path``."""
    paths = {"labels": output_dir / f"{path.stem}_labels.tif"}
    if with_overlay:
        paths["overlay"] = output_dir / f"{path.stem}_overlay.png"
    if with_maps:
        paths["maps"] = output_dir / f"{path.stem}_maps.tif"
    return paths


def segment_file(path: Path, name: str, segmenter: Segmenter, coco: CocoWriter,
                 outputs: dict[str, Path]) -> int:
    """Segment one 2-D image file, write its label TIFF and overlay; returns the object count
    (volumes: stacks.py)."""
    image = to_rgb(read_image_file(path), path)
    labels, kept, maps = segmenter.segment(image)
    coco.add(name, labels, kept)
    if not kept:
        log.warning("no objects found in %s: wrote an empty label map (%s)", name, EMPTY_HINT)
    write_labels(outputs["labels"], labels)
    if "maps" in outputs and maps is not None:
        write_maps(outputs["maps"], maps)
    if "overlay" in outputs:
        runfiles.write_png(outputs["overlay"], draw_instances(image, labels, thickness=1, fill_alpha=0.45))
    log.info("%s: %d objects -> %s", name, len(kept), outputs["labels"])
    return len(kept)


def stack_output_paths(output_dir: Path, path: Path, with_overlay: bool, with_maps: bool = False) -> dict[str, Path]:
    """The files ``detect predict`` writes for the volume ``path``: ``<stem>_labels.tif`` for a
    TIFF stack, ``<stem>_labels.zarr`` for a Zarr volume, the overlay PNG and the maps
    (``<stem>_maps.tif``, Zx3xHxW, for either)."""
    stem = file_stem(path)
    paths = {"labels": output_dir / f"{stem}_labels.{'zarr' if is_zarr(path) else 'tif'}"}
    if with_overlay:
        paths["overlay"] = output_dir / f"{stem}_overlay.png"
    if with_maps:
        paths["maps"] = output_dir / f"{stem}_maps.tif"
    return paths


def write_map_stack(path: Path, shape: tuple[int, int, int], sections: Iterable[np.ndarray]) -> None:
    """Stream the 3xHxW float32 maps of ``shape`` = (Z, H, W) sections, one after the other, to a
    zlib BigTIFF of shape Zx3xHxW (axes ZCYX), atomically: memory of one section."""
    full = (shape[0], 3, *shape[1:])

    def checked() -> Iterator[np.ndarray]:
        count = 0
        for maps in sections:
            if maps.shape != full[1:]:
                raise ValueError(f"maps of section {count} are {maps.shape}, not {full[1:]}")
            count += 1
            yield from np.ascontiguousarray(maps, np.float32)  # a TIFF page per map
        if count != shape[0]:
            raise ValueError(f"{count} sections of maps given for a stack of {shape[0]}")

    def write(fh) -> None:
        with tifffile.TiffWriter(fh, bigtiff=True) as tiff:
            tiff.write(checked(), shape=full, dtype=np.float32, compression="zlib", photometric="minisblack",
                       rowsperstrip=shape[1], metadata={"axes": "ZCYX"})

    runfiles.atomic_write(path, write)


def write_label_stack(path: Path, shape: tuple[int, int, int], sections: Iterable[np.ndarray],
                      chunks: tuple[int, int, int] | None = None, zarr_format: int = 3) -> None:
    """Stream ``shape`` = (Z, H, W) uint32 labels, one ``HxW`` section after the other as
    ``sections`` produces them, to a zlib BigTIFF (``.tif``) or a Zarr array of ``chunks``
    (``.zarr``), atomically (runfiles.atomic_path): memory of one section (a Zarr: one slab of
    chunks), whatever the depth."""
    sections = _checked(sections, shape)
    if path.suffix == ".zarr":
        _write_zarr(path, shape, sections, chunks or (1, *shape[1:]), zarr_format)
        return

    def write(fh) -> None:
        with tifffile.TiffWriter(fh, bigtiff=True) as tiff:
            tiff.write(sections, shape=shape, dtype=np.uint32, compression="zlib", photometric="minisblack",
                       rowsperstrip=shape[1], metadata={"axes": "ZYX"})

    runfiles.atomic_write(path, write)


def _checked(sections: Iterable[np.ndarray], shape: tuple[int, int, int]) -> Iterator[np.ndarray]:
    count = 0
    for section in sections:
        if section.shape != shape[1:]:
            raise ValueError(f"section {count} is {section.shape}, not {shape[1:]}")
        count += 1
        yield np.ascontiguousarray(section, np.uint32)
    if count != shape[0]:
        raise ValueError(f"{count} sections given for a stack of {shape[0]}")


def _write_zarr(path: Path, shape: tuple[int, int, int], sections: Iterator[np.ndarray],
                chunks: tuple[int, int, int], zarr_format: int) -> None:
    import zarr

    with runfiles.atomic_path(path, folder=True) as tmp:
        array = zarr.create_array(store=str(tmp), shape=shape, chunks=chunks, dtype="uint32", fill_value=0,
                                  zarr_format=zarr_format, attributes={"axes": "ZYX", "content": "instance labels"})
        slab: list[np.ndarray] = []
        start = 0
        for section in sections:  # whole z-layers of chunks: each chunk is written once
            slab.append(section)
            if len(slab) == chunks[0] or start + len(slab) == shape[0]:
                array[start:start + len(slab)] = np.stack(slab)
                start, slab = start + len(slab), []
