"""Annotated objects carried through a volume: each section's mask prompts the next section (micro-sam's
``segment_mask_in_volume``).

From every annotated section an object is followed up (z + 1, z + 2, ...) and down: the mask it
has in one section gives the box and the low-resolution mask prompt for the next; it stops when
SAM's predicted IoU falls below ``stop_score`` or the new mask's IoU with the previous one below
``stop_iou`` (:class:`PropagationOptions`), or at a section where it is annotated again (the
annotation continues it). Between two annotations of one object each section keeps the mask
carried from the nearer one. The model is a :data:`Prompter` (one section's image and prompts ->
objects), :func:`sam_prompter` for SAM; the results fill a stacks.SectionStore section by section.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from torch import nn
from tqdm import tqdm

from samlora.core import runfiles
from samlora.core.errors import UserError
from samlora.data.coco import CocoWriter
from samlora.data.images import file_stem
from samlora.data.instances import Instance, instance_from_mask, paint_instances
from samlora.data.prompts import Prompts
from samlora.data.volume_io import Volume, open_volume
from samlora.inference import segmenter
from samlora.inference.sections import WORK_FOLDER, SectionResult, SectionStore, segment_volume
from samlora.models import sam as sam_model

log = logging.getLogger(__name__)

SEED_SCORE = 2.0  # annotated masks win every overlap (predicted IoUs are at most 1)

# One section's image (HxWx3 uint8) and N prompts (boxes + low-res masks, object ids) -> the objects
# found, each an Instance whose label is its prompt's object id and whose score is SAM's predicted IoU.
Prompter = Callable[[np.ndarray, Prompts], list[Instance]]


@dataclass(frozen=True)
class PropagationOptions:
    """When a carried object stops (``--stop_score``, ``--stop_iou``)."""

    stop_score: float = 0.5
    stop_iou: float = 0.25

    def __post_init__(self) -> None:
        for flag, value in (("--stop_score", self.stop_score), ("--stop_iou", self.stop_iou)):
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{flag} must be in 0..1, got {value}")


def sam_prompter(sam: nn.Module, chunk: int = 1, precision: str = "fp32") -> Prompter:
    """SAM as a :data:`Prompter`: one encoder pass per section, the prompts decoded in chunks
    (segmenter.decode_instances), each mask painted with its prompt's id."""
    def prompt(image: np.ndarray, prompts: Prompts) -> list[Instance]:
        with sam_model.autocast(segmenter.sam_device(sam), precision):
            embedding = segmenter.encode_image(sam, image)
            return segmenter.decode_instances(sam, embedding, prompts, image.shape[:2], chunk, keep_ids=True)
    return prompt


def full_mask(instance: Instance, shape: tuple[int, int]) -> np.ndarray:
    """The ``HxW`` bool mask of an instance."""
    x0, y0, x1, y1 = instance.window
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = instance.mask
    return mask


def mask_iou(a: Instance, b: Instance) -> float:
    """IoU of two instances' masks (on the window both cover)."""
    x0, y0 = min(a.window[0], b.window[0]), min(a.window[1], b.window[1])
    x1, y1 = max(a.window[2], b.window[2]), max(a.window[3], b.window[3])
    ma, mb = (full_mask(i.shifted(-y0, -x0), (y1 - y0, x1 - x0)) for i in (a, b))
    union = np.count_nonzero(ma | mb)
    return np.count_nonzero(ma & mb) / union if union else 0.0


def carry_prompts(objects: dict[int, Instance], shape: tuple[int, int], image_size: int) -> Prompts:
    """Prompts for the next section from the objects' masks in this one: each mask's box
    (inclusive corners) and the mask itself as low-resolution logits (segmenter.mask_prompt)."""
    ids = np.array(sorted(objects), np.int32)
    boxes = np.array([[o.window[0], o.window[1], o.window[2] - 1, o.window[3] - 1]
                      for o in (objects[i] for i in ids)], np.float32).reshape(-1, 4)
    masks = np.stack([segmenter.mask_prompt(full_mask(objects[i], shape), image_size) for i in ids]) if len(ids) \
        else None
    return Prompts(ids, boxes, np.zeros((len(ids), 0, 2), np.float32), np.zeros((len(ids), 0), np.int32),
                   mask_inputs=masks)


def seed_instances(labels: np.ndarray) -> dict[int, Instance]:
    """``{id: Instance}`` of the annotated objects of one section (score :data:`SEED_SCORE`)."""
    found = {}
    for value in np.unique(labels[labels > 0]).tolist():
        found[int(value)] = instance_from_mask(labels == value, SEED_SCORE, SEED_SCORE, int(value))
    return found  # type: ignore[return-value]


def sweep(volume: Volume, seeds: dict[int, dict[int, Instance]], prompter: Prompter, options: PropagationOptions,
          order: Sequence[int], image_size: int) -> Iterator[tuple[int, dict[int, tuple[Instance, int]]]]:
    """Carry the objects through ``order`` (sections up or down): yields each section's
    ``{id: (instance, sections from its seed)}``, annotated objects at distance 0."""
    active: dict[int, tuple[Instance, int]] = {}
    ahead = set(seeds)
    for z in order:
        here = seeds.get(z, {})
        ahead.discard(z)
        found = {i: (inst, 0) for i, inst in here.items()}
        carried = {i: inst for i, (inst, _) in active.items() if i not in here}
        if carried:
            image = volume.section(z)
            for inst in prompter(image, carry_prompts(carried, image.shape[:2], image_size)):
                previous, distance = active[inst.label]
                if inst.score >= options.stop_score and mask_iou(inst, previous) >= options.stop_iou:
                    found[inst.label] = (inst, distance + 1)
        active = found
        yield z, found
        if not active and not ahead:
            return


