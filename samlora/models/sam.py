"""Build, load and run SAM (ViT-B/L/H) and MobileSAM (TinyViT) at 1024, 512 or 256 px.

One decoder call serves training, evaluation and inference (:func:`decode`); :func:`sam_forward`
composes it with the encoder for a batch, and inference.py builds on both:

    prepared = prepare_image(image, sam.image_encoder.img_size)   # numpy HxWx3 uint8 -> tensor
    low_res, iou = decode(sam, encode_images(sam, prepared.tensor[None])[0], make_prompts(...))

``Sam.forward`` in segment-anything runs under ``torch.no_grad()``, so we call the image
encoder, prompt encoder and mask decoder ourselves (differentiable). Pre-processing is SAM's:
the longest side resized to ``image_size`` (``ResizeLongestSide``), pixel mean/std, bottom-right
zero padding; post-processing upsamples the low-resolution logits to the padded input, crops the
padding away and resizes to the original image size.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samlora.core.errors import UserError
from samlora.models import checkpoints, encoder_blocks
from samlora.models.model_info import LoadedModel, ModelInfo

log = logging.getLogger(__name__)

PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256
SUPPORTED_IMAGE_SIZES = (1024, 512, 256)
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------
def import_mobile_sam_modeling():
    """``mobile_sam.modeling``, imported without timm's deprecation and registry warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mobile_sam.modeling

    return mobile_sam.modeling


@dataclass(frozen=True)
class DecoderSizes:
    """Sizes of the prompt encoder and mask decoder (SAM's for every model type; tests shrink them).

    ``embed_dim`` is also the image embedding's channel count (the encoder neck's output).
    """

    embed_dim: int = PROMPT_EMBED_DIM
    depth: int = 2
    mlp_dim: int = 2048
    num_heads: int = 8
    iou_head_hidden_dim: int = 256


def _prompt_encoder_and_decoder(image_size: int, package: str,
                                sizes: DecoderSizes = DecoderSizes()) -> tuple[nn.Module, nn.Module]:
    """SAM's prompt encoder (sized for ``image_size``) and mask decoder from ``package``."""
    if package == "mobile_sam":
        modeling = import_mobile_sam_modeling()
        MaskDecoder, PromptEncoder, TwoWayTransformer = (
            modeling.MaskDecoder, modeling.PromptEncoder, modeling.TwoWayTransformer)
    else:
        from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
    grid = image_size // PATCH_SIZE
    prompt_encoder = PromptEncoder(
        embed_dim=sizes.embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=sizes.depth, embedding_dim=sizes.embed_dim, mlp_dim=sizes.mlp_dim,
                                      num_heads=sizes.num_heads),
        transformer_dim=sizes.embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=sizes.iou_head_hidden_dim,
    )
    return prompt_encoder, mask_decoder


def build_sam_vit(
    image_size: int = 1024,
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    window_size: int = 14,
    decoder: DecoderSizes = DecoderSizes(),
) -> nn.Module:
    """A segment-anything ``Sam`` with a ViT encoder for ``image_size`` px input (random weights).

    The defaults are ViT-B; tests pass tiny sizes. The absolute position embedding is
    ``(image_size/16)^2`` and the global-attention relative position tables follow it.
    """
    from segment_anything.modeling import ImageEncoderViT, Sam

    encoder = ImageEncoderViT(
        depth=depth,
        embed_dim=embed_dim,
        img_size=image_size,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=num_heads,
        patch_size=PATCH_SIZE,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=tuple(global_attn_indexes),
        window_size=window_size,
        out_chans=decoder.embed_dim,
    )
    prompt_encoder, mask_decoder = _prompt_encoder_and_decoder(image_size, "segment_anything", decoder)
    return Sam(encoder, prompt_encoder, mask_decoder, pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD))


def _tinyvit_class() -> type:
    """MobileSAM's TinyViT with the final ``view(B, 64, 64, C)`` made size-independent."""
    class SizedTinyViT(import_mobile_sam_modeling().TinyViT):
        """TinyViT whose token grid side is ``img_size / 16`` instead of a hard-coded 64."""

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # x: Bx3xSxS
            return encoder_blocks.encode(self, x)  # Bx256x(S/16)x(S/16); the token grid reshaped there

    return SizedTinyViT


