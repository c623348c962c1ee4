"""The training configuration: every option of ``train`` and ``parameter_search``, checked, as one record.

:class:`TrainConfig` is written to ``config.json`` next to every run; ``--resume`` compares it
with the options given. The data and model options take their defaults from
``dataset.DataOptions`` (its fields are inherited: declared once) and ``model_options.ModelOptions``.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samlora.core import runfiles
from samlora.core.errors import UserError
from samlora.data import dataset as data
from samlora.data.prompts import PROMPT_MODES
from samlora.models import encoder_blocks, lora, model_options
from samlora.training.losses import LOSS_RESOLUTIONS, LOSSES

_MODEL = model_options.ModelOptions()


@dataclass(kw_only=True)
class TrainConfig(data.DataOptions):
    """Everything that defines a training run; written to ``config.json``. The data options
    (``data_format``, ``patch_size``, ...) are the inherited :class:`dataset.DataOptions` fields."""

    data_dir: str
    output_dir: str
    max_objects: int = 32
    model_type: str = _MODEL.model_type
    checkpoint: str | None = _MODEL.checkpoint
    image_size: int = _MODEL.image_size
    precision: str = _MODEL.precision
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: str = "qkv"
    lora_blocks: str = "all"
    train_decoder: bool = False
    freeze_encoder: bool = False
    batch_size: int = 1
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    epochs: int = 10
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0
    early_stopping: bool = False
    patience: int = 5
    cross_validation: bool = False
    final_fit: bool = False
    num_folds: int = 5
    val_fraction: float = 0.2
    prompt: str = "box"
    num_points: int = 1
    box_jitter: float = 0.1
    augment: bool = True
    augment_variants: int = 2
    loss: str = "dice_ce"
    loss_resolution: str = "input"
    iou_loss_weight: float = 1.0
    decoder_chunk: int = 0
    sub_iterations: int = 0
    instance_decoder: bool = False
    instance_loss_weight: float = 1.0
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in runfiles.plain_record(vars(args)).items() if k in names}
        config = cls(**values)
        config.validate()
        return config

    @property
    def num_splits(self) -> int:
        """k folds with ``--cross_validation``, else one grouped hold-out split."""
        return self.num_folds if self.cross_validation else 1

    @property
    def encoder_trained(self) -> bool:
        """True when some encoder weights receive gradients (LoRA on an encoder target)."""
        targets = lora.parse_targets(self.lora_targets) if self.lora_rank > 0 else ()
        return not self.freeze_encoder and any(lora.TARGETS[t].scope == "image_encoder" for t in targets)

    @property
    def lora_block_indices(self) -> tuple[int, ...]:
        """The numbered encoder blocks ``--lora_blocks`` names (encoder_blocks.py)."""
        return encoder_blocks.parse_blocks(self.lora_blocks, encoder_blocks.block_count(self.model_type))

    @property
    def first_lora_block(self) -> int | None:
        """The first encoder block with LoRA; None when no encoder weight trains."""
        return self.lora_block_indices[0] if self.encoder_trained else None

    @property
    def cached(self) -> bool:
        """Whether a frozen start of the encoder is cached per image view: the whole encoder (no
        encoder LoRA: the image embedding), or the blocks before the first adapted one (late
        LoRA: that block's input). Cached views are fixed flips / rotations, no intensity change."""
        first = self.first_lora_block
        return first is None or first > 0

    def validate(self) -> None:
        """Reject nonsensical numbers with one clear message each."""
        checks = [
            (self.batch_size >= 1, f"--batch_size must be at least 1, got {self.batch_size}"),
            (self.max_objects >= 0, f"--max_objects must be 0 (all) or positive, got {self.max_objects}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.learning_rate > 0, f"--learning_rate must be positive, got {self.learning_rate}"),
            (self.weight_decay >= 0, f"--weight_decay must be >= 0, got {self.weight_decay}"),
            (self.decoder_chunk >= 0, f"--decoder_chunk must be >= 0 (0 = by device), got {self.decoder_chunk}"),
            (self.sub_iterations >= 0, f"--sub_iterations must be >= 0 (0 = by device), got {self.sub_iterations}"),
            (self.iou_loss_weight >= 0, f"--iou_loss_weight must be >= 0, got {self.iou_loss_weight}"),
            (self.instance_loss_weight > 0,
             f"--instance_loss_weight must be positive, got {self.instance_loss_weight}"),
            (self.patience >= 1, f"--patience must be at least 1, got {self.patience}"),
            (self.lora_rank >= 0, f"--lora_rank must be >= 0 (0 = no LoRA), got {self.lora_rank}"),
            (self.lora_alpha > 0, f"--lora_alpha must be positive, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1, f"--lora_dropout must be in [0, 1), got {self.lora_dropout}"),
            (self.loss in LOSSES, f"unknown --loss {self.loss!r}: choose {' or '.join(LOSSES)}"),
            (self.loss_resolution in LOSS_RESOLUTIONS,
             f"unknown --loss_resolution {self.loss_resolution!r}: choose {' or '.join(LOSS_RESOLUTIONS)}"),
            (self.prompt in PROMPT_MODES, f"unknown --prompt {self.prompt!r}: choose {', '.join(PROMPT_MODES)}"),
            (not self.cross_validation or self.num_folds >= 2,
             f"--num_folds must be at least 2 for cross-validation, got {self.num_folds}"),
            (0 < self.val_fraction < 1, f"--val_fraction must be between 0 and 1, got {self.val_fraction}"),
            (0 <= self.warmup_fraction < 1, f"--warmup_fraction must be in [0, 1), got {self.warmup_fraction}"),
            (self.num_points >= 0, f"--num_points must be at least 0, got {self.num_points}"),
            (0 <= self.box_jitter < 0.5, f"--box_jitter must be in [0, 0.5), got {self.box_jitter}"),
            (1 <= self.augment_variants <= 8, f"--augment_variants must be in 1..8, got {self.augment_variants}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if self.lora_rank > 0:
            lora.parse_targets(self.lora_targets)
        blocks = self.lora_block_indices  # a bad --lora_blocks is refused here
        if len(blocks) < encoder_blocks.block_count(self.model_type) and not self.encoder_trained:
            raise UserError(f"--lora_blocks {self.lora_blocks} places encoder LoRA, but no encoder layer trains "
                            "(--freeze_encoder, --lora_rank 0 or decoder-only --lora_targets): leave it at all")
        if self.train_decoder and self.lora_rank > 0 and "decoder" in lora.parse_targets(self.lora_targets):
            raise UserError("--lora_targets decoder with --train_decoder trains the decoder's weights twice (LoRA on "
                            "layers that train anyway): drop decoder from --lora_targets or drop --train_decoder")
        if self.lora_rank == 0 and not self.train_decoder:
            raise UserError("nothing to train: --lora_rank 0 needs --train_decoder")
        if self.freeze_encoder and self.lora_rank > 0 and \
                all(lora.TARGETS[t].scope == "image_encoder" for t in lora.parse_targets(self.lora_targets)):
            raise UserError("--freeze_encoder leaves the encoder LoRA targets "
                            f"{self.lora_targets!r} untrained: use --lora_targets decoder and/or "
                            "--train_decoder, or drop --freeze_encoder")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SEARCHED_OPTIONS = ("lora_rank", "lora_alpha", "learning_rate", "cross_validation")  # set by every search trial


def add_train_arguments(parser: argparse.ArgumentParser, searched: bool = False) -> None:
    """Options of ``train`` and ``parameter_search`` (model and data groups included).

    ``searched``: the options of a search, whose every trial sets :data:`SEARCHED_OPTIONS` itself
    (rank, alpha and learning rate from its lists, always cross-validated): those flags are left out.
    """
    data.add_data_arguments(parser)
    model_options.add_model_arguments(parser)
    defaults = TrainConfig(data_dir="", output_dir="")
    out = parser.add_argument_group("run")
    out.add_argument("--output_dir", type=Path, default=Path("runs/train"), help="where the run is written")
    out.add_argument("--resume", action="store_true", help="continue an interrupted run in --output_dir")
    out.add_argument("--overwrite", action="store_true", help="replace a finished or different run in --output_dir")
    out.add_argument("--seed", type=int, default=defaults.seed, help="seed for folds, prompts, augmentation and init")
    out.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes for data preparation")
    out.add_argument("--cache_memory_gb", type=float, default=4.0,
                     help="memory (CPU) for a frozen encoder's cached embeddings (or, with late --lora_blocks, the "
                          "cached inputs of the first adapted block); a run that needs more is refused unless "
                          "--embedding_cache keeps them on disk")
    ad = parser.add_argument_group("LoRA")
    if not searched:
        ad.add_argument("--lora_rank", type=int, default=defaults.lora_rank, help="LoRA rank (0 = no LoRA)")
        ad.add_argument("--lora_alpha", type=float, default=defaults.lora_alpha,
                        help="LoRA alpha (scaling = alpha / rank)")
    ad.add_argument("--lora_dropout", type=float, default=defaults.lora_dropout, help="dropout on the LoRA path")
    ad.add_argument("--lora_targets", default=defaults.lora_targets,
                    help=f"comma-separated layers to adapt: {', '.join(lora.TARGETS)}")
    ad.add_argument("--lora_blocks", default=defaults.lora_blocks,
                    help="encoder blocks that get LoRA: all, lastN (e.g. last3), or indices and ranges (6-11, "
                         "0,9-11). vit_b/l/h: blocks.0-11/23/31; vit_t: its transformer blocks numbered across "
                         "stages 0-9 (last2 = the last stage). Late blocks only: each image's input to the first "
                         "adapted block is computed once and cached (--cache_memory_gb), so a step runs only the "
                         "adapted blocks, the neck and the decoder")
    ad.add_argument("--train_decoder", action="store_true", help="also train the whole mask decoder")
    ad.add_argument("--freeze_encoder", action="store_true",
                    help="decoder-only fine-tuning: the encoder is frozen and each image embedded once")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--batch_size", type=int, default=defaults.batch_size, help="images per step")
    if not searched:
        opt.add_argument("--learning_rate", type=float, default=defaults.learning_rate,
                         help="peak AdamW learning rate")
    opt.add_argument("--weight_decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
    opt.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs per fold")
    opt.add_argument("--warmup_fraction", type=float, default=defaults.warmup_fraction,
                     help="linear warm-up share of the steps before the cosine decay")
    opt.add_argument("--grad_clip", type=float, default=defaults.grad_clip, help="gradient norm clip (0 = off)")
    opt.add_argument("--early_stopping", action="store_true", help="stop a fold when validation Dice stops improving")
    opt.add_argument("--patience", type=int, default=defaults.patience, help="epochs without improvement before stopping")
    opt.add_argument("--loss", default=defaults.loss, help="dice_ce (Dice + BCE) or focal_dice_iou (finestSAM's 20:1:1)")
    opt.add_argument("--loss_resolution", choices=LOSS_RESOLUTIONS, default=defaults.loss_resolution,
                     help="where the mask loss and the IoU head's target are computed: input = the decoder's logits "
                          "upsampled to the input resolution (micro-sam's; small objects keep their targets), "
                          "decoder = its 1/4 grid with targets area-averaged down (cheaper; small objects vanish)")
    opt.add_argument("--decoder_chunk", type=int, default=defaults.decoder_chunk,
                     help="prompts per mask-decoder call in training (gradients accumulated: the step is the same); "
                          "0 = the device's default (1 on a CPU, where fewer per call cost less each; 64 on a GPU)")
    opt.add_argument("--iou_loss_weight", type=float, default=defaults.iou_loss_weight,
                     help="weight of the IoU head's error (MSE to each mask's true IoU): the predicted IoU decides "
                          "overlaps in every command, so it is trained too (0 = off)")
    ais = parser.add_argument_group("automatic instance segmentation (AIS)")
    ais.add_argument("--instance_decoder", action="store_true",
                     help="also train the AIS decoder on SAM's image embedding (foreground, centre and boundary "
                          "distance maps, turned into objects by a seeded watershed), jointly with the LoRA "
                          "adapters, as micro-sam's train_sam(with_segmentation_decoder=True); a model that "
                          "already carries one (adapter, combined checkpoint) fine-tunes it; the watershed "
                          "thresholds are then chosen on each fold's selection images and stored in best.pt")
    ais.add_argument("--instance_loss_weight", type=float, default=defaults.instance_loss_weight,
                     help="weight of the AIS decoder's Dice loss added to the prompted loss (--instance_decoder)")
    cv = parser.add_argument_group("validation")
    if not searched:
        cv.add_argument("--cross_validation", action="store_true",
                        help="k-fold cross-validation grouped by image / slice block")
    cv.add_argument("--num_folds", type=int, default=defaults.num_folds,
                    help="cross-validation folds of every configuration" if searched else "folds with --cross_validation")
    cv.add_argument("--val_fraction", type=float, default=defaults.val_fraction,
                    help="validation share of the grouped hold-out split without --cross_validation, and of "
                         "the inner split carved from each fold's training groups to choose its epoch")
    cv.add_argument("--final_fit", action="store_true",
                    help="after cross-validation, retrain on all training data for as many optimiser steps as a "
                         "fold took to its chosen checkpoint (the median), on a fold's learning-rate schedule "
                         "(final/best.pt; scored once on a fixed test split when there is one)")
    pr = parser.add_argument_group("prompts")
    pr.add_argument("--prompt", default=defaults.prompt,
                    help="box, point or mix (per object one of box / points / both, as micro-sam trains)")
    pr.add_argument("--sub_iterations", type=int, default=defaults.sub_iterations,
                    help="prompting rounds per step: after the first, each adds a random positive and negative "
                         "correction click in the errors and feeds the previous mask back half of the time, as "
                         "micro-sam trains; the round losses are averaged (the embedding is "
                         "computed once); 0 = by device: 8 on a GPU, 2 on a CPU where the decoder costs as much "
                         "as the encoder")
    pr.add_argument("--num_points", type=int, default=defaults.num_points, help="the most negative points per object: "
                    "point prompts are one positive point and 0..k negative ones (drawn per image; none: the single "
                    "click, SAM's multimask case), as micro-sam trains")
    pr.add_argument("--box_jitter", type=float, default=defaults.box_jitter, help="box side noise as a fraction of its size")
    pr.add_argument("--max_objects", type=int, default=defaults.max_objects,
                    help="at most this many objects per image get prompts in one training step (0 = all)")
    pr.add_argument("--no_augment", dest="augment", action="store_false", help="no flips, rotations or intensity changes")
    pr.add_argument("--augment_variants", type=int, default=defaults.augment_variants,
                    help="with a frozen encoder (or late --lora_blocks): each image is seen in this many of its 8 "
                         "flips / rotations (the original first, one per epoch in turn), each encoded once and cached")
