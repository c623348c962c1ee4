"""Segmenting a volume section by section: finished sections kept for a resume, 3-D linking, streamed outputs.

``detect predict`` on a TIFF stack or a Zarr volume runs :func:`segment_volume`: each section is
read alone (volume_io.py), segmented (a :class:`SectionSource`: the Segmenter of inference.py, or
prompts carried through the stack, propagation.py), kept in the run's :class:`SectionStore` (one
small file per finished section, so an interrupted run resumes from the last finished one and
dask workers can fill it in any order, cluster.py), linked in section order into 3-D objects
(volumes.py) and written as it comes (labelfiles.py). Memory: a few sections, whatever the depth.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from tqdm import tqdm

from samlora.core import runfiles
from samlora.core.errors import UserError
from samlora.core.figures import draw_instances
from samlora.data.coco import CocoWriter
from samlora.data.images import file_stem
from samlora.data.instances import Instance
from samlora.data.volume_io import Volume
from samlora.inference.label_files import write_label_stack, write_map_stack
from samlora.inference.linking import Linked, LinkOptions, iter_linked
from samlora.inference.segmenter import EMPTY_HINT

log = logging.getLogger(__name__)

STORE_VERSION = 1


class Scored(NamedTuple):
    """The scores COCO keeps of an object: predicted IoU and detector confidence."""

    score: float
    confidence: float


@dataclass
class SectionResult:
    """One segmented section: ``labels`` HxW int32 and its K objects: their label ``values`` (K,)
    (1..K when None), ``scores`` (K,) predicted IoU, ``confidences`` (K,), and for propagated
    objects the ``distances`` (K,) in sections from their seed; with ``--write_maps`` the
    instance decoder's ``maps`` 3xHxW float32."""

    labels: np.ndarray
    scores: np.ndarray
    confidences: np.ndarray
    values: np.ndarray | None = None
    distances: np.ndarray | None = None
    maps: np.ndarray | None = None

    @classmethod
    def of(cls, labels: np.ndarray, kept: Sequence[Instance | Scored],
           maps: np.ndarray | None = None) -> "SectionResult":
        """From a Segmenter's output: labels 1..K, the K kept instances in label order, the maps."""
        return cls(np.asarray(labels, np.int32), np.array([k.score for k in kept], np.float32).reshape(-1),
                   np.array([k.confidence for k in kept], np.float32).reshape(-1),
                   maps=None if maps is None else np.asarray(maps, np.float32))

    @property
    def instances(self) -> list[Scored]:
        """The objects' scores indexed by label value - 1 (what CocoWriter.add takes)."""
        if self.values is None:
            return [Scored(float(s), float(c)) for s, c in zip(self.scores, self.confidences)]
        out = [Scored(0.0, 0.0)] * int(self.values.max(initial=0))
        for value, score, confidence in zip(self.values.tolist(), self.scores.tolist(), self.confidences.tolist()):
            out[value - 1] = Scored(score, confidence)
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """The fields to save (those that are set)."""
        return {k: v for k, v in vars(self).items() if v is not None}


# A section source: section index -> its result (the whole segmentation of one section).
SectionSource = Callable[[int], SectionResult]
# A Segmenter of inference.py: one HxWx3 uint8 image -> labels 1..K and the K kept instances.
Segment = Callable[[np.ndarray], tuple[np.ndarray, Sequence[Instance]]]


_ONEDNN_LOCK = threading.Lock()
_onednn = {"active": 0, "before": True}  # sections being computed now; the flag before the first


@contextlib.contextmanager
def thread_count_invariant(precision: str = "fp32") -> Iterator[None]:
    """Run torch in fp32 without oneDNN (mkldnn): its CPU convolutions sum in an order that depends
    on the thread count, so a dask worker (1 thread) and this process (all cores) would find masks
    that differ near the threshold. The fallback (im2col + BLAS) gives the same bits on 1 and 2
    threads (tests/test_stacks.py) and costs little in fp32 (README, Volumes); in bf16 it is ~50x
    slower, so bf16 keeps oneDNN (and its thread-dependent bits). No effect on CUDA.

    The flag is global to the process: sections computed at once in threads (a dask worker with
    several threads) share one switch, and the last of them to finish restores the flag."""
    if precision != "fp32":
        yield
        return
    with _ONEDNN_LOCK:
        if not _onednn["active"]:
            _onednn["before"] = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = False
        _onednn["active"] += 1
    try:
        yield
    finally:
        with _ONEDNN_LOCK:
            _onednn["active"] -= 1
            if not _onednn["active"]:
                torch.backends.mkldnn.enabled = _onednn["before"]


