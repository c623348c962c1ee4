"""Segmenting images with a SAM model: encode once, decode prompts in chunks, paint by score, tiles.

The one inference path of the tool: evaluate, demo, detect, bench and the trainer's validation
all segment through these functions; :func:`predict` is the single-call API (as segment-anything's
``SamPredictor``).

    embedding = encode_image(sam, image)                              # one encoder pass
    found = decode_instances(sam, embedding, prompts, image.shape[:2])  # chunks of prompts
    labels, kept = paint_instances(found, image.shape[:2])            # overlaps: higher score

:func:`segment` composes the three; :class:`Segmenter` adds tiling of large images and proposals
from a detector (detector.py) or SAM's automatic mask generator.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import cv2
import numpy as np
import torch
from torch import nn

from samlora.core.errors import UserError
from samlora.data.instances import Instance, instance_from_mask, paint_instances
from samlora.data.prompts import Prompts, box_prompts
from samlora.inference.instance_watershed import WatershedOptions
from samlora.inference.tiles import merge_tiles, tile_windows
from samlora.models import sam as sam_model

# A detector: one HxWx3 uint8 image -> (Nx4 xyxy inclusive boxes, N confidences).
Proposer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


STABILITY_OFFSET = 1.0  # segment_anything's stability_score_offset


def sam_device(sam: nn.Module) -> torch.device:
    return next(sam.parameters()).device


def default_chunk(device: torch.device) -> int:
    """Prompts per mask-decoder call. The decoder repeats the image embedding for every prompt of
    a call, and on a CPU its cost per prompt grows with the prompts that share a call (measured:
    16 prompts forward+backward 4.0 s in one call, 2.2 s one by one), so a CPU decodes them one
    by one; a GPU takes many at once."""
    return 64 if torch.device(device).type == "cuda" else 1


@torch.no_grad()
def encode_image(sam: nn.Module, image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB -> its 1x256x(S/16)x(S/16) image embedding (the one encoder pass)."""
    prepared = sam_model.prepare_image(image, sam.image_encoder.img_size)
    return sam_model.encode_images(sam, prepared.tensor[None].to(sam_device(sam)))


