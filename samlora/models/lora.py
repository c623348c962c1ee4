"""Hand-written LoRA for SAM (ViT) and MobileSAM (TinyViT): the layer, where it goes, merging.

A :class:`LoRALinear` wraps a frozen ``nn.Linear`` (kept as ``.base``) and adds a low-rank
update on a side path::

    y = base(x) + (dropout(x) @ lora_A.T @ lora_B.T) * scaling        scaling = alpha / rank

``lora_A`` (rank x in) is Kaiming-uniform initialised and ``lora_B`` (out x rank) starts at zero,
so a freshly injected model computes exactly what the base model computes.

Where LoRA goes is chosen by name from :data:`TARGETS` (``--lora_targets qkv,proj,mlp,decoder``).
Layers are found by walking ``named_modules()`` of the right sub-module (``image_encoder`` for the
encoder targets, ``mask_decoder`` for ``decoder``), matching the parent module's class name and the
child attribute name, and replaced through the parent with ``setattr``; ``blocks`` (``--lora_blocks``,
encoder_blocks.py) keeps the encoder targets to some numbered encoder blocks.

``qkv`` layouts differ: SAM ViT's fused qkv output is ``[q | k | v]``
blocks of ``dim`` each, MobileSAM's TinyViT lays it out per head, ``[q_h | k_h | v_h]`` for each
head h (``view(B, N, heads, -1).split([key_dim, key_dim, d])``). The ``qkv`` target adapts the
whole output and is layout-free; the ``qv`` target adapts only the q and v outputs through a
per-architecture output mask (:func:`encoder_blocks.qv_output_mask`).

:func:`merged_state_dict` exports a plain state dict that the unmodified ``segment_anything`` /
``mobile_sam`` models load with ``strict=True``; adapter files are adapters.py's.
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from samlora.core.errors import UserError
from samlora.models import encoder_blocks

log = logging.getLogger(__name__)

_LORA_SUFFIXES = ("lora_A", "lora_B")


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    Args:
        base: the layer to adapt; it is kept as ``self.base`` and its parameters are frozen.
        rank: inner dimension r of the update (> 0).
        alpha: scale numerator; the update is multiplied by ``alpha / rank``.
        dropout: dropout probability on the LoRA path only (``base(x)`` never sees it).
        out_mask: optional ``(out_features,)`` 0/1 tensor; output features where it is 0 get no
            update (used by the ``qv`` target). Stored as a non-persistent buffer.
        target: the :data:`TARGETS` name that created this layer (informational).

    Input ``...xIN``, output ``...xOUT``, like the wrapped layer. ``merge()`` folds the update
    into ``base.weight`` and ``unmerge()`` takes it out again; the ``merged`` flag says which
    state the layer is in. ``.eval()`` / ``.train()`` never merge.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        out_mask: torch.Tensor | None = None,
        target: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        _check_hyperparameters(rank, alpha, dropout)
        self.base = base
        self.base.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        self.target = target
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if out_mask is not None:
            out_mask = torch.as_tensor(out_mask).to(**factory).flatten()
            if out_mask.numel() != self.out_features:
                raise ValueError(
                    f"out_mask has {out_mask.numel()} entries, the layer has "
                    f"{self.out_features} outputs"
                )
        self.register_buffer("lora_out_mask", out_mask, persistent=False)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """The update ``scaling * (B * mask) @ A`` as an ``OUTxIN`` tensor (base.weight's shape)."""
        lora_B = self.lora_B
        if self.lora_out_mask is not None:
            lora_B = lora_B * self.lora_out_mask[:, None]
        return (lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``...xIN -> ...xOUT``."""
        result = self.base(x)
        if self.merged:
            return result
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        update = update * self.scaling
        if self.lora_out_mask is not None:
            update = update * self.lora_out_mask
        return result + update.to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update to ``base.weight`` (no-op if already merged)."""
        if not self.merged:
            self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from ``base.weight`` again (no-op if not merged)."""
        if self.merged:
            self.base.weight.sub_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        mask = "" if self.lora_out_mask is None else (
            f", adapted_outputs={int(self.lora_out_mask.sum())}/{self.out_features}"
        )
        return (
            f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, "
            f"target={self.target}, merged={self.merged}{mask}"
        )


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where one ``--lora_targets`` name puts LoRA.

    ``scope``: the sub-module searched (``image_encoder`` or ``mask_decoder``); a model without
    that attribute (a bare encoder or block) is searched whole. ``parents``: class names of the
    module that owns the layer (any class in its MRO). ``children``: the attribute names of the
    ``nn.Linear`` layers to wrap. ``qv_only``: adapt only the q and v outputs of a fused qkv.
    """

    description: str
    scope: str
    parents: tuple[str, ...]
    children: tuple[str, ...]
    qv_only: bool = False


TARGETS: dict[str, Target] = {
    "qkv": Target(
        "image encoder attention qkv projection, whole output (SAM ViT Attention.qkv, "
        "TinyViT Attention.qkv)",
        "image_encoder", ("Attention",), ("qkv",),
    ),
    "qv": Target(
        "like qkv but only the q and v outputs are adapted (per-architecture output mask); "
        "excludes qkv",
        "image_encoder", ("Attention",), ("qkv",), qv_only=True,
    ),
    "proj": Target(
        "image encoder attention output projection (SAM ViT and TinyViT Attention.proj)",
        "image_encoder", ("Attention",), ("proj",),
    ),
    "mlp": Target(
        "image encoder MLP layers (SAM ViT MLPBlock.lin1/lin2, TinyViT Mlp.fc1/fc2)",
        "image_encoder", ("MLPBlock", "Mlp"), ("lin1", "lin2", "fc1", "fc2"),
    ),
    "decoder": Target(
        "mask decoder transformer attention q_proj/k_proj/v_proj/out_proj (all attention "
        "modules of mask_decoder.transformer)",
        "mask_decoder", ("Attention",), ("q_proj", "k_proj", "v_proj", "out_proj"),
    ),
}
DEFAULT_TARGETS: tuple[str, ...] = ("qkv",)


def parse_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """``"qkv,proj"`` or ``["qkv", "proj"]`` -> ``("qkv", "proj")``, checked against TARGETS."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise UserError(f"LoRA target names are strings, got {item!r}")
        name = item.strip()
        if name and name not in names:
            names.append(name)
    if not names:
        raise UserError(f"no LoRA targets given; choose from {', '.join(TARGETS)}")
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise UserError(
            f"unknown LoRA target(s) {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(TARGETS)}"
        )
    if "qkv" in names and "qv" in names:
        raise UserError("LoRA targets 'qkv' and 'qv' adapt the same layers; choose one")
    return tuple(names)


def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def _scope(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """The sub-module a target searches, with its name prefix ('' for the whole model)."""
    sub = getattr(model, name, None)
    if isinstance(sub, nn.Module):
        return name + ".", sub
    if any(isinstance(getattr(model, s, None), nn.Module) for s in ("image_encoder", "mask_decoder")):
        raise UserError(f"the model has no {name!r}, which this LoRA target needs")
    return "", model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in ``model`` by its module name, in ``named_modules`` order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _check_hyperparameters(rank: Any, alpha: Any, dropout: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
        raise UserError(f"LoRA rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0 \
            or not math.isfinite(alpha):
        raise UserError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) \
            or not 0.0 <= dropout < 1.0:
        raise UserError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def _plan_target(model: nn.Module, target_name: str, within: tuple[str, ...] | None
                 ) -> tuple[list[tuple[str, nn.Module, str, str, torch.Tensor | None]], list[str]]:
    """The layers one target would wrap (full name, parent, attribute, target, output mask) and
    those of it already wrapped; encoder layers only under the block prefixes ``within``."""
    target = TARGETS[target_name]
    prefix, root = _scope(model, target.scope)
    plan, already = [], []
    for parent_name, parent in root.named_modules():
        if not _class_names(parent) & set(target.parents):
            continue
        for child_name in target.children:
            child = getattr(parent, child_name, None)
            full = prefix + (f"{parent_name}.{child_name}" if parent_name else child_name)
            if within is not None and target.scope == "image_encoder" and not full.startswith(within):
                continue
            if isinstance(child, LoRALinear):
                already.append(full)
            elif isinstance(child, nn.Linear):
                mask = encoder_blocks.qv_output_mask(parent, child) if target.qv_only else None
                plan.append((full, parent, child_name, target_name, mask))
    return plan, already


def _no_match(model: nn.Module, target_name: str, names: Sequence[str]) -> UserError:
    """The error for a target that matched no layer: what it looks for and the linear layers present."""
    target = TARGETS[target_name]
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    shown = ", ".join(linear[:8]) + (f", ... ({len(linear)} in all)" if len(linear) > 8 else "")
    return UserError(
        f"LoRA target {target_name!r} (of requested {', '.join(names)}) matched no layer "
        f"in {type(model).__name__}: it looks for {'/'.join(target.children)} in "
        f"{'/'.join(target.parents)} modules under {target.scope!r}. Linear layers "
        f"present: {shown or 'none'}"
    )


def inject_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: str | Iterable[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    blocks: Iterable[int] | None = None,
) -> list[str]:
    """Wrap the layers named by ``targets`` (see :data:`TARGETS`) in :class:`LoRALinear`.

    ``blocks``: the numbered encoder blocks that get the encoder targets (encoder_blocks.py; None:
    all). Returns the full module names of the wrapped layers, e.g.
    ``image_encoder.blocks.0.attn.qkv``. Raises ``ValueError`` (:class:`errors.UserError`) for a
    bad rank / alpha / dropout, an unknown target, a target that matches no layer of this model
    (the message lists the targets and the linear layers that exist), or a layer that is already
    wrapped (injecting twice is an error, not a silent no-op). Nothing is modified on error.
    """
    _check_hyperparameters(rank, alpha, dropout)
    names = parse_targets(targets)
    within = encoder_blocks.block_prefixes(model, blocks)
    # (full name, parent, attribute, target, output mask): all checks happen before any change
    plan: list[tuple[str, nn.Module, str, str, torch.Tensor | None]] = []
    already: list[str] = []
    for target_name in names:
        found, wrapped_before = _plan_target(model, target_name, within)
        if not found and not wrapped_before:
            raise _no_match(model, target_name, names)
        plan += found
        already += wrapped_before
    if already:
        raise UserError(
            f"{len(already)} layer(s) already carry LoRA (inject_lora called twice?), e.g. "
            f"{', '.join(already[:3])}"
        )
    wrapped: list[str] = []
    for full, parent, child_name, target_name, mask in plan:
        base = getattr(parent, child_name)
        setattr(parent, child_name, LoRALinear(base, rank, alpha, dropout, mask, target_name))
        wrapped.append(full)
    log.info("LoRA rank %d, alpha %g, dropout %g on %d layers (targets: %s%s)", rank, alpha, dropout,
             len(wrapped), ", ".join(names), "" if blocks is None else f"; encoder blocks {sorted(set(blocks))}")
    return wrapped


def remove_lora(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Put the base ``nn.Linear`` back in place of LoRA layers (all, or those in ``names``),
    discarding their updates (merge first to keep them); returns the names unwrapped."""
    layers = lora_layers(model)
    chosen = list(layers) if names is None else list(names)
    unknown = [n for n in chosen if n not in layers]
    if unknown:
        raise ValueError(f"not LoRA layers: {_few(unknown)}")
    for name in chosen:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, layers[name].base)
    return chosen


def injected_targets(model: nn.Module) -> list[str]:
    """The :data:`TARGETS` names of the LoRA layers in ``model``, in registry order."""
    found = {layer.target for layer in lora_layers(model).values()}
    return [name for name in TARGETS if name in found]


# --------------------------------------------------------------------------------------------
# Merge, freeze, count
# --------------------------------------------------------------------------------------------
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight (for fast inference); returns the count."""
    layers = lora_layers(model)
    for layer in layers.values():
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo :func:`merge_lora`; returns the number of LoRA layers."""
    layers = lora_layers(model)
    for layer in layers.values():
        layer.unmerge()
    return len(layers)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared parameters counted once)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def mark_only_lora_as_trainable(model: nn.Module, train_decoder: bool = False) -> tuple[int, int]:
    """Freeze everything except ``lora_A`` / ``lora_B`` (and, when ``train_decoder``, the whole
    ``mask_decoder`` with the prompt encoder's ``mask_downscaling``, which embeds the mask prompt
    every correction round feeds); logs and returns ``(trainable, total)``."""
    layers = lora_layers(model)
    if not layers and not train_decoder:
        raise UserError("the model has no LoRA layers (call inject_lora first), nothing to train")
    model.requires_grad_(False)
    if train_decoder:
        decoder = getattr(model, "mask_decoder", None)
        if not isinstance(decoder, nn.Module):
            raise UserError("train_decoder=True but the model has no mask_decoder")
        decoder.requires_grad_(True)
        downscaling = getattr(getattr(model, "prompt_encoder", None), "mask_downscaling", None)
        if isinstance(downscaling, nn.Module):
            downscaling.requires_grad_(True)
    for layer in layers.values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    trainable, total = count_parameters(model)
    log.info("trainable parameters: %s / %s (%.2f %%)%s", f"{trainable:,}", f"{total:,}",
             100.0 * trainable / max(total, 1), " incl. the mask decoder" if train_decoder else "")
    return trainable, total


