"""The optimiser's parameter groups (what weight decay applies to) and the learning-rate schedule."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


# Learned position tables held as bare parameters (SAM ViT's absolute and relative position
# embeddings, TinyViT's attention biases): embeddings by kind, though not nn.Embedding modules.
POSITION_TABLES = ("pos_embed", "rel_pos_h", "rel_pos_w", "attention_biases")


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (torch's, or SAM's / TinyViT's LayerNorm2d)."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or \
        type(module).__name__.endswith(("Norm", "Norm2d"))


def param_groups(sam: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters in two AdamW groups: weight decay on weight matrices (LoRA
    factors, linear and convolution weights, the decoder's attention included), none by kind on
    biases and other vectors, norm layers and embeddings (``nn.Embedding`` such as SAM's tokens,
    and the position tables), whatever their names say."""
    decay, plain = [], []
    for module in sam.modules():
        for leaf, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                exempt = p.ndim < 2 or isinstance(module, nn.Embedding) or is_norm_layer(module) or \
                    leaf in POSITION_TABLES
                (plain if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def make_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 0 over ``total_steps``."""
    warmup = int(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
