"""3-D objects from per-section instances: sections linked in order, one at a time.

Each section's objects are matched one to one to the objects of the sections before it by IoU
(the overlap table of overlaps.py, the matching of maximal summed IoU among pairs above
``iou``); an object missing from up to ``gap`` sections keeps its id when it reappears, and
objects present in fewer than ``min_sections`` sections are dropped. The one-to-one matching
never merges two objects, so one of two pieces of a split object starts a new one; with ``merge``,
a section's unmatched pieces that overlap one earlier object and no other join it (a
mitochondrion that one section shows as two pieces stays one object). :class:`SliceLinker` does
this in section order holding only the last ``gap + 1`` sections' ids, plus the few sections
whose objects are not yet known to be long enough (``min_sections``); :func:`link_slices` runs it
over a label stack in memory; :func:`add_link_arguments` declares the options of the commands.
"""
from __future__ import annotations

import argparse
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import numpy as np

from samlora.core.errors import UserError
from samlora.metrics.overlaps import compact_labels, max_iou_matching, overlap_table

# 3-D connectivity of objects seen section by section: 8-connected within a section, joined to the
# next section where they overlap (scipy.ndimage.label's structure for 3-D connected components).
IN_PLANE_AND_FACE = np.zeros((3, 3, 3), bool)
IN_PLANE_AND_FACE[1], IN_PLANE_AND_FACE[0, 1, 1], IN_PLANE_AND_FACE[2, 1, 1] = True, True, True


@dataclass(frozen=True)
class LinkOptions:
    """How sections are linked (the options of :func:`add_link_arguments`).

    ``iou``: two objects of nearby sections are one 3-D object when their IoU is above this;
    ``gap``: sections an object may be missing from and keep its id; ``min_sections``: objects
    found in fewer sections are dropped; ``merge`` (``--link_merge``): a section's unmatched pieces
    that overlap one earlier object and no other join it (:meth:`SliceLinker._join`).
    """

    iou: float = 0.25
    gap: int = 1
    min_sections: int = 1
    merge: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.iou < 1.0:
            raise UserError(f"--link_iou must be in 0..1 (below 1), got {self.iou}")
        if self.gap < 0:
            raise UserError(f"--link_gap must be 0 or more, got {self.gap}")
        if self.min_sections < 1:
            raise UserError(f"--min_sections must be at least 1, got {self.min_sections}")


def add_link_arguments(group: argparse._ArgumentGroup) -> None:
    """Declare ``--link_iou``, ``--link_gap``, ``--min_sections`` and ``--link_merge`` (LinkOptions) in ``group``."""
    group.add_argument("--link_iou", type=float, default=LinkOptions.iou,
                       help="objects of nearby sections whose masks overlap with an IoU above this are one 3-D "
                            "object (matched one to one)")
    group.add_argument("--link_gap", type=int, default=LinkOptions.gap,
                       help="an object missing from up to this many sections keeps its id when it reappears")
    group.add_argument("--min_sections", type=int, default=LinkOptions.min_sections,
                       help="drop 3-D objects found in fewer sections")
    group.add_argument("--link_merge", action="store_true",
                       help="a section's unmatched pieces that overlap one object of the sections before, and no "
                            "other, join it (an object one section shows as two pieces stays one); objects that "
                            "each continue are never joined")


class Linked(NamedTuple):
    """A finished section: its index ``z``, ``HxW`` uint32 3-D ids, and what came with it."""

    z: int
    labels: np.ndarray
    payload: Any


class _Section(NamedTuple):
    z: int
    compact: np.ndarray  # HxW int32: the section's objects numbered 1..n (with merge, a track's pieces are one)
    tracks: np.ndarray  # (n,) int64: the track of each object
    payload: Any


