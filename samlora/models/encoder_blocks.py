"""The image encoder as numbered blocks: which blocks ``--lora_blocks`` names, and the encoder run
up to a block and on from it (late LoRA: the frozen blocks before the first adapted one are cached).

Numbering. SAM ViT (vit_b / vit_l / vit_h): block k is ``image_encoder.blocks.k`` (0-11, 0-23,
0-31). MobileSAM's TinyViT: its transformer blocks are numbered in order across its stages, 0-9:
stage 1 ``layers.1.blocks.0-1`` are blocks 0-1, stage 2 ``layers.2.blocks.0-5`` blocks 2-7 and the
last stage ``layers.3.blocks.0-1`` blocks 8-9 (``last2``). Stage 0 (``layers.0``) is convolutional
(MBConv): it has none of LoRA's layers and belongs to the stem, so it has no number. These are the
blocks LoRA's encoder targets find (lora.TARGETS): one block number, one set of adapted layers.

A ``--lora_blocks`` spec: ``all``; ``lastN`` (the last N blocks); or comma-separated indices and
ranges ``A-B`` (inclusive), e.g. ``6-11`` or ``0,9-11``.

Two halves of one forward: :func:`run_to_block` gives the input of block k (SAM ViT: BxHxWxC
tokens after the patch and position embedding; TinyViT: BxLxC tokens), :func:`run_from_block`
runs blocks k.. and the neck on it (-> Bx256x(S/16)x(S/16)); composed they are the encoder's own
forward for every k (tested). :func:`qv_output_mask` knows each backbone's qkv output layout.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from samlora.core.errors import UserError

Step = Callable[[torch.Tensor], torch.Tensor]

# The input of each block as (stride in input pixels, channels): its cached activation holds
# (S/stride)^2 x channels values. Checked against the built models (tests/test_encoder_blocks.py).
BLOCK_INPUTS: dict[str, tuple[tuple[int, int], ...]] = {
    "vit_t": ((8, 128),) * 2 + ((16, 160),) * 6 + ((16, 320),) * 2,
    "vit_b": ((16, 768),) * 12,
    "vit_l": ((16, 1024),) * 24,
    "vit_h": ((16, 1280),) * 32,
}


def _encoder(model: nn.Module) -> nn.Module:
    """The image encoder of a SAM model (or the encoder itself)."""
    return getattr(model, "image_encoder", model)


def _is_tinyvit(encoder: nn.Module) -> bool:
    return isinstance(getattr(encoder, "layers", None), nn.ModuleList)


def block_names(model: nn.Module) -> list[str]:
    """The module name of each numbered block, relative to the encoder: ``blocks.k`` (SAM ViT),
    ``layers.s.blocks.j`` (TinyViT, stages 1..)."""
    encoder = _encoder(model)
    if _is_tinyvit(encoder):
        return [f"layers.{s}.blocks.{j}" for s, layer in enumerate(encoder.layers) if s > 0
                for j in range(len(layer.blocks))]
    if isinstance(getattr(encoder, "blocks", None), nn.ModuleList):
        return [f"blocks.{k}" for k in range(len(encoder.blocks))]
    raise UserError(f"{type(encoder).__name__} is neither SAM's ViT nor MobileSAM's TinyViT: it has no "
                    "numbered blocks for --lora_blocks")


def parse_blocks(spec: str, count: int) -> tuple[int, ...]:
    """``"all"`` / ``"last3"`` / ``"0,6-11"`` -> the sorted block indices among ``count`` blocks.
    A bad spec is a UserError naming ``--lora_blocks`` and the valid range."""
    text = str(spec).strip().lower()
    where = f"--lora_blocks {spec!r}"
    if text == "all":
        return tuple(range(count))
    if text.startswith("last"):
        n = _int(text[4:], where)
        if not 1 <= n <= count:
            raise UserError(f"{where}: lastN needs N in 1..{count} (this encoder has {count} blocks)")
        return tuple(range(count - n, count))
    chosen: set[int] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        first, sep, last = item.partition("-")
        lo, hi = _int(first, where), _int(last, where) if sep else _int(first, where)
        if not 0 <= lo <= hi < count:
            raise UserError(f"{where}: {item} is outside blocks 0-{count - 1} (or a range that runs backwards)")
        chosen.update(range(lo, hi + 1))
    if not chosen:
        raise UserError(f"{where}: give all, lastN or block indices and ranges such as 6-11")
    return tuple(sorted(chosen))


def _int(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not a block number; write all, lastN or indices and ranges "
                        "such as 0,6-11") from None


def block_count(model_type: str) -> int:
    """Numbered blocks of a model type's encoder."""
    if model_type not in BLOCK_INPUTS:
        raise UserError(f"unknown model type {model_type!r}: choose one of {', '.join(BLOCK_INPUTS)}")
    return len(BLOCK_INPUTS[model_type])


