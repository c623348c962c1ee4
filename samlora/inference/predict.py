"""Segmenting a batch of input files (``detect predict``): images, stacks and volumes, written as labels and one coco.json."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import nn
from tqdm import tqdm

from samlora.core import runfiles
from samlora.data import volume_io
from samlora.data.coco import CocoWriter
from samlora.inference import propagation
from samlora.inference import sections as stacks
from samlora.inference.label_files import output_paths, segment_file, stack_output_paths
from samlora.inference.linking import LinkOptions
from samlora.inference.propagation import PropagationOptions
from samlora.inference.segmenter import Segmenter
from samlora.models import model_options

log = logging.getLogger(__name__)


@dataclass
class PredictOptions:
    """How the inputs are segmented and written (``detect predict``'s options of the same names).

    ``input``: the image, folder, stack or Zarr volume given (output names are relative to it);
    ``coco_segmentation``: ``rle`` or ``polygon``; ``overlays``: write the overlay PNGs;
    ``resume``: continue an interrupted volume from its last finished section; ``link``: how a
    volume's sections are linked into 3-D objects (None: per-section objects); ``propagation``:
    when an annotated object carried through a volume stops; ``precision``: autocast of SAM;
    ``description``: what coco.json's ``info`` says made it.
    """

    input: Path
    coco_segmentation: str = "rle"
    overlays: bool = True
    resume: bool = False
    precision: str = model_options.ModelOptions.precision
    link: LinkOptions | None = field(default_factory=LinkOptions)
    propagation: PropagationOptions = field(default_factory=PropagationOptions)
    description: str = "detect predict"


def predict_files(options: PredictOptions, files: list[tuple[Path, tuple[int, int, int] | None]],
                  seeds: dict[int, np.ndarray] | None, sam: nn.Module, segmenter: Segmenter | None,
                  record: dict[str, Any], out: runfiles.OutputDir, fill: Callable[..., Any] | None = None) -> int:
    """Segment every input and write its outputs and coco.json; returns the object count.

    ``files``: ``(path, volume shape (Z, Y, X) or None)`` per input (a volume is segmented section
    by section, its objects linked, or with ``seeds``, the annotated ``HxW`` label sections of the
    one volume by section index, those objects carried through it); ``record``: the run's options
    (``record["options"]["box_batch"]``: boxes per decoder call), which a resumed volume must match;
    ``fill``: segments a volume's sections elsewhere (a dask cluster), None in this process.
    """
    work = out.path / stacks.WORK_FOLDER
    if any(shape is not None for _, shape in files):
        work.mkdir(exist_ok=True)
        out.add(work)
    coco = CocoWriter(options.coco_segmentation, spool=work / "coco.jsonl" if work.is_dir() else None)
    given = options.input
    root = given if given.is_dir() and not volume_io.is_zarr(given) else given.parent
    total = 0
    maps = segmenter is not None and segmenter.options.write_maps
    for path, shape in tqdm(files, desc="images", unit="file", disable=None if len(files) > 1 else True):
        name = path.relative_to(root).as_posix()
        if seeds is not None:
            total += propagation.propagate_file(
                path, name, seeds, propagation.sam_prompter(sam, record["options"]["box_batch"], options.precision),
                options.propagation, sam.image_encoder.img_size, record, out, coco,
                stack_output_paths(out.path, path, options.overlays), segmenter)
        elif shape is not None:
            total += stacks.predict_volume(path, name, segmenter, record, out, options.resume, options.link, coco,
                                           stack_output_paths(out.path, path, options.overlays, maps), fill)
        else:
            total += segment_file(path, name, segmenter, coco, output_paths(out.path, path, options.overlays, maps))
    coco.write(out.path / "coco.json", options.description)
    out.discard(work)
    return total