def merged(shape: tuple[int, int], candidates: Sequence[dict[int, tuple[Instance, int]]]) -> SectionResult:
    """One section's result from the objects found by the sweeps: each object from the sweep
    that reached it from the nearer seed (ties: the first sweep), overlaps to the higher score."""
    chosen: dict[int, tuple[Instance, int]] = {}
    for found in candidates:
        for i, (inst, distance) in found.items():
            if i not in chosen or distance < chosen[i][1]:
                chosen[i] = (inst, distance)
    labels, kept = paint_instances([inst for inst, _ in chosen.values()], shape)
    values = np.array([k.label for k in kept], np.int64)
    return SectionResult(labels.astype(np.int32), np.array([k.score for k in kept], np.float32),
                         np.array([k.confidence for k in kept], np.float32), values,
                         np.array([chosen[int(v)][1] for v in values], np.int32))


def stored_objects(result: SectionResult) -> dict[int, tuple[Instance, int]]:
    """The objects of a stored section result, as :func:`sweep` gives them."""
    out = {}
    for value, score, distance in zip(result.values.tolist(), result.scores.tolist(), result.distances.tolist()):
        out[value] = (instance_from_mask(result.labels == value, score, score, value), distance)
    return out


def propagate(volume: Volume, seeds: dict[int, np.ndarray], prompter: Prompter, options: PropagationOptions,
              store: SectionStore, image_size: int) -> None:
    """Fill ``store`` with every section of ``volume``: the annotated objects (``{z: HxW ids}``)
    carried up, then down (merged with the up sweep's result where both reached a section)."""
    depth, height, width = volume.shape
    seeded = {z: seed_instances(labels) for z, labels in seeds.items()}
    log.info("%d objects annotated in %d sections: carrying them through %d sections",
             len({i for found in seeded.values() for i in found}), len(seeded), depth)
    up = range(min(seeded), depth)
    for z, found in tqdm(sweep(volume, seeded, prompter, options, up, image_size), desc="up", total=len(up),
                         unit="section", leave=False, disable=None):
        store.save(z, merged((height, width), [found]))
    down = range(max(seeded), -1, -1)
    for z, found in tqdm(sweep(volume, seeded, prompter, options, down, image_size), desc="down", total=len(down),
                         unit="section", leave=False, disable=None):
        first = stored_objects(store.load(z)) if z in store.done else {}
        store.save(z, merged((height, width), [first, found]))
    empty = SectionResult(np.zeros((height, width), np.int32), *(np.zeros(0, t) for t in (np.float32, np.float32,
                                                                                          np.int64, np.int32)))
    for z in range(depth):
        if z not in store.done:
            store.save(z, empty)


def add_detected(volume: Volume, seeds: dict[int, np.ndarray],
                 segment: Callable[[np.ndarray], tuple[np.ndarray, Sequence[Instance]]]) -> dict[int, np.ndarray]:
    """The seeds plus, in each annotated section, the objects ``segment`` (the detector's boxes
    through SAM) finds there that are mostly (more than half their pixels) not annotated, with
    new ids after the annotated ones."""
    next_id = max(int(labels.max()) for labels in seeds.values()) + 1
    out = {}
    for z, labels in sorted(seeds.items()):
        found, _ = segment(volume.section(z))
        labels = labels.copy()
        for value in np.unique(found[found > 0]).tolist():
            mask = found == value
            if 2 * np.count_nonzero(labels[mask]) < np.count_nonzero(mask):
                labels[mask & (labels == 0)] = next_id
                next_id += 1
        log.info("section %d: %d annotated objects, %d more found by the detector", z, len(np.unique(seeds[z])) - 1,
                 len(np.unique(labels)) - len(np.unique(seeds[z])))
        out[z] = labels
    return out


def propagate_file(path: Path, name: str, seeds: dict[int, np.ndarray], prompter: Prompter,
                   options: PropagationOptions, image_size: int, record: dict, out: runfiles.OutputDir,
                   coco: CocoWriter, outputs: dict[str, Path],
                   segment: Callable[[np.ndarray], tuple[np.ndarray, Sequence[Instance]]] | None = None) -> int:
    """``detect predict --seed_labels`` on one volume: the annotated objects (plus, with ``segment``,
    the detector's in the annotated sections: :func:`add_detected`) carried through it, then
    written as stacks.py writes volumes, with the annotated ids; returns the object count."""
    with open_volume(path) as volume:
        store = SectionStore(out.path / WORK_FOLDER / f"{file_stem(path)}.propagated", {"input": str(path), **record})
        store.open(False, out)
        if segment is not None:
            seeds = add_detected(volume, seeds, segment)
        propagate(volume, seeds, prompter, options, store, image_size)

        def missing(z: int) -> SectionResult:
            raise RuntimeError(f"section {z} was not propagated")
        return segment_volume(volume, name, missing, store, "as given", coco, outputs)