def block_input_bytes(model_type: str, image_size: int, block: int, precision: str) -> int:
    """Bytes of one image's cached input of ``block`` (stored in :func:`storage_dtype`)."""
    stride, channels = BLOCK_INPUTS[model_type][block]
    return (image_size // stride) ** 2 * channels * storage_dtype(precision).itemsize


def storage_dtype(precision: str) -> torch.dtype:
    """The dtype cached activations are kept in: float32 for fp32 training, else bfloat16 (half
    the memory, float32's range: residual streams of deep blocks can outgrow float16)."""
    return torch.float32 if precision == "fp32" else torch.bfloat16


def block_prefixes(model: nn.Module, blocks: Iterable[int] | None) -> tuple[str, ...] | None:
    """Module-name prefixes (``image_encoder.blocks.9.``) of the chosen blocks in ``model``, for
    injecting LoRA by name; None (everywhere) for ``blocks=None``."""
    if blocks is None:
        return None
    names = block_names(model)
    chosen = sorted(set(int(b) for b in blocks))
    bad = [b for b in chosen if not 0 <= b < len(names)]
    if bad or not chosen:
        raise UserError(f"LoRA blocks {chosen} do not exist: this encoder has blocks 0-{len(names) - 1}")
    prefix = "image_encoder." if hasattr(model, "image_encoder") else ""
    return tuple(f"{prefix}{names[b]}." for b in chosen)


def blocks_of(model: nn.Module, layer_names: Iterable[str]) -> list[int]:
    """The numbered blocks that hold any of ``layer_names`` (full module names), sorted."""
    prefix = "image_encoder." if hasattr(model, "image_encoder") else ""
    names = [f"{prefix}{name}." for name in block_names(model)]
    layers = list(layer_names)
    return [k for k, name in enumerate(names) if any(layer.startswith(name) for layer in layers)]


def _steps(encoder: nn.Module) -> list[tuple[int | None, Step]]:
    """The encoder's forward as steps in order, each with its block number (None: stem, merging
    and neck steps)."""
    if _is_tinyvit(encoder):
        steps: list[tuple[int | None, Step]] = [(None, encoder.patch_embed), (None, encoder.layers[0])]
        number = 0
        for layer in encoder.layers[1:]:
            for block in layer.blocks:
                steps.append((number, block))
                number += 1
            if layer.downsample is not None:
                steps.append((None, layer.downsample))
        side = encoder.img_size // 16
        steps.append((None, lambda x: encoder.neck(x.view(x.shape[0], side, side, x.shape[-1]).permute(0, 3, 1, 2))))
        return steps

    def stem(x: torch.Tensor) -> torch.Tensor:
        x = encoder.patch_embed(x)
        return x if encoder.pos_embed is None else x + encoder.pos_embed

    return [(None, stem), *enumerate(encoder.blocks), (None, lambda x: encoder.neck(x.permute(0, 3, 1, 2)))]


def _position(steps: Sequence[tuple[int | None, Step]], block: int) -> int:
    for i, (number, _) in enumerate(steps):
        if number == block:
            return i
    raise ValueError(f"block {block} does not exist: the encoder has blocks 0-"
                     f"{max(n for n, _ in steps if n is not None)}")


def run_to_block(encoder: nn.Module, images: torch.Tensor, block: int) -> torch.Tensor:
    """Bx3xSxS prepared images -> the input of numbered ``block`` (everything before it run)."""
    steps = _steps(encoder)
    x = images
    for _, step in steps[:_position(steps, block)]:
        x = step(x)
    return x


def run_from_block(encoder: nn.Module, x: torch.Tensor, block: int) -> torch.Tensor:
    """The input of numbered ``block`` (from :func:`run_to_block`) -> Bx256x(S/16)x(S/16) image
    embeddings: that block, every later step and the neck."""
    steps = _steps(encoder)
    for _, step in steps[_position(steps, block):]:
        x = step(x)
    return x


def encode(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Bx3xSxS prepared images -> Bx256x(S/16)x(S/16): every step in order (the whole forward)."""
    x = images
    for _, step in _steps(encoder):
        x = step(x)
    return x


def qv_output_mask(attention: nn.Module, qkv: nn.Linear) -> torch.Tensor:
    """0/1 mask over ``qkv``'s outputs that is 1 on q and v features and 0 on k features.

    SAM ViT (``segment_anything`` ``Attention``: ``reshape(B, N, 3, heads, -1)``): outputs are
    ``[q | k | v]`` blocks of ``dim`` each. TinyViT (``Attention`` with ``key_dim`` and ``d``:
    ``view(B, N, heads, -1).split([key_dim, key_dim, d])``): each head owns a chunk of
    ``2 * key_dim + d`` outputs laid out ``[q_h | k_h | v_h]``.
    """
    out = qkv.out_features
    heads = getattr(attention, "num_heads", None)
    key_dim = getattr(attention, "key_dim", None)
    d = getattr(attention, "d", None)
    if isinstance(heads, int) and isinstance(key_dim, int) and isinstance(d, int):
        per_head = 2 * key_dim + d  # TinyViT
        if heads * per_head != out:
            raise UserError(f"TinyViT-style qkv with {heads} heads x (2*{key_dim}+{d}) does not match its "
                            f"{out} outputs; use the 'qkv' target")
        chunk = torch.ones(per_head)
        chunk[key_dim:2 * key_dim] = 0
        return chunk.repeat(heads)
    if isinstance(heads, int) and out % 3 == 0 and (out // 3) % heads == 0:
        dim = out // 3  # SAM ViT: [q | k | v]
        mask = torch.ones(out)
        mask[dim:2 * dim] = 0
        return mask
    raise UserError(f"unknown qkv layout in {type(attention).__module__}.{type(attention).__name__}; "
                    "the 'qv' target supports SAM ViT and TinyViT, use 'qkv' instead")
