"""LoRA adapter files, and the one way every command builds a base model with an adapter.

An adapter file (:func:`save_adapter`) holds the LoRA tensors, every other parameter that was
trained (e.g. the mask decoder) and the training's config (model type, rank, alpha, targets,
the encoder blocks that carry LoRA (``blocks``, ``--lora_blocks``), input size, base checkpoint SHA-256, fold, seed). :func:`load_finetuned` is how evaluate, demo,
detect and ``train --export_merged`` get a model: the rules for ``--model_type`` /
``--image_size`` against the adapter (:func:`resolve_model_options`), the seed of random base
weights and the warning for other base weights live here and nowhere else.
"""
from __future__ import annotations

import copy
import logging
import math
import numbers
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from samlora.core import runfiles
from samlora.core.errors import UserError
from samlora.models import checkpoints, combined, encoder_blocks, instance_decoder, lora, model_options
from samlora.models import sam as sam_model
from samlora.models.model_info import LoadedModel, ModelInfo

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "samlora-adapter"
ADAPTER_VERSION = 1
BASE_SHA_KEYS = ("base_checkpoint_sha256", "checkpoint_sha256")  # an adapter config holds the base's hash as either


def _plain_config(value: Any, where: str = "config") -> Any:
    """Make ``value`` JSON-like (and loadable with ``weights_only=True``): paths become
    strings, tuples lists, numpy scalars Python numbers; anything else is a ValueError."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain_config(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where} keys must be strings, got {k!r}")
            out[k] = _plain_config(v, f"{where}[{k!r}]")
        return out
    raise ValueError(f"{where} is a {type(value).__name__}; adapter configs hold only "
                     "strings, numbers, booleans, None, lists and dicts")


def _adapter_config(model: nn.Module, config: Mapping[str, Any]) -> dict[str, Any]:
    """The caller's config, completed with rank / alpha / targets / dropout and the encoder
    blocks that carry LoRA (``blocks``; None without encoder LoRA) from the layers when they are
    uniform, and checked against them when given."""
    config = _plain_config(dict(config))
    named = lora.lora_layers(model)
    layers = list(named.values())
    if not layers:
        return config
    blocks = encoder_blocks.blocks_of(model, named) if hasattr(model, "image_encoder") else []
    found: dict[str, Any] = {"targets": lora.injected_targets(model), "blocks": blocks or None}
    for key, values in (("rank", {m.rank for m in layers}), ("alpha", {m.alpha for m in layers}),
                        ("dropout", {float(getattr(m.lora_dropout, "p", 0.0)) for m in layers})):
        if len(values) == 1:
            found[key] = values.pop()
    for key, value in found.items():
        if key not in config:
            config[key] = value
        elif key == "blocks":
            if config[key] != value:
                raise ValueError(f"config blocks {config[key]} differ from the model's LoRA blocks {value}")
        elif key == "targets":
            if sorted(lora.parse_targets(config[key])) != sorted(value):
                raise ValueError(f"config targets {config[key]} differ from the model's LoRA "
                                 f"targets {value}")
        elif key != "dropout" and not math.isclose(float(config[key]), float(value)):
            raise ValueError(f"config {key}={config[key]} differs from the model's LoRA "
                             f"{key}={value}")
    return config


def save_adapter(path: str | os.PathLike, model: nn.Module, config: Mapping[str, Any]) -> Path:
    """Write an adapter file: the LoRA tensors, every other trainable parameter and ``config``.

    The file is ``{"format": "samlora-adapter", "version": 1, "config": config,
    "state_dict": {...}}``. ``config`` is the caller's (model_type, rank, alpha, targets,
    dropout, image_size, base checkpoint SHA-256, fold, ...); rank / alpha / targets / dropout
    and ``blocks`` (the numbered encoder blocks with LoRA) are filled in from the model when absent and must agree with it when present. The write is
    atomic: a temporary file in the same directory, then ``os.replace``; on failure the old
    file is untouched and no temporary file remains. Returns the path.
    """
    path = Path(path)
    lora.check_not_merged(model, "save an adapter")
    config = _adapter_config(model, config)
    state = trained_state(model)
    extra = sum(v.numel() for k, v in state.items() if not lora.is_lora_key(k) and not k.startswith(instance_decoder.PREFIX))
    total = lora.count_parameters(model)[1]
    if extra > total // 2:
        log.warning("the adapter holds %s non-LoRA parameters (%.0f %% of the model): was "
                    "mark_only_lora_as_trainable called?", f"{extra:,}", 100.0 * extra / total)
    if not state:
        raise UserError("nothing to save: the model has no LoRA layers and no trainable "
                        "parameters")
    payload = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "config": config,
               "state_dict": state}
    runfiles.torch_save(payload, path)
    log.info("saved adapter %s (%d tensors, %.2f MB)", path, len(state),
             path.stat().st_size / 1e6)
    return path


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: the LoRA tensors, every parameter with ``requires_grad`` (e.g. the
    mask decoder) and the whole AIS decoder the model carries (``instance_decoder.*``, its
    BatchNorm statistics included), as contiguous CPU copies."""
    state = lora.lora_state_dict(model)
    state.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and n not in state})
    if instance_decoder.attached(model) is not None:  # its BatchNorm statistics too: a complete decoder_state
        state.update({instance_decoder.PREFIX + k: v for k, v in instance_decoder.decoder_state(model).items()})
    return {k: v.cpu().contiguous() for k, v in state.items()}


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check an adapter file without a model: ``(config, state_dict)``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"adapter file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise UserError(f"{path.name} is not a LoRA adapter file (cannot be read by torch.load: "
                        f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0].split('. ')[0]})"
                        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != ADAPTER_FORMAT:
        kind = "a state dict or checkpoint" if isinstance(payload, dict) else type(payload).__name__
        raise UserError(f"{path.name} is not a LoRA adapter file (found {kind} without "
                        f"format={ADAPTER_FORMAT!r}); a full model checkpoint goes to "
                        "--checkpoint instead")
    version = payload.get("version")
    if version != ADAPTER_VERSION:
        raise UserError(f"{path.name}: adapter format version {version!r} is not supported "
                        f"(this code reads version {ADAPTER_VERSION})")
    config, state = payload.get("config"), payload.get("state_dict")
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise UserError(f"{path.name}: damaged adapter file (config or state_dict missing)")
    return config, state


