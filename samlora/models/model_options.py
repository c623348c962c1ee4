"""The model options every command that builds a model shares: their defaults (:class:`ModelOptions`,
the one place they are defined; TrainConfig and the services take theirs from it) and their flags
(:func:`add_model_arguments`)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from samlora.models.sam import MODEL_REGISTRY, PRECISIONS, SUPPORTED_IMAGE_SIZES


@dataclass(frozen=True)
class ModelOptions:
    """Defaults of the shared model options (the one place they are defined; TrainConfig uses them)."""

    model_type: str = "vit_t"
    checkpoint: str | None = None
    image_size: int = 1024
    device: str = "auto"
    precision: str = "fp32"


def add_model_arguments(parser: argparse.ArgumentParser, from_adapter: bool = False) -> None:
    """The model options shared by every command that builds a model.

    ``from_adapter``: the command may load a LoRA adapter, whose model type and input size are
    then the defaults (``--model_type`` / ``--image_size`` default to None, see adapters.py).
    """
    defaults = ModelOptions()
    group = parser.add_argument_group("model")
    group.add_argument("--model_type", default=None if from_adapter else defaults.model_type,
                       choices=list(MODEL_REGISTRY),
                       help="vit_t = MobileSAM (fast, laptop-friendly); vit_b/l/h = SAM"
                            + (f"; default: the adapter's, else {defaults.model_type}" if from_adapter else ""))
    group.add_argument("--checkpoint", default=defaults.checkpoint,
                       help="base weights (.pth); default: the official file in weights/; "
                            "'none' = random weights (tests, smoke runs)")
    group.add_argument("--image_size", type=int, default=None if from_adapter else defaults.image_size,
                       choices=list(SUPPORTED_IMAGE_SIZES),
                       help="model input side in px; 512 or 256 make CPU training practical"
                            + (f"; default: the adapter's, else {defaults.image_size}" if from_adapter else ""))
    group.add_argument("--device", default=defaults.device,
                       help="auto, cpu, cuda, cuda:K (the K-th visible GPU: one worker per GPU) or mps")
    group.add_argument("--precision", default=defaults.precision, choices=list(PRECISIONS),
                       help="bf16 roughly halves CPU time; fp16 only on CUDA")