@torch.no_grad()
def predict(
    sam: nn.Module,
    image: np.ndarray,
    boxes: np.ndarray | None = None,
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    multimask_output: bool = False,
    mask_inputs: np.ndarray | None = None,
    threshold: float = 0.0,
    image_embedding: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segment one HxWx3 uint8 image with N prompts in pixel coordinates.

    Returns ``(masks, scores, logits)``: masks NxHxW bool, scores N predicted IoUs, logits
    Nx(S/4)x(S/4) low-resolution logits; with ``multimask_output`` each gains a C=3 axis after N
    (NxCxHxW, NxC, NxCx(S/4)x(S/4)). The decoder call is training's (:func:`model.decode`);
    ``image_embedding`` (1x256x(S/16)x(S/16), from :func:`encode_image`) skips the encoder when
    one image is prompted several times.
    """
    device = sam_device(sam)
    image_size = sam.image_encoder.img_size
    original_size = tuple(image.shape[:2])
    if image_embedding is None:
        prepared = sam_model.prepare_image(image, image_size)
        images, input_size = prepared.tensor[None].to(device), prepared.input_size
    else:
        images, input_size = None, sam_model.preprocess_shape(original_size, image_size)
    prompts = sam_model.make_prompts(original_size, image_size, boxes, points, point_labels, mask_inputs, device)
    out = sam_model.sam_forward(sam, images, [prompts], [input_size], [original_size], multimask_output,
                      image_embeddings=image_embedding)[0]
    masks = (out.logits > threshold).cpu().numpy()
    scores, low_res = out.iou.float().cpu().numpy(), out.low_res.float().cpu().numpy()
    if not multimask_output:
        masks, scores, low_res = masks[:, 0], scores[:, 0], low_res[:, 0]
    return masks, scores, low_res


def full_size_logits(low_res: torch.Tensor, image_size: int, input_size: tuple[int, int],
                     original_size: tuple[int, int]) -> torch.Tensor:
    """Nx1x(S/4)x(S/4) mask logits -> Nx1xHxW logits at the original size.

    :func:`model.postprocess_logits`, without its second full-size resize when the resized input
    already has the original size (an image or tile of exactly the model's input size): that
    resize is an identity that costs as much as the first one.
    """
    if tuple(input_size) != tuple(original_size):
        return sam_model.postprocess_logits(low_res, image_size, input_size, original_size)
    return sam_model.input_logits(low_res, image_size, input_size)


def full_size_masks(low_res: torch.Tensor, image_size: int, input_size: tuple[int, int],
                    original_size: tuple[int, int]) -> np.ndarray:
    """Nx1x(S/4)x(S/4) mask logits -> NxHxW bool masks at the original size (what :func:`predict`
    gives: :func:`full_size_logits` ``> 0``)."""
    return (full_size_logits(low_res, image_size, input_size, original_size)[:, 0] > 0).cpu().numpy()


def stability_scores(logits: torch.Tensor, offset: float = STABILITY_OFFSET) -> torch.Tensor:
    """Nx1xHxW mask logits -> N stability scores: the IoU of the masks thresholded at ``+offset``
    and ``-offset`` (segment_anything's ``calculate_stability_score`` at mask threshold 0)."""
    inner = (logits > offset).flatten(1).sum(1)
    outer = (logits > -offset).flatten(1).sum(1)
    return inner.float() / outer.clamp(min=1).float()


@torch.no_grad()
def decode_instances(sam: nn.Module, embedding: torch.Tensor, prompts: Prompts,
                     original_size: tuple[int, int], chunk: int = 64,
                     confidences: np.ndarray | None = None, keep_ids: bool = True,
                     min_score: float = 0.0, min_stability: float = 0.0) -> list[Instance]:
    """Decode the N prompts of one image against its 1x256x(S/16)x(S/16) ``embedding``.

    ``chunk`` prompts share a decoder call. Returns the non-empty masks as :class:`Instance`
    objects (masks as :func:`predict` gives them), scored by SAM's predicted IoU; ``confidences``
    (N) break ties; ``keep_ids`` paints each with its prompt's object id. A single click (one
    positive point, no box or mask: ``PromptTensors.single_click``, the rule training follows) is
    ambiguous, so it takes the best of SAM's three masks by predicted IoU, as segment_anything
    recommends; other prompts take the single-mask output. Masks with a predicted IoU under
    ``min_score`` or a stability score (:func:`stability_scores`) under ``min_stability`` are
    dropped (APG's filters; 0 or less: none).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    image_size = sam.image_encoder.img_size
    input_size = sam_model.preprocess_shape(original_size, image_size)
    found = []
    for start in range(0, len(prompts), chunk):
        rows = slice(start, start + chunk)
        tensors = sam_model.make_prompts(
            original_size, image_size, boxes=prompts.boxes[rows] if prompts.use_boxes else None,
            points=prompts.points[rows] if prompts.use_points else None,
            point_labels=prompts.point_labels[rows] if prompts.use_points else None,
            mask_inputs=prompts.mask_inputs[rows] if prompts.mask_inputs is not None else None, device=embedding.device)
        multimask = tensors.single_click()
        low_res, ious = sam_model.decode(sam, embedding[0], tensors, multimask_output=multimask)
        best = ious.argmax(dim=1) if multimask else torch.zeros(len(ious), dtype=torch.long, device=ious.device)
        low_res, ious = sam_model.pick_outputs(low_res, best), sam_model.pick_outputs(ious, best)
        logits = full_size_logits(low_res, image_size, input_size, original_size)
        keep = torch.ones(len(ious), dtype=torch.bool, device=ious.device)
        if min_score > 0:  # 0: no filter (an untrained model's predicted IoU can be negative)
            keep &= ious[:, 0] >= min_score
        if min_stability > 0:
            keep &= stability_scores(logits.float()) >= min_stability
        masks = (logits[:, 0] > 0).cpu().numpy()
        scores, keep = ious[:, 0].float().cpu().numpy(), keep.cpu().numpy()
        for j, (mask, score) in enumerate(zip(masks, scores)):
            row = start + j
            if not keep[j]:
                continue
            confidence = float(score if confidences is None else confidences[row])
            label = int(prompts.object_ids[row]) if keep_ids else None
            instance = instance_from_mask(mask, score, confidence, label)
            if instance is not None:
                found.append(instance)
    return found


def mask_prompt(mask: np.ndarray, image_size: int, eps: float = 1e-3) -> np.ndarray:
    """An ``HxW`` bool mask -> ``(S/4)x(S/4)`` float32 logits for the decoder's mask input: resized
    as the image is (longest side to S/4, padded bottom-right), then the logit of the mask value
    clipped to eps..1-eps (micro-sam's mask prompt of a neighbouring section)."""
    side = image_size // 4
    height, width = sam_model.preprocess_shape(mask.shape[:2], side)
    resized = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    padded = np.zeros((side, side), np.float32)
    padded[:height, :width] = resized
    p = np.clip(padded, eps, 1 - eps)
    return np.log(p / (1 - p)).astype(np.float32)


PROTOCOLS = {"box": "one box per object, SAM's single-mask output",
             "point": "one click per object (its deepest pixel), the best of SAM's three masks by predicted IoU",
             "auto": "SAM's automatic mask generator (a point grid, no ground truth)",
             "yolo": "the detector's boxes, SAM's single-mask output"}


def segment(sam: nn.Module, image: np.ndarray, prompts: Prompts, chunk: int = 64, precision: str = "fp32",
            keep_ids: bool = True, confidences: np.ndarray | None = None, min_area: int = 0,
            embedding: torch.Tensor | None = None) -> np.ndarray:
    """One HxWx3 uint8 image and its prompts -> ``HxW`` int32 instance labels.

    One encoder pass, the prompts decoded ``chunk`` at a time, overlaps to the higher predicted
    IoU (then the higher of the N ``confidences``). ``keep_ids``: each mask keeps its prompt's
    object id (colours match the ground truth), else objects are numbered 1..K by decreasing score.
    ``embedding`` (from :func:`encode_image`) skips the encoder for an image prompted again.
    """
    if len(prompts) == 0:
        return np.zeros(image.shape[:2], np.int32)
    with sam_model.autocast(sam_device(sam), precision):
        embedding = encode_image(sam, image) if embedding is None else embedding
        found = decode_instances(sam, embedding, prompts, image.shape[:2], chunk, confidences, keep_ids)
    return paint_instances(found, image.shape[:2], min_area)[0]


def automatic_generator(sam: nn.Module, points_per_side: int = 32, points_per_batch: int = 64,
                        pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95) -> Any:
    """segment_anything's automatic mask generator on ``sam`` (any Sam, MobileSAM included)."""
    from segment_anything import SamAutomaticMaskGenerator

    return SamAutomaticMaskGenerator(sam, points_per_side=points_per_side, points_per_batch=points_per_batch,
                                     pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh)


@torch.no_grad()
def automatic_instances(generator: Any, image: np.ndarray, precision: str = "fp32") -> list[Instance]:
    """The generator's masks of one HxWx3 uint8 image, scored by their predicted IoU."""
    with sam_model.autocast(sam_device(generator.predictor.model), precision):
        records = generator.generate(image)
    found = (instance_from_mask(np.asarray(r["segmentation"], bool), r["predicted_iou"]) for r in records)
    return [inst for inst in found if inst is not None]


# --------------------------------------------------------------------------------------------
# The whole pipeline for one 2-D image: proposals or the automatic generator, tiles, painting
# --------------------------------------------------------------------------------------------
MODES = ("yolo", "amg", "ais", "apg")
DECODER_MODES = ("ais", "apg")  # the instance decoder's modes (automatic.py)
#: What to try when a file comes out empty (label_files.py, sections.py), for every mode.
EMPTY_HINT = ("check --model_path, or loosen the mode's filter: --conf for yolo, --pred_iou_thresh / "
              "--stability_score_thresh for amg, --foreground_threshold for ais / apg")
# Where --pred_iou_thresh / --stability_score_thresh are not given: segment_anything's AMG
# defaults; APG none, as micro-sam's AutomaticPromptGenerator filters none.
MASK_FILTERS = {"amg": (0.88, 0.95), "apg": (0.0, 0.0)}


@dataclass
class SegmentOptions:
    """How :class:`Segmenter` turns an image into instances (the ``detect predict`` options).

    ``watershed``: AIS's thresholds and APG's seed thresholds (instance_watershed.py);
    ``write_maps``: keep the decoder's 3xHxW maps of each image (modes ais / apg). AIS / APG tile
    with a halo of ``tile_overlap // 2`` (automatic.py); ``pred_iou_thresh`` /
    ``stability_score_thresh`` None take the mode's :data:`MASK_FILTERS`.
    """

    mode: str = "yolo"  # yolo (boxes from a detector) | amg | ais (learned decoder) | apg (its prompts)
    box_batch: int = 32  # boxes (APG: clicks) per SAM decoder call
    tile_size: int = 1024  # tile images larger than this (0 = never)
    tile_overlap: int = 128
    merge_threshold: float = 0.5  # mask IoU, inside the window two tiles share, that merges objects
    min_area: int = 10  # objects with fewer pixels are dropped
    precision: str = "fp32"
    points_per_side: int = 32  # AMG
    points_per_batch: int = 64
    pred_iou_thresh: float | None = None  # AMG, APG
    stability_score_thresh: float | None = None
    watershed: WatershedOptions = field(default_factory=WatershedOptions)  # AIS, APG
    write_maps: bool = False  # AIS, APG

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.write_maps and self.mode not in ("ais", "apg"):
            raise UserError(f"--write_maps writes the instance decoder's maps, which --mode {self.mode} does not "
                            "make: use --mode ais or apg, or leave out --write_maps")
        if isinstance(self.watershed, dict):  # read back from a run record
            self.watershed = WatershedOptions(**self.watershed)
        iou, stability = MASK_FILTERS.get(self.mode, MASK_FILTERS["amg"])
        self.pred_iou_thresh = iou if self.pred_iou_thresh is None else self.pred_iou_thresh
        self.stability_score_thresh = stability if self.stability_score_thresh is None else self.stability_score_thresh
        if self.box_batch < 1 or self.points_per_batch < 1 or self.points_per_side < 1:
            raise UserError("--box_batch, --points_per_batch and --points_per_side must be >= 1")
        if self.tile_size < 0 or (self.tile_size and not 0 <= self.tile_overlap < self.tile_size):
            raise UserError(f"--tile_overlap must be in 0..tile_size-1 and --tile_size >= 0 (0 = no "
                            f"tiling), got {self.tile_overlap} and {self.tile_size}")
        if not 0.0 < self.merge_threshold <= 1.0:
            raise UserError(f"--merge_threshold must be in (0, 1], got {self.merge_threshold}")


class Segmented(NamedTuple):
    """One image segmented: ``labels`` HxW int32 (1..K), the K ``kept`` instances in label order,
    and for modes ais / apg the decoder's ``maps`` 3xHxW float32 (else None)."""

    labels: np.ndarray
    kept: list[Instance]
    maps: np.ndarray | None = None


class Segmenter:
    """One HxWx3 uint8 image -> (HxW int32 instance labels, kept instances), tile by tile.

    Mode ``yolo``: ``propose`` gives each tile's boxes, which prompt SAM; mode ``amg``: SAM's
    automatic mask generator (modes ``ais`` / ``apg``: automatic.DecoderSegmenter, made by
    automatic.build_segmenter). Objects are numbered 1..K by decreasing predicted IoU.
    """

    def __init__(self, sam: nn.Module, options: SegmentOptions, propose: Proposer | None = None) -> None:
        if options.mode == "yolo" and propose is None:
            raise ValueError("mode yolo needs a box proposer (a detector)")
        self.sam, self.options, self.propose = sam, options, propose
        self.device = sam_device(sam)
        self.amg = None
        if options.mode == "amg":
            self.amg = automatic_generator(sam, options.points_per_side, options.points_per_batch,
                                           options.pred_iou_thresh, options.stability_score_thresh)
        if options.mode in DECODER_MODES and type(self).segment is Segmenter.segment:
            raise ValueError("modes ais / apg: build the segmenter with automatic.build_segmenter")

    def tile_instances(self, tile: np.ndarray) -> list[Instance]:
        """The objects of one tile (or a whole small image), in its pixel coordinates."""
        if self.amg is not None:
            return automatic_instances(self.amg, tile, self.options.precision)
        boxes, confidences = self.propose(tile)
        if len(boxes) == 0:
            return []
        embedding = encode_image(self.sam, tile)
        return decode_instances(self.sam, embedding, box_prompts(boxes), tile.shape[:2], self.options.box_batch,
                                confidences, keep_ids=False)

    def segment(self, image: np.ndarray) -> Segmented:
        """Labels, kept instances and (modes ais / apg) the maps of one HxWx3 uint8 image."""
        o = self.options
        windows = tile_windows(image.shape[0], image.shape[1], o.tile_size, o.tile_overlap)
        instances: list[Instance] = []
        tiles: list[int] = []
        with sam_model.autocast(self.device, o.precision):
            for index, (y0, x0, y1, x1) in enumerate(windows):
                found = self.tile_instances(np.ascontiguousarray(image[y0:y1, x0:x1]))
                instances += [inst.shifted(y0, x0) for inst in found]
                tiles += [index] * len(found)
        if len(windows) > 1:
            instances = merge_tiles(instances, tiles, windows, o.merge_threshold)
        return Segmented(*paint_instances(instances, image.shape[:2], o.min_area))

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, list[Instance]]:
        labels, kept, _ = self.segment(image)
        return labels, kept
