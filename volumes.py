"""3-D objects from per-section instances: sections linked in order, one at a time.

Each section's objects are matched one to one to the objects of the sections before it by IoU
(the overlap table of overlaps.py, the matching of maximal summed IoU among pairs above
``iou``); an object missing from up to ``gap`` sections keeps its id when it reappears, and
objects present in fewer than ``min_sections`` sections are dropped. :class:`SliceLinker` does
this in section order holding only the last ``gap + 1`` sections' ids, plus the few sections
whose objects are not yet known to be long enough (``min_sections``); :func:`link_slices` runs it
over a label stack in memory.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import numpy as np

from errors import UserError
from overlaps import compact_labels, max_iou_matching, overlap_table

# 3-D connectivity of objects seen section by section: 8-connected within a section, joined to the
# next section where they overlap (scipy.ndimage.label's structure for 3-D connected components).
IN_PLANE_AND_FACE = np.zeros((3, 3, 3), bool)
IN_PLANE_AND_FACE[1], IN_PLANE_AND_FACE[0, 1, 1], IN_PLANE_AND_FACE[2, 1, 1] = True, True, True


@dataclass(frozen=True)
class LinkOptions:
    """How sections are linked (the ``--link_iou``, ``--link_gap``, ``--min_sections`` options).

    ``iou``: two objects of nearby sections are one 3-D object when their IoU is above this;
    ``gap``: sections an object may be missing from and keep its id; ``min_sections``: objects
    found in fewer sections are dropped.
    """

    iou: float = 0.25
    gap: int = 1
    min_sections: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.iou < 1.0:
            raise UserError(f"--link_iou must be in 0..1 (below 1), got {self.iou}")
        if self.gap < 0:
            raise UserError(f"--link_gap must be 0 or more, got {self.gap}")
        if self.min_sections < 1:
            raise UserError(f"--min_sections must be at least 1, got {self.min_sections}")


class Linked(NamedTuple):
    """A finished section: its index ``z``, ``HxW`` uint32 3-D ids, and what came with it."""

    z: int
    labels: np.ndarray
    payload: Any


class _Section(NamedTuple):
    z: int
    compact: np.ndarray  # HxW int32: the section's objects numbered 1..n
    tracks: np.ndarray  # (n,) int64: the track of each object
    payload: Any


class SliceLinker:
    """Links the sections of a volume pushed in order into 3-D objects (module docstring).

    ``push(labels)`` takes one ``HxW`` section of non-negative per-section ids (0 background,
    every other value one object) and returns the sections finished by it (:class:`Linked`, in
    order), usually that section itself; with ``min_sections > 1`` a section waits until each of
    its objects is known to be long enough or to have ended. ``finish()`` returns the rest. 3-D
    ids are 1..N in the order objects first appear among the kept ones.
    """

    def __init__(self, options: LinkOptions = LinkOptions()) -> None:
        self.options = options
        self.z = 0
        self._recent: deque[_Section] = deque(maxlen=options.gap + 1)
        self._pending: deque[_Section] = deque()
        self._last: dict[int, int] = {}  # track -> last section it was seen in
        self._count: dict[int, int] = {}  # track -> sections it was seen in
        self._final: dict[int, int] = {}  # track -> its 3-D id, once emitted
        self._next_track = 1
        self.objects = 0  # 3-D ids given so far

    def push(self, labels: np.ndarray, payload: Any = None) -> list[Linked]:
        """Link the next section; returns the sections finished now."""
        labels = np.asarray(labels)
        if labels.ndim != 2:
            raise ValueError(f"a section must be HxW, got shape {labels.shape}")
        if self._recent and labels.shape != self._recent[-1].compact.shape:
            raise ValueError(f"section {self.z} is {labels.shape}, the ones before {self._recent[-1].compact.shape}")
        compact, n = compact_labels(labels.ravel())
        compact = compact.reshape(labels.shape).astype(np.int32)
        tracks = self._match(compact, n)
        for track in tracks.tolist():
            self._last[track] = self.z
            self._count[track] = self._count.get(track, 0) + 1
        section = _Section(self.z, compact, tracks, payload)
        self._recent.append(section)
        self._pending.append(section)
        self.z += 1
        return self._emit(final=False)

    def finish(self) -> list[Linked]:
        """The sections still waiting (call once, after the last push)."""
        return self._emit(final=True)

    def _match(self, compact: np.ndarray, n: int) -> np.ndarray:
        """(n,) tracks of the section's objects: matched ones continue a track, others start one."""
        rows, tracks, ious = [], [], []
        for before in self._recent:  # a track is compared with its mask in the section it was last seen in
            table = overlap_table(compact, before.compact)
            candidate = before.tracks[table.pair_b]
            ok = (np.array([self._last[t] for t in candidate.tolist()], dtype=np.int64) == before.z) \
                & (table.iou > self.options.iou)
            rows.append(table.pair_a[ok])
            tracks.append(candidate[ok])
            ious.append(table.iou[ok])
        out = np.arange(self._next_track, self._next_track + n, dtype=np.int64)
        if rows and sum(len(r) for r in rows):
            row, track, iou = np.concatenate(rows), np.concatenate(tracks), np.concatenate(ious)
            columns, col = np.unique(track, return_inverse=True)
            chosen = max_iou_matching(row, col.ravel(), iou, n, len(columns))
            out[row[chosen]] = track[chosen]
        fresh = out >= self._next_track
        out[fresh] = np.arange(self._next_track, self._next_track + int(fresh.sum()))
        self._next_track += int(fresh.sum())
        return out

    def _decided(self, section: _Section) -> bool:
        """Whether every object of ``section`` is long enough or can grow no more."""
        dead_before = self.z - 1 - self.options.gap  # a track last seen before this cannot continue
        return all(self._count[t] >= self.options.min_sections or self._last[t] < dead_before
                   for t in section.tracks.tolist())

    def _emit(self, final: bool) -> list[Linked]:
        done = []
        while self._pending and (final or self._decided(self._pending[0])):
            section = self._pending.popleft()
            ids = np.zeros(len(section.tracks) + 1, np.uint32)
            for k, track in enumerate(section.tracks.tolist(), start=1):
                if self._count[track] >= self.options.min_sections:
                    if track not in self._final:
                        self.objects += 1
                        self._final[track] = self.objects
                    ids[k] = self._final[track]
            done.append(Linked(section.z, ids[section.compact], section.payload))
        self._forget()
        return done

    def _forget(self) -> None:
        """Drop the records of tracks that ended and that no waiting section holds."""
        oldest = self._pending[0].z if self._pending else self.z
        horizon = min(oldest, self.z - 1 - self.options.gap)
        for track in [t for t, last in self._last.items() if last < horizon]:
            del self._last[track], self._count[track]
            self._final.pop(track, None)


def link_slices(labels: np.ndarray, iou: float = LinkOptions.iou, gap: int = LinkOptions.gap,
                min_sections: int = LinkOptions.min_sections) -> np.ndarray:
    """ZxHxW per-section instance ids -> ZxHxW uint32 3-D ids (0 background).

    Every non-zero value of a section is one object (values may repeat across sections: they
    mean nothing there). See :class:`SliceLinker` for the rule.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be a ZxHxW stack, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.size and np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    out = np.zeros(labels.shape, np.uint32)
    for linked in iter_linked(labels, LinkOptions(iou, gap, min_sections)):
        out[linked.z] = linked.labels
    return out


def iter_linked(sections: Any, options: LinkOptions = LinkOptions()) -> Iterator[Linked]:
    """Link an iterable of ``HxW`` sections (or ``(labels, payload)`` pairs); yields :class:`Linked` in order."""
    linker = SliceLinker(options)
    for item in sections:
        labels, payload = item if isinstance(item, tuple) else (item, None)
        yield from linker.push(labels, payload)
    yield from linker.finish()