def build_mobile_sam(image_size: int = 1024, decoder: DecoderSizes = DecoderSizes()) -> nn.Module:
    """MobileSAM (TinyViT-5M encoder) for ``image_size`` px input, random weights.

    TinyViT's attention biases are per window, so nothing needs interpolating across sizes;
    only the final token reshape depended on 1024 px. ``decoder.embed_dim`` must stay 256
    (TinyViT's neck is fixed); tests shrink the decoder's depth and widths.
    """
    Sam = import_mobile_sam_modeling().Sam
    encoder = _tinyvit_class()(
        img_size=image_size,
        in_chans=3,
        num_classes=1000,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )
    prompt_encoder, mask_decoder = _prompt_encoder_and_decoder(image_size, "mobile_sam", decoder)
    return Sam(encoder, prompt_encoder, mask_decoder, pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD))


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model type."""

    builder: Callable[..., nn.Module]
    description: str


MODEL_REGISTRY: dict[str, ModelSpec] = {
    "vit_t": ModelSpec(build_mobile_sam, "MobileSAM (TinyViT-5M encoder)"),
    "vit_b": ModelSpec(partial(build_sam_vit, embed_dim=768, depth=12, num_heads=12,
                               global_attn_indexes=(2, 5, 8, 11)), "SAM ViT-B"),
    "vit_l": ModelSpec(partial(build_sam_vit, embed_dim=1024, depth=24, num_heads=16,
                               global_attn_indexes=(5, 11, 17, 23)), "SAM ViT-L"),
    "vit_h": ModelSpec(partial(build_sam_vit, embed_dim=1280, depth=32, num_heads=16,
                               global_attn_indexes=(7, 15, 23, 31)), "SAM ViT-H"),
}


def build_model(model_type: str, checkpoint: str | Path | None = None, image_size: int = 1024) -> LoadedModel:
    """Build ``model_type`` (vit_t, vit_b, vit_l, vit_h) for ``image_size`` px input.

    ``checkpoint=None`` gives random weights; otherwise the file is loaded with
    ``weights_only=True`` (position embeddings interpolated when ``image_size`` differs from the
    checkpoint's). Returns ``(sam, info)``: the model in eval mode and its :class:`ModelInfo`
    (type, size, the base weights' hash; ``None`` for random weights).
    """
    if model_type not in MODEL_REGISTRY:
        raise UserError(f"unknown model type {model_type!r}: choose one of {', '.join(MODEL_REGISTRY)}")
    if image_size not in SUPPORTED_IMAGE_SIZES:
        raise UserError(f"image size {image_size} is not supported: choose one of {SUPPORTED_IMAGE_SIZES}")
    sam = MODEL_REGISTRY[model_type].builder(image_size=image_size)
    sha256 = None if checkpoint is None else checkpoints.load_checkpoint(sam, checkpoint, model_type).sha256
    return LoadedModel(sam.eval(), ModelInfo(model_type, image_size, sha256))


# --------------------------------------------------------------------------------------------
# Pre- and post-processing
# --------------------------------------------------------------------------------------------
def preprocess_shape(original_size: tuple[int, int], image_size: int) -> tuple[int, int]:
    """(H, W) after resizing the longest side to ``image_size`` (SAM's rounding)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    return ResizeLongestSide.get_preprocess_shape(original_size[0], original_size[1], image_size)


@dataclass
class PreparedImage:
    """An image ready for the encoder: ``tensor`` 3xSxS normalised and padded bottom-right."""

    tensor: torch.Tensor
    input_size: tuple[int, int]  # (h, w) of the resized image inside the padded square
    original_size: tuple[int, int]  # (H, W) of the image as given


def prepare_image(image: np.ndarray, image_size: int) -> PreparedImage:
    """HxWx3 uint8 RGB -> SAM input: resize longest side, normalise, pad to SxS.

    The resize is SAM's own ``ResizeLongestSide.apply_image`` so that results match the
    official predictors exactly.
    """
    from segment_anything.utils.transforms import ResizeLongestSide

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}")
    target = ResizeLongestSide.get_preprocess_shape(image.shape[0], image.shape[1], image_size)
    resized = image if target == image.shape[:2] else ResizeLongestSide(image_size).apply_image(image)
    h, w = resized.shape[:2]
    normalised = (resized.astype(np.float32) - np.float32(PIXEL_MEAN)) / np.float32(PIXEL_STD)  # HxWx3
    tensor = torch.zeros(3, image_size, image_size)
    tensor[:, :h, :w] = torch.from_numpy(normalised).permute(2, 0, 1)
    return PreparedImage(tensor, (h, w), image.shape[:2])


def scale_coords(coords: torch.Tensor, original_size: tuple[int, int], image_size: int) -> torch.Tensor:
    """...x2 (x, y) pixel coordinates in the original image -> the resized input frame."""
    new_h, new_w = preprocess_shape(original_size, image_size)
    scale = torch.tensor([new_w / original_size[1], new_h / original_size[0]], dtype=torch.float32,
                         device=coords.device)
    return coords.float() * scale


def input_logits(low_res: torch.Tensor, image_size: int, input_size: tuple[int, int]) -> torch.Tensor:
    """NxCx(S/4)x(S/4) logits -> NxCxhxw in the input frame: upsampled to SxS (bilinear, as SAM
    post-processes), the padding cropped to the resized image's ``input_size`` (h, w)."""
    logits = F.interpolate(low_res, (image_size, image_size), mode="bilinear", align_corners=False)
    return logits[..., : input_size[0], : input_size[1]]


def postprocess_logits(
    low_res: torch.Tensor, image_size: int, input_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """NxCx(S/4)x(S/4) logits -> NxCxHxW at the original size (upsample, crop padding, resize)."""
    logits = input_logits(low_res, image_size, input_size)
    return F.interpolate(logits, original_size, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------
# The forward pass
# --------------------------------------------------------------------------------------------
@dataclass
class PromptTensors:
    """The prompt encoder's input for N objects of one image, in the resized input frame.

    Made from pixel-frame prompts (``prompts.Prompts``) by :func:`make_prompts`.

    boxes: Nx4 xyxy; points: NxKx2 (x, y); point_labels: NxK (1 fg, 0 bg, -1 pad);
    masks: Nx1x(S/4)x(S/4) low-resolution mask logits. Any may be None, not all.
    """

    boxes: torch.Tensor | None = None
    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        for t in (self.boxes, self.points, self.masks):
            if t is not None:
                return int(t.shape[0])
        return 0

    def select(self, rows: slice) -> "PromptTensors":
        """The prompts of the objects in ``rows``."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]

        return PromptTensors(pick(self.boxes), pick(self.points), pick(self.point_labels), pick(self.masks))

    def to(self, device: torch.device | str) -> "PromptTensors":
        """The same prompts on ``device``."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return PromptTensors(move(self.boxes), move(self.points), move(self.point_labels), move(self.masks))

    def single_click(self) -> bool:
        """Whether every object is prompted by one positive point and nothing else (no box, mask
        or negative point; padding ``-1`` aside): SAM's ambiguous case, answered with three
        masks, as SAM and micro-sam train it. The one rule of training (iterative.py) and
        inference (inference.py)."""
        if self.boxes is not None or self.masks is not None or self.point_labels is None:
            return False
        labels = self.point_labels
        return bool(((labels == 1).sum(dim=1) == 1).all() and not (labels == 0).any())


@dataclass
class SamOutput:
    """Per-image output: ``low_res`` NxCx(S/4)x(S/4) logits, ``iou`` NxC predicted IoUs,
    ``logits`` NxCxHxW at the original image size (None when not asked for)."""

    low_res: torch.Tensor
    iou: torch.Tensor
    logits: torch.Tensor | None = None


def encode_images(sam: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Bx3xSxS prepared images -> Bx256x(S/16)x(S/16) image embeddings."""
    return sam.image_encoder(images)


def decode(
    sam: nn.Module, embedding: torch.Tensor, prompts: PromptTensors, multimask_output: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's 256x(S/16)x(S/16) embedding and N prompts -> (NxCx(S/4)x(S/4) logits, NxC IoUs).

    C is 3 with ``multimask_output`` else 1. The decoder runs once for all N prompts.
    """
    points = None
    if prompts.points is not None:
        if prompts.point_labels is None:
            raise ValueError("points need point_labels")
        points = (prompts.points, prompts.point_labels)
    sparse, dense = sam.prompt_encoder(points=points, boxes=prompts.boxes, masks=prompts.masks)
    return sam.mask_decoder(
        image_embeddings=embedding[None],
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
    )


def pick_outputs(outputs: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Output ``best[i]`` of each object i: NxC... -> Nx1... (the chosen mask logits or IoUs)."""
    return outputs[torch.arange(len(best), device=best.device), best][:, None]


def sam_forward(
    sam: nn.Module,
    images: torch.Tensor | None,
    prompts: Sequence[PromptTensors],
    input_sizes: Sequence[tuple[int, int]],
    original_sizes: Sequence[tuple[int, int]] | None = None,
    multimask_output: bool = False,
    image_embeddings: torch.Tensor | None = None,
) -> list[SamOutput]:
    """The one differentiable forward: B prepared images (Bx3xSxS) and their prompts.

    Each image is encoded once and all its prompts are decoded together. Pass
    ``image_embeddings`` (Bx256x(S/16)x(S/16)) instead of ``images`` to skip the encoder (cached
    embeddings for a frozen encoder). With ``original_sizes`` the logits are also returned at
    each image's original size (post-processed as SAM does); without, only low-res logits.
    """
    if image_embeddings is None:
        if images is None:
            raise ValueError("give images or image_embeddings")
        image_embeddings = encode_images(sam, images)
    if len(prompts) != image_embeddings.shape[0]:
        raise ValueError(f"{image_embeddings.shape[0]} images but {len(prompts)} prompt sets")
    image_size = sam.image_encoder.img_size
    outputs = []
    for i, image_prompts in enumerate(prompts):
        low_res, iou = decode(sam, image_embeddings[i], image_prompts, multimask_output)
        logits = None
        if original_sizes is not None:
            logits = postprocess_logits(low_res, image_size, input_sizes[i], original_sizes[i])
        outputs.append(SamOutput(low_res, iou, logits))
    return outputs


def make_prompts(
    original_size: tuple[int, int],
    image_size: int,
    boxes: np.ndarray | torch.Tensor | None = None,
    points: np.ndarray | torch.Tensor | None = None,
    point_labels: np.ndarray | torch.Tensor | None = None,
    mask_inputs: np.ndarray | torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> PromptTensors:
    """Prompts in original pixel coordinates -> :class:`PromptTensors` in the input frame.

    boxes: Nx4 (or 4) xyxy; points: NxKx2, or Kx2 for a single prompt; point_labels: NxK or K;
    mask_inputs: Nx(S/4)x(S/4) or Nx1x(S/4)x(S/4) low-res logits. Raises ``ValueError`` when the
    numbers of prompts disagree.
    """
    def tensor(x: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=dtype, device=device)

    out = PromptTensors()
    if boxes is not None:
        b = tensor(boxes, torch.float32).reshape(-1, 4)
        out.boxes = scale_coords(b.reshape(-1, 2, 2), original_size, image_size).reshape(-1, 4)
    if points is not None:
        if point_labels is None:
            raise ValueError("points were given without point_labels")
        p = tensor(points, torch.float32)
        lab = tensor(point_labels, torch.int64)
        if p.ndim == 2:
            p, lab = p[None], lab.reshape(1, -1)
        if p.ndim != 3 or p.shape[-1] != 2 or lab.shape != p.shape[:2]:
            raise ValueError(f"points must be NxKx2 with labels NxK, got {tuple(p.shape)} and {tuple(lab.shape)}")
        out.points, out.point_labels = scale_coords(p, original_size, image_size), lab.int()
    if mask_inputs is not None:
        m = tensor(mask_inputs, torch.float32)
        out.masks = m[:, None] if m.ndim == 3 else m
    sizes = {int(t.shape[0]) for t in (out.boxes, out.points, out.masks) if t is not None}
    if len(sizes) > 1:
        raise ValueError(f"prompts disagree on the number of objects: {sorted(sizes)}")
    if not sizes:
        raise ValueError("no prompt given: pass boxes, points or mask inputs")
    return out


# --------------------------------------------------------------------------------------------
# Device and precision
# --------------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; ``cuda:K`` the K-th visible GPU (made the
    current device); an unavailable choice is a UserError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available: use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but MPS is not available: use --device cpu or auto")
    if kind == "cuda" and index:
        count = torch.cuda.device_count()
        if not index.isdigit() or int(index) >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1} "
                            "(CUDA_VISIBLE_DEVICES renumbers the visible ones from 0)")
        torch.cuda.set_device(int(index))  # libraries that use "the current device" use this one too
        return torch.device("cuda", int(index))
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:K (the K-th GPU) or mps")
    return torch.device(name)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for ``precision`` (fp32 = no autocast). fp16 needs CUDA."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: use fp32, bf16 or fp16")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if dtype is torch.float16 and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU: use bf16 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)
