"""What a built model is, carried beside it: :class:`ModelInfo` and the :class:`LoadedModel` pair.

SAM's ``nn.Module`` is third-party code: nothing is attached to it. The builders
(``sam.build_model``, ``trainer.build_trainable_model``) return the module together with a frozen
record of its model type, input size and base weights, and whoever needs those reads the record.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import nn


@dataclass(frozen=True)
class ModelInfo:
    """The identity of a base model: registry key, input size and the weights it was built from.

    ``checkpoint_sha256`` is the SHA-256 of the checkpoint file loaded into it, or None for
    random weights (``--checkpoint none``).
    """

    model_type: str
    image_size: int
    checkpoint_sha256: str | None = None

    @property
    def random_weights(self) -> bool:
        """Whether the base weights are random (no checkpoint was loaded)."""
        return self.checkpoint_sha256 is None


class LoadedModel(NamedTuple):
    """A model and its :class:`ModelInfo` (unpacks as ``sam, info = build_model(...)``)."""

    sam: nn.Module
    info: ModelInfo
