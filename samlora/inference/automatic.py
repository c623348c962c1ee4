"""Automatic instance segmentation from the learned decoder's maps: AIS (a seeded watershed) and APG
(point prompts derived from the maps, decoded by SAM's mask decoder), as micro-sam's
``InstanceSegmentationWithDecoder`` and ``AutomaticPromptGenerator`` do.

    maps = instance_maps(sam, image, tile=1024, halo=64)     # 3xHxW float32 in [0, 1], stitched
    labels = maps_to_instances(maps, WatershedOptions())     # AIS (instance_watershed.py)
    prompts = map_prompts(maps, WatershedOptions())          # APG: one click per seed region
    segmenter = build_segmenter(sam, SegmentOptions(mode="ais"))  # detect predict's Segmenter

The decoder is the one the model carries (``sam.instance_decoder``, instance_decoder.attach); it
sees SAM's image embedding of the image, or of each tile of a large image. Tiles are windows of
side ``tile`` sharing ``2 * halo`` pixels with their neighbours; each tile's maps are kept only on
its inner part (the middle of every overlap is the seam), and the stitched maps go to the
watershed whole, so an object on a tile border is one object.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from samlora.core.errors import UserError
from samlora.data.instances import Instance, paint_instances
from samlora.data.prompts import Prompts, object_prompts
from samlora.inference.instance_watershed import WatershedOptions, maps_to_instances
from samlora.inference.segmenter import (
    DECODER_MODES,
    Proposer,
    Segmented,
    Segmenter,
    SegmentOptions,
    decode_instances,
    encode_image,
    sam_device,
)
from samlora.inference.tiles import tile_windows
from samlora.models import instance_decoder
from samlora.models import sam as sam_model

NO_DECODER = ("the model has no instance decoder (needed by --mode ais / apg): give --model_path an adapter "
              "trained with `python main.py train --instance_decoder`, or --checkpoint a combined checkpoint "
              "holding a decoder_state (micro-sam's layout, e.g. train --export_merged)")
_EIGHT = np.ones((3, 3), dtype=bool)

Window = tuple[int, int, int, int]  # (y0, x0, y1, x1), array-slice bounds in the image


def require_decoder(sam: nn.Module) -> instance_decoder.InstanceDecoder:
    """The AIS decoder ``sam`` carries; :class:`UserError` (what to do) when it has none."""
    decoder = instance_decoder.attached(sam)
    if decoder is None:
        raise UserError(NO_DECODER)
    return decoder


@dataclass
class TileMaps:
    """One tile of an image: its ``window`` and ``inner`` part ((y0, x0, y1, x1) in the image),
    and its 1x256x(S/16)x(S/16) SAM ``embedding`` (kept for APG's prompts)."""

    window: Window
    inner: Window
    embedding: torch.Tensor | None = None


def _inner_bounds(starts: list[int], ends: list[int], length: int) -> list[tuple[int, int]]:
    """Along one axis: each tile's inner part, the seams in the middle of the overlaps."""
    cuts = [0] + [(ends[i] + starts[i + 1]) // 2 for i in range(len(starts) - 1)] + [length]
    return [(cuts[i], cuts[i + 1]) for i in range(len(starts))]


def halo_tiles(height: int, width: int, tile: int | None, halo: int) -> list[TileMaps]:
    """The tiles of an HxW image: windows of side ``tile`` (tiles.tile_windows) whose neighbours
    share at least ``2 * halo`` pixels, and their inner parts, which partition the image; each
    reaches at least ``halo`` pixels past its inner part wherever it has a neighbour.
    ``tile`` None or 0, or an image that fits: one tile."""
    if halo < 0:
        raise ValueError(f"halo must be >= 0, got {halo}")
    if not tile or (height <= tile and width <= tile):
        return [TileMaps((0, 0, height, width), (0, 0, height, width))]
    if 2 * halo >= tile:
        raise ValueError(f"halo must be below half the tile ({tile}), got {halo}")
    windows = tile_windows(height, width, tile, 2 * halo)
    ys = sorted({(w[0], w[2]) for w in windows})
    xs = sorted({(w[1], w[3]) for w in windows})
    inner_y = dict(zip(ys, _inner_bounds([a for a, _ in ys], [b for _, b in ys], height)))
    inner_x = dict(zip(xs, _inner_bounds([a for a, _ in xs], [b for _, b in xs], width)))
    tiles = []
    for y0, x0, y1, x1 in windows:
        (iy0, iy1), (ix0, ix1) = inner_y[(y0, y1)], inner_x[(x0, x1)]
        tiles.append(TileMaps((y0, x0, y1, x1), (iy0, ix0, iy1, ix1)))
    return tiles


@torch.no_grad()
def image_maps(sam: nn.Module, image: np.ndarray,
               embedding: torch.Tensor | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """One HxWx3 uint8 image (or tile) -> (3xHxW float32 maps at its size, its embedding).

    The embedding is :func:`segmenter.encode_image`'s (SAM's own preprocessing), the maps the
    decoder's :meth:`InstanceDecoder.predict` (resized back as micro-sam does)."""
    decoder = require_decoder(sam)
    original_size = tuple(image.shape[:2])
    input_size = sam_model.preprocess_shape(original_size, sam.image_encoder.img_size)
    embedding = encode_image(sam, image) if embedding is None else embedding
    maps = decoder.predict(embedding.to(next(decoder.parameters()).dtype), input_size, original_size)
    return maps[0].float().clamp_(0.0, 1.0).cpu().numpy(), embedding


def tiled_maps(sam: nn.Module, image: np.ndarray, tile: int | None = None, halo: int = 64,
               precision: str = "fp32", keep_embeddings: bool = False) -> tuple[np.ndarray, list[TileMaps]]:
    """:func:`instance_maps` with the tiles it used (:func:`halo_tiles`), each with its
    embedding when ``keep_embeddings`` (APG prompts the tiles afterwards)."""
    require_decoder(sam)
    height, width = image.shape[:2]
    tiles = halo_tiles(height, width, tile, halo)
    maps = np.zeros((len(instance_decoder.MAP_NAMES), height, width), np.float32)
    with sam_model.autocast(sam_device(sam), precision):
        for part in tiles:
            y0, x0, y1, x1 = part.window
            tile_maps, embedding = image_maps(sam, np.ascontiguousarray(image[y0:y1, x0:x1]))
            iy0, ix0, iy1, ix1 = part.inner
            maps[:, iy0:iy1, ix0:ix1] = tile_maps[:, iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
            part.embedding = embedding if keep_embeddings else None
    return maps, tiles


def instance_maps(sam: nn.Module, image: np.ndarray, tile: int | None = None, halo: int = 64,
                  precision: str = "fp32") -> np.ndarray:
    """HxWx3 uint8 image -> 3xHxW float32 maps in [0, 1] (instance_decoder.MAP_NAMES: foreground,
    centre distance, boundary distance) from the decoder ``sam`` carries.

    ``tile``: images larger than this are cut into windows of this side that overlap by
    ``2 * halo`` pixels; each window's maps are kept on its inner part and stitched (module
    docstring). ``precision``: autocast of SAM and the decoder (sam_model.autocast).
    Raises :class:`UserError` when ``sam`` carries no decoder."""
    return tiled_maps(sam, image, tile, halo, precision)[0]


def labelled_instances(labels: np.ndarray, foreground: np.ndarray) -> list[Instance]:
    """HxW labels 1..n -> their n :class:`Instance` objects in label order, each scored by its mean
    foreground probability (``foreground`` HxW; AIS has no predicted IoU)."""
    labels = np.asarray(labels)
    found = []
    means = ndimage.mean(foreground, labels, index=np.arange(1, int(labels.max(initial=0)) + 1))
    for value, where in enumerate(ndimage.find_objects(labels), start=1):
        if where is None:
            continue
        mask = labels[where] == value
        score = float(means[value - 1])
        found.append(Instance((where[1].start, where[0].start, where[1].stop, where[0].stop), mask, score, score))
    return found


def ais_instances(sam: nn.Module, image: np.ndarray, watershed: WatershedOptions = WatershedOptions(),
                  tile: int | None = None, halo: int = 64, precision: str = "fp32",
                  min_area: int = 0) -> tuple[np.ndarray, list[Instance], np.ndarray]:
    """AIS on one HxWx3 uint8 image: ``(labels HxW int32, kept instances, maps 3xHxW float32)``.

    The stitched maps (:func:`instance_maps`) -> the seeded watershed (``watershed``); objects
    under ``min_area`` pixels dropped and the rest numbered 1..K by decreasing mean foreground
    probability (their ``score``), as the other modes number theirs."""
    maps = instance_maps(sam, image, tile, halo, precision)
    objects = labelled_instances(maps_to_instances(maps, watershed), maps[0])
    labels, kept = paint_instances(objects, image.shape[:2], min_area)
    return labels, kept, maps


def seed_regions(maps: np.ndarray, watershed: WatershedOptions = WatershedOptions()) -> np.ndarray:
    """3xHxW maps -> HxW int32 seed regions: the 8-connected components of (centre distance <
    its threshold) and (boundary distance < its threshold) where the foreground reaches its
    threshold, on the raw maps (micro-sam's ``_derive_point_prompts``)."""
    foreground, center, boundary = np.asarray(maps)
    markers = (center < watershed.center_distance_threshold) & (boundary < watershed.boundary_distance_threshold)
    markers &= foreground >= watershed.foreground_threshold
    return ndimage.label(markers, structure=_EIGHT)[0].astype(np.int32)


def map_prompts(maps: np.ndarray, watershed: WatershedOptions = WatershedOptions()) -> Prompts:
    """APG's prompts of one image: one positive click per seed region (:func:`seed_regions`) at
    its pixel farthest from the region's border (prompts.interior_point; the image border counts
    as border, as micro-sam avoids it)."""
    return object_prompts(seed_regions(maps, watershed), "point")


def _tile_prompts(prompts: Prompts, part: TileMaps) -> Prompts | None:
    """The prompts whose click lies in the tile's inner part, in the tile's pixel frame."""
    y0, x0, _, _ = part.window
    iy0, ix0, iy1, ix1 = part.inner
    x, y = prompts.points[:, 0, 0], prompts.points[:, 0, 1]
    rows = np.flatnonzero((y >= iy0) & (y < iy1) & (x >= ix0) & (x < ix1))
    if rows.size == 0:
        return None
    points = prompts.points[rows] - np.array([x0, y0], np.float32)
    return Prompts(prompts.object_ids[rows], prompts.boxes[rows], points, prompts.point_labels[rows],
                   use_boxes=False, use_points=True)


def apg_instances(sam: nn.Module, image: np.ndarray, watershed: WatershedOptions = WatershedOptions(),
                  tile: int | None = None, halo: int = 64, precision: str = "fp32", chunk: int = 64,
                  min_score: float = 0.0, min_stability: float = 0.0,
                  min_area: int = 0) -> tuple[np.ndarray, list[Instance], np.ndarray]:
    """APG on one HxWx3 uint8 image: ``(labels HxW int32, kept instances, maps 3xHxW float32)``.

    The stitched maps give one click per seed region (:func:`map_prompts`); each click is decoded
    by SAM's mask decoder (segmenter.decode_instances, ``chunk`` clicks a call) on the embedding
    of the tile whose inner part holds it, so a mask reaches at most that tile's window. Masks
    under ``min_score`` predicted IoU or ``min_stability`` stability score are dropped; overlaps
    go to the higher predicted IoU and objects are numbered 1..K by it (paint_instances)."""
    maps, tiles = tiled_maps(sam, image, tile, halo, precision, keep_embeddings=True)
    prompts = map_prompts(maps, watershed)
    found: list[Instance] = []
    with sam_model.autocast(sam_device(sam), precision):
        for part in tiles if len(prompts) else ():
            local = _tile_prompts(prompts, part)
            if local is None:
                continue
            y0, x0, y1, x1 = part.window
            masks = decode_instances(sam, part.embedding, local, (y1 - y0, x1 - x0), chunk, keep_ids=False,
                                     min_score=min_score, min_stability=min_stability)
            found += [inst.shifted(y0, x0) for inst in masks]
    labels, kept = paint_instances(found, image.shape[:2], min_area)
    return labels, kept, maps


class DecoderSegmenter(Segmenter):
    """The :class:`segmenter.Segmenter` of modes ``ais`` / ``apg``: the decoder ``sam`` carries,
    on maps stitched from tiles of ``options.tile_size`` with a halo of ``tile_overlap // 2``;
    :meth:`segment` also returns the maps. Objects are numbered 1..K by decreasing score (APG:
    predicted IoU; AIS: mean foreground probability)."""

    def __init__(self, sam: nn.Module, options: SegmentOptions, propose: Proposer | None = None) -> None:
        if options.mode not in DECODER_MODES:
            raise ValueError(f"DecoderSegmenter runs modes {DECODER_MODES}, not {options.mode!r}")
        require_decoder(sam)
        super().__init__(sam, options, propose)

    def segment(self, image: np.ndarray) -> Segmented:
        """Labels, kept instances and the 3xHxW maps of one HxWx3 uint8 image."""
        o = self.options
        common = dict(tile=o.tile_size, halo=o.tile_overlap // 2, precision=o.precision, min_area=o.min_area)
        if o.mode == "ais":
            return Segmented(*ais_instances(self.sam, image, o.watershed, **common))
        return Segmented(*apg_instances(self.sam, image, o.watershed, chunk=o.box_batch, min_score=o.pred_iou_thresh,
                                        min_stability=o.stability_score_thresh, **common))


def build_segmenter(sam: nn.Module, options: SegmentOptions, propose: Proposer | None = None) -> Segmenter:
    """The Segmenter of ``options.mode``: :class:`DecoderSegmenter` for ais / apg, else
    segmenter.Segmenter (yolo needs ``propose``)."""
    kind = DecoderSegmenter if options.mode in DECODER_MODES else Segmenter
    return kind(sam, options, propose)