def load_adapter(path: str | os.PathLike, model: nn.Module) -> dict[str, Any]:
    """Load an adapter written by :func:`save_adapter` into ``model``; returns its config.

    When ``model`` has no LoRA layers yet they are injected from the config (rank, alpha,
    targets, dropout); otherwise the model's layers must match the file. Raises ``ValueError``
    (:class:`errors.UserError`) naming the file when it is not an adapter, when keys are missing
    or unexpected (a few are listed), or when shapes differ (e.g. another rank).
    """
    path = Path(path)
    config, state = read_adapter(path)
    lora.check_not_merged(model, "load an adapter")
    injected: list[str] = []
    if not lora.lora_layers(model) and any(lora.is_lora_key(k) for k in state):
        missing = [k for k in ("rank", "alpha", "targets") if k not in config]
        if missing:
            raise UserError(f"{path.name}: the model has no LoRA layers and the adapter config "
                            f"lacks {', '.join(missing)}; call inject_lora first")
        try:
            injected = lora.inject_lora(model, config["rank"], config["alpha"], config["targets"],
                                        config.get("dropout", 0.0), config.get("blocks"))
        except ValueError as exc:
            raise UserError(f"{path.name}: cannot inject LoRA from its config: {exc}") from exc
    attached = _attach_decoder(model, state, path)
    try:
        lora.load_lora_state_dict(model, state, path.name)
    except ValueError:
        lora.remove_lora(model, injected)  # leave the model as it came
        if attached:
            delattr(model, instance_decoder.ATTRIBUTE)
        raise
    log.info("loaded adapter %s (%d tensors)", path, len(state))
    return config