def section_result(segment: Segment, volume: Volume, z: int) -> SectionResult:
    """Section ``z`` of ``volume`` segmented by ``segment`` (a Segmenter: its ``options.precision``
    is used): the one way a section is computed, in this process and on dask workers alike
    (:func:`thread_count_invariant`)."""
    options = getattr(segment, "options", None)
    with thread_count_invariant(getattr(options, "precision", "fp32")):
        if getattr(options, "write_maps", False):  # a Segmenter asked for the decoder's maps
            return SectionResult.of(*segment.segment(volume.section(z)))
        return SectionResult.of(*segment(volume.section(z)))


class SectionStore:
    """The finished sections of one volume's run: ``NNNNNN.npz`` files in a hidden folder of the
    output directory, with ``store.json`` recording what produced them (the input and every option
    that changes a section). A rerun with ``--resume`` and the same record skips those sections."""

    def __init__(self, folder: Path, record: dict[str, Any]) -> None:
        self.folder, self.record = folder, {"version": STORE_VERSION, **record}
        self.done: set[int] = set()

    def matches(self) -> bool | None:
        """Whether an earlier store in the folder was made with the same record (None: there is none)."""
        record_path = self.folder / "store.json"
        if not record_path.is_file():
            return None
        recorded = runfiles.read_json(record_path, "a store of finished sections")
        return recorded == json.loads(json.dumps(self.record))

    def resumable(self, output_dir: Path) -> bool:
        """Whether an earlier store in the folder can be continued (False: there is none); raises
        :class:`UserError` when it was made with other options (``output_dir``: the run's, for the message)."""
        same = self.matches()
        if same is False:
            raise UserError(f"the interrupted run in {output_dir} segmented {self.record['input']} with other options; "
                            "rerun it with the same options, or pass --overwrite to start again")
        return bool(same)

    def open(self, resume: bool, out: runfiles.OutputDir) -> int:
        """Start (or, with ``resume``, continue) the store; returns the sections already done."""
        record_path = self.folder / "store.json"
        if resume and self.resumable(out.path):
            self.done = {int(p.stem) for p in self.folder.glob("[0-9]*.npz")}
        elif self.folder.exists():
            out.discard(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        out.add(self.folder)
        runfiles.write_json(record_path, self.record)
        return len(self.done)

    def path(self, z: int) -> Path:
        return self.folder / f"{z:06d}.npz"

    def save(self, z: int, result: SectionResult) -> None:
        runfiles.atomic_write(self.path(z), lambda fh: np.savez_compressed(fh, **result.arrays()))
        self.done.add(z)

    def load(self, z: int) -> SectionResult:
        with np.load(self.path(z)) as data:
            return SectionResult(**{k: data[k] for k in data.files})

    def get(self, z: int, source: SectionSource) -> SectionResult:
        """Section ``z`` from the store, else from ``source`` (then stored)."""
        if z in self.done:
            return self.load(z)
        result = source(z)
        self.save(z, result)
        return result


@dataclass
class VolumeReport:
    """What the writing pass saw: objects, empty sections, the section with most objects."""

    objects: int = 0
    empty: int = 0
    best: tuple[int, int] = (-1, 0)  # (objects, -z)
    best_labels: np.ndarray | None = field(default=None, repr=False)
    ids: set[int] | None = None  # the ids seen, where they are not numbered 1..N through the stack

    def see(self, z: int, labels: np.ndarray) -> None:
        present = np.unique(labels)
        count = int(np.count_nonzero(present))
        if self.ids is None:
            self.objects = max(self.objects, int(present[-1]) if present.size else 0)
        else:
            self.ids.update(present[present > 0].tolist())
            self.objects = len(self.ids)
        self.empty += count == 0
        if (count, -z) > self.best:
            self.best, self.best_labels = (count, -z), labels.copy()


def unlinked(sections: Iterator[tuple[np.ndarray, SectionResult]]) -> Iterator[Linked]:
    """Per-section ids kept (``--no_link``): objects numbered on through the stack."""
    offset = 0
    for z, (labels, result) in enumerate(sections):
        yield Linked(z, np.where(labels > 0, labels.astype(np.uint32) + offset, 0).astype(np.uint32), result)
        offset += len(result.scores)


def written_sections(volume: Volume, store: SectionStore, source: SectionSource, link: LinkOptions | str | None,
                     coco: CocoWriter, name: str, report: VolumeReport) -> Iterator[np.ndarray]:
    """The sections' final ``HxW`` uint32 labels in order: 3-D ids (``link`` options), numbered on
    (``link`` None) or as the sections hold them (``link`` "as given", propagated objects); with
    their COCO entries. Segments what the store does not hold yet."""
    depth = volume.shape[0]
    results = ((r.labels, r) for r in (store.get(z, source) for z in
                                       tqdm(range(depth), desc=name, unit="section", leave=False, disable=None)))
    if isinstance(link, LinkOptions):
        linked = iter_linked(results, link)
    elif link is None:
        linked = unlinked(results)
    else:
        linked = (Linked(z, labels.astype(np.uint32), r) for z, (labels, r) in enumerate(results))
    for item in linked:
        result: SectionResult = item.payload
        ids = np.zeros(int(result.labels.max(initial=0)) + 1, np.uint32)
        ids[result.labels.ravel()] = item.labels.ravel()
        coco.add(name, result.labels, result.instances, frame=item.z, ids=ids)
        report.see(item.z, item.labels)
        yield item.labels


def segment_volume(volume: Volume, name: str, source: SectionSource, store: SectionStore,
                   link: LinkOptions | str | None, coco: CocoWriter, outputs: dict[str, Path]) -> int:
    """Segment (or take from the store), link and write one volume; returns its object count."""
    report = VolumeReport(ids=set() if isinstance(link, str) else None)
    sections = written_sections(volume, store, source, link, coco, name, report)
    write_label_stack(outputs["labels"], volume.shape, sections, volume.chunks if volume.kind == "zarr" else None,
                      volume.zarr_format)
    if "maps" in outputs:  # every section is in the store now, with its maps
        write_map_stack(outputs["maps"], volume.shape, (store.load(z).maps for z in range(volume.shape[0])))
    objects = report.objects
    if objects == 0:
        log.warning("no objects found in %s: wrote an empty label stack (%s)", name, EMPTY_HINT)
    elif report.empty:
        log.warning("no objects found in %d of %d sections of %s", report.empty, volume.shape[0], name)
    if "overlay" in outputs and report.best_labels is not None:
        z = -report.best[1]
        runfiles.write_png(outputs["overlay"], draw_instances(volume.section(z), report.best_labels.astype(np.int64),
                                                              thickness=1, fill_alpha=0.45))
        log.info("%s: overlay of section %d (the one with most objects)", name, z)
    log.info("%s: %d %s in %d sections -> %s", name, objects, "objects" if link is None else "3-D objects",
             volume.shape[0], outputs["labels"])
    return objects



WORK_FOLDER = ".detect_predict_work"  # in the output directory: the section stores and the COCO spool


def volume_store(output_dir: Path, path: Path, shape: tuple[int, int, int], record: dict[str, Any]) -> SectionStore:
    """The section store of the volume ``path`` in ``output_dir`` (``record``: the options that
    make its sections)."""
    return SectionStore(output_dir / WORK_FOLDER / f"{file_stem(path)}.sections",
                        {"input": str(path.resolve()), "shape": list(shape), **record})


def predict_volume(path: Path, name: str, segment: Segment,
                   record: dict[str, Any], out: runfiles.OutputDir, resume: bool, link: LinkOptions | None,
                   coco: CocoWriter, outputs: dict[str, Path],
                   fill: Callable[[Volume, SectionStore], None] | None = None) -> int:
    """``detect predict`` on one volume: ``segment`` (one HxWx3 uint8 section -> labels 1..K and
    the K kept instances) on each section the store does not hold (``fill`` first segments them
    elsewhere: cluster.fill_store), then linking and outputs."""
    from samlora.data.volume_io import open_volume

    with open_volume(path) as volume:
        store = volume_store(out.path, path, volume.shape, record)
        done = store.open(resume, out)
        if done:
            log.info("%s: %d of %d sections were finished by the interrupted run; resuming", name, done,
                     volume.shape[0])
        if fill is not None:
            fill(volume, store)
        return segment_volume(volume, name, lambda z: section_result(segment, volume, z), store, link,
                              coco, outputs)