# --------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------
def is_lora_key(key: str) -> bool:
    """Whether a state-dict key names a LoRA tensor (``...lora_A`` / ``...lora_B``)."""
    return key.rsplit(".", 1)[-1] in _LORA_SUFFIXES


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ``lora_A`` / ``lora_B`` tensors by their state-dict key (detached copies)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if is_lora_key(k)}


def check_not_merged(model: nn.Module, action: str) -> None:
    """Refuse ``action`` on a model whose LoRA is merged into the base weights."""
    merged = [n for n, layer in lora_layers(model).items() if layer.merged]
    if merged:
        raise UserError(f"cannot {action} while LoRA is merged ({merged[0]}, ...); "
                        "call unmerge_lora(model) first")


def _few(keys: Iterable[str], n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _validate_state(model: nn.Module, state: Mapping[str, Any], where: str) -> None:
    """Missing LoRA keys, keys the model lacks, non-tensors and shape mismatches -> ValueError."""
    model_state = model.state_dict()
    model_lora = {k for k in model_state if is_lora_key(k)}
    if not model_lora and any(is_lora_key(k) for k in state):
        raise UserError(f"{where}: the model has no LoRA layers; call inject_lora with the "
                        "adapter's rank, alpha and targets first")
    missing = model_lora - set(state)
    unexpected = set(state) - set(model_state)
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if problems:
        raise UserError(f"{where} does not fit this model (other targets or model type?): "
                        + "; ".join(problems))
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{where}: {key} is a {type(value).__name__}, not a tensor")
        if value.shape != model_state[key].shape:
            hint = " (a different LoRA rank?)" if is_lora_key(key) else ""
            raise UserError(f"{where}: shape mismatch for {key}: {tuple(value.shape)} in the "
                            f"adapter, {tuple(model_state[key].shape)} in the model{hint}")


def load_lora_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor],
                         where: str = "LoRA state dict") -> None:
    """Load tensors saved by :func:`lora_state_dict` (or an adapter's ``state_dict``).

    Every LoRA tensor of ``model`` must be present; other keys must exist in the model (they are
    trained parameters such as the decoder's) and all shapes must match, else ``ValueError``.
    """
    check_not_merged(model, "load LoRA weights")
    _validate_state(model, state, where)
    model.load_state_dict(dict(state), strict=False)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with LoRA folded in and the wrappers gone.

    Keys are those of the un-wrapped ``segment_anything`` / ``mobile_sam`` model
    (``...attn.qkv.weight``, not ``...qkv.base.weight``; no ``lora_A`` / ``lora_B``), so
    ``sam_model_registry[t]().load_state_dict(sd, strict=True)`` works. The model itself is not
    changed (merged or not, it stays as it is); the tensors are copies.
    """
    layers = lora_layers(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf in _LORA_SUFFIXES:
            continue
        layer_name, _, tag = owner.rpartition(".")
        value = value.detach().clone()
        if tag == "base" and layer_name in layers:
            layer = layers[layer_name]
            if leaf == "weight" and not layer.merged:
                with torch.no_grad():
                    value += layer.delta_weight().to(value.dtype)
            key = f"{layer_name}.{leaf}"
        out[key] = value
    return out