def has_decoder(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether an adapter's state holds an AIS decoder (``train --instance_decoder``)."""
    return any(k.startswith(instance_decoder.PREFIX) for k in state)


def _attach_decoder(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> bool:
    """Give ``model`` the AIS decoder an adapter's state holds, built from its tensors' shapes,
    when the model has none; returns whether one was attached."""
    if not has_decoder(state) or instance_decoder.attached(model) is not None:
        return False
    _, decoder_part = instance_decoder.split_state(state)
    try:
        decoder = instance_decoder.decoder_from_state(decoder_part, model.image_encoder.img_size)
    except ValueError as exc:
        raise UserError(f"{path.name}: damaged instance decoder: {exc}") from None
    instance_decoder.attach(model, decoder)
    return True


def base_sha256(config: Mapping[str, Any]) -> str | None:
    """The SHA-256 of the base weights an adapter was trained on (None: random weights)."""
    return next((config[k] for k in BASE_SHA_KEYS if config.get(k)), None)


def resolve_model_options(model_type: str | None, image_size: int | None,
                          adapters: Mapping[Path, Mapping[str, Any]],
                          run_config: Mapping[str, Any] | None = None) -> tuple[str, int]:
    """``(model_type, image_size)`` for a base model that will carry these adapters.

    A flag that is given must agree with every adapter (another value is refused: the adapter
    was trained for its own size and type); a flag left out (None) takes the adapters' common
    value, else the training run's, else the defaults of ``model_options.ModelOptions``.
    """
    defaults = model_options.ModelOptions()
    chosen: list[Any] = []
    for key, flag, explicit, fallback in (("model_type", "--model_type", model_type, defaults.model_type),
                                          ("image_size", "--image_size", image_size, defaults.image_size)):
        found: dict[Any, Path] = {}
        for path, config in adapters.items():
            if config.get(key) is not None:
                found.setdefault(config[key], path)
        if explicit is not None:
            for value, path in found.items():
                if value != explicit:
                    raise UserError(f"{path} is an adapter for {key} {value} but {flag} is {explicit}: "
                                    f"pass {flag} {value} (or leave it out to take it from the adapter)")
            chosen.append(explicit)
        elif len(found) > 1:
            (a, pa), (b, pb) = list(found.items())[:2]
            raise UserError(f"the adapters disagree on {key}: {pa} has {a}, {pb} has {b}; "
                            "use them in separate runs")
        elif found:
            chosen.append(next(iter(found)))
        elif run_config and run_config.get(key) is not None:
            chosen.append(run_config[key])
        else:
            chosen.append(fallback)
    return str(chosen[0]), int(chosen[1])


class BaseModels:
    """Builds a base model once (per seed, for random weights) and hands out fresh copies."""

    def __init__(self, model_type: str, checkpoint: Path | None, image_size: int,
                 device: torch.device | str = "cpu") -> None:
        self.model_type, self.checkpoint, self.image_size = model_type, checkpoint, image_size
        self.device = torch.device(device)
        self._built: dict[int | None, LoadedModel] = {}

    @property
    def random_weights(self) -> bool:
        return self.checkpoint is None

    def get(self, seed: int = 0) -> nn.Module:
        """A fresh copy of the base model in eval mode on the CPU. Random weights are drawn after
        ``torch.manual_seed(seed)``, as the trainer draws them, so an adapter trained on random
        weights meets the very same ones; loaded weights do not depend on the seed."""
        return copy.deepcopy(self._build(seed).sam)

    def info(self, seed: int = 0) -> ModelInfo:
        """The :class:`ModelInfo` of the base model :meth:`get` hands out for ``seed``."""
        return self._build(seed).info

    def _build(self, seed: int) -> LoadedModel:
        key = seed if self.checkpoint is None else None
        if key not in self._built:
            torch.manual_seed(seed)
            self._built[key] = combined.build_model(self.model_type, self.checkpoint, self.image_size)
        return self._built[key]

    def carries_decoder(self) -> bool:
        """Whether the base checkpoint is a combined file with a ``decoder_state`` (read
        memory-mapped, without building a model)."""
        return self.checkpoint is not None and checkpoints.read_checkpoint(self.checkpoint)[1] is not None

    @property
    def sha256(self) -> str | None:
        """SHA-256 of the base weights (None for random weights)."""
        return None if self.checkpoint is None else self.info().checkpoint_sha256


def load_finetuned(bases: BaseModels, adapter: str | os.PathLike | None = None, seed: int = 0,
                   merge: bool = True) -> nn.Module:
    """The base model with ``adapter`` loaded (and merged for speed), in eval mode on the device.

    Random base weights come from the adapter's training seed (``seed`` without an adapter).
    An adapter trained on other base weights than ``bases`` holds is used with a warning.
    """
    if adapter is None:
        return bases.get(seed).to(bases.device).eval()
    config, _ = read_adapter(adapter)
    sam, base = bases.get(int(config.get("seed", seed))), bases.sha256
    expected = base_sha256(config)
    if expected != base:
        have = base[:12] + "..." if base else "random weights"
        want = expected[:12] + "..." if expected else "random weights"
        log.warning("%s was trained on base weights %s but the base model here has %s: its outputs may "
                    "be meaningless (pass the training's --checkpoint)", adapter, want, have)
    load_adapter(adapter, sam)
    if merge:
        lora.merge_lora(sam)
    return sam.to(bases.device).eval()


def bases_from_flags(model_type: str | None, image_size: int | None, checkpoint: str | None, device: str,
                     adapters: Mapping[Path, Mapping[str, Any]] = {},
                     run_config: Mapping[str, Any] | None = None) -> BaseModels:
    """The base model factory the model options describe: type and size from flags, adapters or
    run (:func:`resolve_model_options`), weights resolved (a missing file is a UserError)."""
    model_type, image_size = resolve_model_options(model_type, image_size, adapters, run_config)
    resolved = checkpoints.resolve_checkpoint(model_type, checkpoint)
    return BaseModels(model_type, resolved, image_size, sam_model.resolve_device(device))