class _Candidates(NamedTuple):
    """The (piece, track) pairs of a section and the tracks it may continue: (K,) arrays."""

    row: np.ndarray  # int64: the piece (object of the section, 0..n-1)
    track: np.ndarray  # int64: the track, compared with its mask in the section it was last seen in
    inter: np.ndarray  # int64: their overlap in pixels
    piece_area: np.ndarray  # int64
    track_area: np.ndarray  # int64: the track's mask in the section it was last seen in

    @property
    def iou(self) -> np.ndarray:
        """(K,) float64 IoU of each pair."""
        return self.inter / np.maximum(self.piece_area + self.track_area - self.inter, 1)


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
        if self.options.merge:
            compact, tracks = one_object_per_track(compact, tracks)
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
        found = self._candidates(compact)
        out = np.arange(self._next_track, self._next_track + n, dtype=np.int64)
        ok = found.iou > self.options.iou
        if ok.any():
            row, track, iou = found.row[ok], found.track[ok], found.iou[ok]
            columns, col = np.unique(track, return_inverse=True)
            chosen = max_iou_matching(row, col.ravel(), iou, n, len(columns))
            out[row[chosen]] = track[chosen]
        if self.options.merge:
            self._join(out, found)
        fresh = out >= self._next_track
        out[fresh] = np.arange(self._next_track, self._next_track + int(fresh.sum()))
        self._next_track += int(fresh.sum())
        return out

    def _candidates(self, compact: np.ndarray) -> _Candidates:
        """Every overlapping (object of ``compact``, track) pair, a track taken where it was last seen."""
        parts = []
        for before in self._recent:
            table = overlap_table(compact, before.compact)
            candidate = before.tracks[table.pair_b]
            alive = np.array([self._last[t] for t in candidate.tolist()], dtype=np.int64) == before.z
            parts.append((table.pair_a[alive], candidate[alive], table.inter[alive],
                          table.area_a[table.pair_a[alive]], table.area_b[table.pair_b[alive]]))
        if not parts:
            return _Candidates(*(np.zeros(0, np.int64) for _ in range(5)))
        return _Candidates(*(np.concatenate(column).astype(np.int64) for column in zip(*parts)))

    def _join(self, out: np.ndarray, found: _Candidates) -> None:
        """Give the unmatched pieces that overlap one track and no other that track (in ``out``).

        A track matched in this section keeps its piece and gains the others; an unmatched one is
        continued by its pieces when together they match its mask with an IoU above ``iou``. A
        matched piece never changes track, so two objects that each continue are never joined.
        """
        unmatched = out >= self._next_track
        sole = unmatched[found.row] & (np.bincount(found.row, minlength=len(out))[found.row] == 1)
        for track in np.unique(found.track[sole]).tolist():
            pair = found.track == track
            matched = pair & (out[found.row] == track)  # the pair of the piece matched to the track, if any
            pieces = pair & sole
            inter = int(found.inter[matched | pieces].sum())
            union = int(found.track_area[pair][0] + (found.piece_area - found.inter)[matched | pieces].sum())
            if matched.any() or inter > self.options.iou * union:
                out[found.row[pieces]] = track

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


def one_object_per_track(compact: np.ndarray, tracks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A section's pieces that share a track renumbered as one object.

    Args:
        compact: HxW int32 objects 1..n; tracks: (n,) int64 the track of each.

    Returns:
        HxW int32 objects 1..m and their (m,) distinct tracks, in the order of their first piece.
    """
    _, first, inverse = np.unique(tracks, return_index=True, return_inverse=True)
    if len(first) == len(tracks):
        return compact, tracks
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    lut = np.concatenate([[0], rank[inverse.ravel()] + 1]).astype(np.int32)
    return lut[compact], tracks[np.sort(first)]


def link_slices(labels: np.ndarray, iou: float = LinkOptions.iou, gap: int = LinkOptions.gap,
                min_sections: int = LinkOptions.min_sections, merge: bool = LinkOptions.merge) -> np.ndarray:
    """ZxHxW per-section instance ids -> ZxHxW uint32 3-D ids (0 background).

    Every non-zero value of a section is one object (values may repeat across sections: they
    mean nothing there). See :class:`SliceLinker` for the rule (``merge``: :class:`LinkOptions`).
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be a ZxHxW stack, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.size and np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    out = np.zeros(labels.shape, np.uint32)
    for linked in iter_linked(labels, LinkOptions(iou, gap, min_sections, merge)):
        out[linked.z] = linked.labels
    return out


def iter_linked(sections: Any, options: LinkOptions = LinkOptions()) -> Iterator[Linked]:
    """Link an iterable of ``HxW`` sections (or ``(labels, payload)`` pairs); yields :class:`Linked` in order."""
    linker = SliceLinker(options)
    for item in sections:
        labels, payload = item if isinstance(item, tuple) else (item, None)
        yield from linker.push(labels, payload)
    yield from linker.finish()
