"""The training engine shared by ``train`` and ``parameter_search``.

Composed from small parts: :class:`PromptDataset` (augment, sample prompts, prepare, in
DataLoader workers), :class:`EmbeddingCache` (frozen encoder: each image embedded once),
:func:`compute_loss`, :func:`train_one_epoch`, :func:`validate`, :func:`run_fold` and
:func:`run_training` (the k-fold loop). Every epoch ends with an atomic resume checkpoint; the
randomness of an epoch is derived from ``(seed, fold, epoch)``, so ``--resume`` after an
interruption ends with the same result as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import dataset as data
import lora
import metrics
import model as sam_model
from errors import UserError, write_error

log = logging.getLogger(__name__)

LOSSES = ("dice_ce", "focal_dice_iou")
RUN_FILES = ("config.json", "folds.json", "metrics.csv", "summary.json", "train.log")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything that defines a training run; written to ``config.json``."""

    data_dir: str
    output_dir: str
    data_format: str = "auto"
    patch_size: int = 0
    patch_overlap: int = 0
    drop_empty_patches: bool = False
    slice_block: int = 10
    nifti_axis: int = 2
    max_objects: int = 32
    model_type: str = "vit_t"
    checkpoint: str | None = None
    image_size: int = 1024
    precision: str = "fp32"
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: str = "qkv"
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
    num_folds: int = 5
    val_fraction: float = 0.2
    prompt: str = "box"
    num_points: int = 1
    box_jitter: float = 0.1
    augment: bool = True
    loss: str = "dice_ce"
    seed: int = 0

    # options that may differ between an interrupted run and its --resume
    RUNTIME_ONLY = ("device", "num_workers", "resume", "overwrite", "export_merged", "quiet", "verbose")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k in names}
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

    def validate(self) -> None:
        """Reject nonsensical numbers with one clear message each."""
        checks = [
            (self.batch_size >= 1, f"--batch_size must be at least 1, got {self.batch_size}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.learning_rate > 0, f"--learning_rate must be positive, got {self.learning_rate}"),
            (self.weight_decay >= 0, f"--weight_decay must be >= 0, got {self.weight_decay}"),
            (self.patience >= 1, f"--patience must be at least 1, got {self.patience}"),
            (self.lora_rank >= 0, f"--lora_rank must be >= 0 (0 = no LoRA), got {self.lora_rank}"),
            (self.lora_alpha > 0, f"--lora_alpha must be positive, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1, f"--lora_dropout must be in [0, 1), got {self.lora_dropout}"),
            (self.loss in LOSSES, f"unknown --loss {self.loss!r}: choose {' or '.join(LOSSES)}"),
            (self.prompt in data.PROMPT_MODES, f"unknown --prompt {self.prompt!r}: choose {', '.join(data.PROMPT_MODES)}"),
            (not self.cross_validation or self.num_folds >= 2,
             f"--num_folds must be at least 2 for cross-validation, got {self.num_folds}"),
            (0 < self.val_fraction < 1, f"--val_fraction must be between 0 and 1, got {self.val_fraction}"),
            (0 <= self.warmup_fraction < 1, f"--warmup_fraction must be in [0, 1), got {self.warmup_fraction}"),
            (self.num_points >= 1, f"--num_points must be at least 1, got {self.num_points}"),
            (0 <= self.box_jitter < 0.5, f"--box_jitter must be in [0, 0.5), got {self.box_jitter}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if self.lora_rank > 0:
            lora.parse_targets(self.lora_targets)
        if self.lora_rank == 0 and not self.train_decoder:
            raise UserError("nothing to train: --lora_rank 0 needs --train_decoder")
        if self.freeze_encoder and self.lora_rank > 0 and \
                all(lora.TARGETS[t].scope == "image_encoder" for t in lora.parse_targets(self.lora_targets)):
            raise UserError("--freeze_encoder leaves the encoder LoRA targets "
                            f"{self.lora_targets!r} untrained: use --lora_targets decoder and/or "
                            "--train_decoder, or drop --freeze_encoder")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``train`` and ``parameter_search`` (model and data groups included)."""
    data.add_data_arguments(parser)
    sam_model.add_model_arguments(parser)
    defaults = TrainConfig(data_dir="", output_dir="")
    out = parser.add_argument_group("run")
    out.add_argument("--output_dir", type=Path, default=Path("runs/train"), help="where the run is written")
    out.add_argument("--resume", action="store_true", help="continue an interrupted run in --output_dir")
    out.add_argument("--overwrite", action="store_true", help="replace a finished or different run in --output_dir")
    out.add_argument("--seed", type=int, default=defaults.seed, help="seed for folds, prompts, augmentation and init")
    out.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes for data preparation")
    ad = parser.add_argument_group("LoRA")
    ad.add_argument("--lora_rank", type=int, default=defaults.lora_rank, help="LoRA rank (0 = no LoRA)")
    ad.add_argument("--lora_alpha", type=float, default=defaults.lora_alpha, help="LoRA alpha (scaling = alpha / rank)")
    ad.add_argument("--lora_dropout", type=float, default=defaults.lora_dropout, help="dropout on the LoRA path")
    ad.add_argument("--lora_targets", default=defaults.lora_targets,
                    help=f"comma-separated layers to adapt: {', '.join(lora.TARGETS)}")
    ad.add_argument("--train_only_lora", action="store_true",
                    help="train only the LoRA tensors (the default; overrides nothing, kept for the seeds' scripts)")
    ad.add_argument("--train_decoder", action="store_true", help="also train the whole mask decoder")
    ad.add_argument("--freeze_encoder", action="store_true",
                    help="decoder-only fine-tuning: the encoder is frozen and each image embedded once")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--batch_size", type=int, default=defaults.batch_size, help="images per step")
    opt.add_argument("--learning_rate", type=float, default=defaults.learning_rate, help="peak AdamW learning rate")
    opt.add_argument("--weight_decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
    opt.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs per fold")
    opt.add_argument("--warmup_fraction", type=float, default=defaults.warmup_fraction,
                     help="linear warm-up share of the steps before the cosine decay")
    opt.add_argument("--grad_clip", type=float, default=defaults.grad_clip, help="gradient norm clip (0 = off)")
    opt.add_argument("--early_stopping", action="store_true", help="stop a fold when validation Dice stops improving")
    opt.add_argument("--patience", type=int, default=defaults.patience, help="epochs without improvement before stopping")
    opt.add_argument("--loss", default=defaults.loss, help="dice_ce (Dice + BCE) or focal_dice_iou (finestSAM's 20:1:1)")
    cv = parser.add_argument_group("validation")
    cv.add_argument("--cross_validation", action="store_true", help="k-fold cross-validation grouped by image / slice block")
    cv.add_argument("--num_folds", type=int, default=defaults.num_folds, help="folds with --cross_validation")
    cv.add_argument("--val_fraction", type=float, default=defaults.val_fraction,
                    help="validation share of the grouped hold-out split without --cross_validation")
    pr = parser.add_argument_group("prompts")
    pr.add_argument("--prompt", default=defaults.prompt, help="box, point or mix (per image one of box / points / both)")
    pr.add_argument("--num_points", type=int, default=defaults.num_points, help="positive (and as many negative) points per object")
    pr.add_argument("--box_jitter", type=float, default=defaults.box_jitter, help="box side noise as a fraction of its size")
    pr.add_argument("--no_augment", dest="augment", action="store_false", help="no flips, rotations or intensity changes")


# --------------------------------------------------------------------------------------------
# Data: one prepared training item per image
# --------------------------------------------------------------------------------------------
@dataclass
class Item:
    """One image ready for a step: tensor 3xSxS, prompts in the input frame, low-res targets."""

    index: int
    key: str  # content hash (embedding cache key)
    image: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    prompts: sam_model.Prompts
    targets: torch.Tensor  # Nx1xhxw float {0,1} at low resolution (valid region only)
    full_masks: np.ndarray  # NxHxW bool at the original size
    labels: np.ndarray  # HxW instance labels (after augmentation)
    ignore: np.ndarray | None


def content_key(image: np.ndarray) -> str:
    """A hash of the pixels (and shape): the embedding cache key of an image."""
    digest = hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16)
    digest.update(str(image.shape).encode())
    return digest.hexdigest()


def low_res_targets(masks: np.ndarray, input_size: tuple[int, int]) -> torch.Tensor:
    """NxHxW bool masks -> Nx1xhxw {0,1} float at the decoder's resolution (input size / 4).

    Area resampling (cv2, per object) then a 0.5 threshold: a low-res pixel is foreground
    when at least half of the pixels it covers are.
    """
    h, w = math.ceil(input_size[0] / 4), math.ceil(input_size[1] / 4)
    out = np.zeros((masks.shape[0], 1, h, w), np.float32)
    for i, mask in enumerate(masks):
        area = cv2.resize(mask.astype(np.uint8) * 255, (w, h), interpolation=cv2.INTER_AREA)
        out[i, 0] = area >= 128
    return torch.from_numpy(out)


class PromptDataset(torch.utils.data.Dataset):
    """Samples -> :class:`Item` (augmentation, prompt sampling and pre-processing).

    The randomness of item ``i`` in ``epoch`` comes from ``(seed, fold, epoch, i)``, so it does
    not depend on worker count or on interruptions. ``intensity=False`` keeps only the 8
    flips/rotations, so a frozen encoder's embeddings can be cached per variant.
    """

    def __init__(self, samples: Sequence[data.Sample], indices: Sequence[int], config: TrainConfig,
                 fold: int, train: bool) -> None:
        self.samples, self.indices, self.config = samples, list(indices), config
        self.fold, self.train, self.epoch = fold, train, 0
        self.intensity = not (train and not config.encoder_trained)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> Item:
        cfg = self.config
        index = self.indices[position]
        sample = self.samples[index]
        rng = np.random.default_rng([cfg.seed, self.fold, self.epoch if self.train else 0, index])
        image, labels, ignore = sample.image, sample.labels, sample.ignore
        if self.train:
            amount = 0.1 if (cfg.augment and self.intensity) else 0.0
            image, labels, ignore = data.augment(image, labels, rng, ignore, enabled=cfg.augment,
                                                 brightness=amount, contrast=amount)
        prompts = data.sample_prompts(
            labels, rng, prompt=cfg.prompt if self.train else ("point" if cfg.prompt == "point" else "box"),
            num_points=cfg.num_points, box_jitter=cfg.box_jitter if self.train else 0.0,
            max_objects=cfg.max_objects if self.train else 0, ignore=ignore)
        prepared = sam_model.prepare_image(image, cfg.image_size)
        model_prompts = sam_model.Prompts()
        if len(prompts):
            model_prompts = sam_model.make_prompts(
                prepared.original_size, cfg.image_size,
                boxes=prompts.boxes if prompts.use_boxes else None,
                points=prompts.points if prompts.use_points else None,
                point_labels=prompts.point_labels if prompts.use_points else None)
        key = content_key(image) if not cfg.encoder_trained else ""  # only cached embeddings need it
        return Item(index, key, prepared.tensor, prepared.input_size, prepared.original_size,
                    model_prompts, low_res_targets(prompts.masks, prepared.input_size), prompts.masks,
                    labels, ignore)


def collate(items: list[Item]) -> list[Item]:
    return items


def make_loader(dataset: PromptDataset, batch_size: int, shuffle_seed: int | None, num_workers: int,
                rank: int = 0, world: int = 1) -> torch.utils.data.DataLoader:
    """Batches of items; ``shuffle_seed`` orders a training epoch; ranks take interleaved shares.

    Training orders are padded (repeating a few items) so that every rank takes the same number
    of steps, as each step all-reduces gradients; validation shares are not padded.
    """
    order = list(range(len(dataset)))
    if shuffle_seed is not None:
        order = list(np.random.default_rng(shuffle_seed).permutation(len(dataset)))
    if shuffle_seed is not None and world > 1 and len(order) % world:
        order += order[: world - len(order) % world]  # every rank takes as many steps (collectives)
    order = order[rank::world]
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=collate,
                                       num_workers=num_workers, persistent_workers=False)


# --------------------------------------------------------------------------------------------
# Embedding cache (frozen encoder)
# --------------------------------------------------------------------------------------------
class EmbeddingCache:
    """Image embeddings of a frozen encoder, computed once per image content.

    Keys combine the model type, base checkpoint hash, image size, precision and the image's
    content hash; values live in memory and, with ``directory``, also on disk across runs.
    """

    def __init__(self, sam: nn.Module, precision: str, directory: Path | None = None,
                 memory: dict[str, torch.Tensor] | None = None) -> None:
        self.sam, self.precision, self.directory = sam, precision, directory
        self.prefix = f"{sam.model_type}-{sam.checkpoint_sha256 or 'random'}-{sam.image_encoder.img_size}-{precision}"
        # shared across the folds of a run: the frozen encoder is the same in every fold
        self.memory: dict[str, torch.Tensor] = {} if memory is None else memory
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{hashlib.sha1((self.prefix + key).encode()).hexdigest()}.pt"

    def get(self, items: Sequence[Item], device: torch.device) -> torch.Tensor:
        """Bx256xgxg embeddings of the items' images (encoder runs only for unseen images)."""
        out: list[torch.Tensor | None] = []
        todo = []
        for item in items:
            emb = self.memory.get(self.prefix + item.key)
            path = self._path(item.key)
            if emb is None and path is not None and path.is_file():
                emb = self.memory[self.prefix + item.key] = torch.load(path, weights_only=True)
            out.append(emb)
            if emb is None:
                todo.append(len(out) - 1)
        self.hits += len(items) - len(todo)
        self.misses += len(todo)
        if todo:
            batch = torch.stack([items[i].image for i in todo]).to(device)
            with torch.no_grad(), sam_model.autocast(device, self.precision):
                embs = sam_model.encode_images(self.sam, batch).detach()
            for j, i in enumerate(todo):
                out[i] = self.memory[self.prefix + items[i].key] = embs[j]
                path = self._path(items[i].key)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_torch_save(embs[j].cpu(), path)
        return torch.stack([e.to(device) for e in out])  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss per object, Nx1xhxw -> N; +1 smoothing so empty masks give 0, not NaN."""
    probs = torch.sigmoid(logits).flatten(1)
    t = targets.flatten(1)
    return 1 - (2 * (probs * t).sum(1) + 1) / (probs.sum(1) + t.sum(1) + 1)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss per object (mean over pixels), Nx1xhxw -> N."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    weight = alpha * targets + (1 - alpha) * (1 - targets)
    return (weight * (1 - p_t) ** gamma * bce).flatten(1).mean(1)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded logits with the targets per object, N (1 when both are empty)."""
    pred = (logits > 0).flatten(1).float()
    t = targets.flatten(1)
    inter = (pred * t).sum(1)
    union = pred.sum(1) + t.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def hard_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice of the thresholded logits per object, N (1 when both are empty)."""
    with torch.no_grad():
        pred = (logits > 0).flatten(1).float()
        t = targets.flatten(1)
        total = pred.sum(1) + t.sum(1)
        return torch.where(total > 0, 2 * (pred * t).sum(1) / total.clamp(min=1), torch.ones_like(total))


def compute_loss(kind: str, logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean loss over N objects. logits, targets: Nx1xhxw; iou_pred: Nx1.

    dice_ce = Dice + BCE; focal_dice_iou = 20 focal + Dice + MSE(predicted IoU, actual IoU).
    """
    logits = logits.float()
    if kind == "dice_ce":
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1)
        return (dice_loss(logits, targets) + bce).mean()
    if kind == "focal_dice_iou":
        iou_mse = (iou_pred.float()[:, 0] - mask_iou(logits, targets).detach()) ** 2
        return (20 * focal_loss(logits, targets) + dice_loss(logits, targets) + iou_mse).mean()
    raise UserError(f"unknown loss {kind!r}: choose {' or '.join(LOSSES)}")


# --------------------------------------------------------------------------------------------
# Steps, epochs, validation
# --------------------------------------------------------------------------------------------
@dataclass
class Context:
    """What one fold's steps need: the model, device, optimiser, cache and process group."""

    sam: nn.Module
    config: TrainConfig
    device: torch.device
    cache: EmbeddingCache | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    rank: int = 0
    world: int = 1


def forward_items(ctx: Context, items: Sequence[Item], original_size: bool = False) -> list[sam_model.SamOutput]:
    """Run :func:`model.sam_forward` on items that have prompts (cached embeddings if frozen)."""
    items = [it for it in items if len(it.prompts)]
    if not items:
        return []
    prompts = [it.prompts.to(ctx.device) for it in items]
    with sam_model.autocast(ctx.device, ctx.config.precision):
        embeddings = ctx.cache.get(items, ctx.device) if ctx.cache is not None else None
        images = None if embeddings is not None else torch.stack([it.image for it in items]).to(ctx.device)
        return sam_model.sam_forward(ctx.sam, images, prompts, [it.input_size for it in items],
                                     [it.original_size for it in items] if original_size else None,
                                     image_embeddings=embeddings)


def step_loss(ctx: Context, items: Sequence[Item]) -> tuple[torch.Tensor | None, float]:
    """Mean loss over the images of a batch that have objects, and their mean low-res Dice."""
    with_objects = [it for it in items if len(it.prompts)]
    outputs = forward_items(ctx, with_objects)
    losses, dices = [], []
    for item, out in zip(with_objects, outputs):
        h, w = item.targets.shape[-2:]
        logits = out.low_res[..., :h, :w]
        targets = item.targets.to(ctx.device)
        losses.append(compute_loss(ctx.config.loss, logits, out.iou, targets))
        dices.append(float(hard_dice(logits, targets).mean()))
    if not losses:
        return None, float("nan")
    return torch.stack(losses).mean(), float(np.mean(dices))


def all_reduce_gradients(params: Sequence[nn.Parameter], world: int) -> None:
    """Average gradients over the processes of a torchrun job (the DDP reduction)."""
    if world <= 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= world


def set_train_mode(sam: nn.Module) -> None:
    """Training mode for the LoRA layers (their dropout) only.

    The frozen base stays in eval mode: TinyViT's BatchNorm would otherwise normalise with batch
    statistics and overwrite its running statistics, which no adapter file stores, so the
    trained model and the one evaluated later would differ. SAM's decoder has no dropout or
    normalisation whose behaviour depends on the mode, so training it is unaffected.
    """
    sam.eval()
    for layer in lora.lora_layers(sam).values():
        layer.train()


def train_one_epoch(ctx: Context, loader: torch.utils.data.DataLoader, epoch: int, fold: int) -> dict[str, float]:
    """One pass over the training fold; returns mean loss and low-res Dice. Stops on NaN."""
    set_train_mode(ctx.sam)
    params = [p for p in ctx.sam.parameters() if p.requires_grad]
    losses, dices = [], []
    bar = tqdm(loader, desc=f"fold {fold} epoch {epoch}", leave=False, disable=ctx.rank != 0 or None)
    for items in bar:
        loss, dice = step_loss(ctx, items)
        if loss is None and ctx.world == 1:  # no objects in this batch: nothing to learn from
            ctx.scheduler.step()
            continue
        if loss is None:  # no objects on this rank, but it must join the gradient reduction
            loss = sum(p.sum() * 0 for p in params)
        elif not torch.isfinite(loss):
            raise UserError(f"the loss became {float(loss.detach())} in fold {fold}, epoch {epoch}: training "
                            "stopped and the last good checkpoint kept; lower --learning_rate or use "
                            "--precision fp32")
        ctx.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_gradients(params, ctx.world)
        if ctx.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, ctx.config.grad_clip)
        ctx.optimizer.step()
        ctx.scheduler.step()
        if not math.isnan(dice):
            losses.append(float(loss.detach()))
            dices.append(dice)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
    return {"train_loss": float(np.mean(losses)) if losses else 0.0,
            "train_dice": float(np.mean(dices)) if dices else 0.0}


def instance_map(masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """NxHxW bool masks -> HxW int32 labels 1..N; overlaps go to the higher score."""
    labels = np.zeros(masks.shape[1:], np.int32)
    for i in np.argsort(scores, kind="stable"):  # ascending: the best score is painted last
        labels[masks[i]] = i + 1
    return labels


@torch.no_grad()
def validate(ctx: Context, loader: torch.utils.data.DataLoader) -> dict[str, float]:
    """Dice and IoU at the original image size on the validation fold (no augmentation).

    Box prompts without jitter (points when training used points); images without objects are
    skipped, as in ``evaluate``. ``dice``/``iou`` are means of per-image semantic scores;
    ``pooled_dice`` sums pixels over the fold first.
    """
    ctx.sam.eval()
    rows = []
    for items in loader:
        outputs = iter(forward_items(ctx, items, original_size=True))
        for item in items:
            if not len(item.prompts):  # nothing to prompt: every model would score a trivial 1
                continue
            out = next(outputs)
            masks = (out.logits[:, 0] > 0).cpu().numpy()
            pred = instance_map(masks, out.iou[:, 0].float().cpu().numpy())
            rows.append(metrics.semantic_metrics(item.labels, pred, ignore=item.ignore))
    if ctx.world > 1:
        import torch.distributed as dist

        gathered: list[list[dict]] = [[] for _ in range(ctx.world)]
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    if not rows:
        return {"val_dice": 0.0, "val_iou": 0.0, "val_pooled_dice": 0.0}
    pooled = metrics.pooled_semantic_metrics(rows)
    return {"val_dice": float(np.mean([r["dice"] for r in rows])),
            "val_iou": float(np.mean([r["iou"] for r in rows])),
            "val_pooled_dice": float(pooled["dice"])}


# --------------------------------------------------------------------------------------------
# Model set-up, checkpoints
# --------------------------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename: never a half file.

    On any failure the temporary file is removed and an existing ``path`` is left as it was; a
    full disk or an unwritable folder becomes one :class:`UserError` line (what to do, and that
    ``--resume`` continues from the intact previous checkpoint).
    """
    existed, tmp = path.exists(), None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        error = write_error(path, exc, existed)
        if error is not None:
            raise error from None
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda fh: fh.write(text), mode="w")


def build_trainable_model(config: TrainConfig, checkpoint: Path | None, device: torch.device) -> nn.Module:
    """The base model with LoRA injected and only the chosen parameters trainable.

    Random base weights (no checkpoint) come from ``torch.manual_seed(config.seed)`` alone, so
    every fold and :func:`export_merged` rebuild the very same base model.
    """
    torch.manual_seed(config.seed)
    sam = sam_model.build_model(config.model_type, checkpoint, config.image_size)
    sam.random_weights = checkpoint is None
    if config.lora_rank > 0:
        targets = lora.parse_targets(config.lora_targets)
        if config.freeze_encoder:
            targets = tuple(t for t in targets if lora.TARGETS[t].scope != "image_encoder")
        lora.inject_lora(sam, config.lora_rank, config.lora_alpha, targets, config.lora_dropout)
    lora.mark_only_lora_as_trainable(sam, train_decoder=config.train_decoder)
    return sam.to(device)


def adapter_config(config: TrainConfig, sam: nn.Module, fold: int, epoch: int, val: dict[str, float]) -> dict[str, Any]:
    """What an adapter file records about its training (issue: model type, rank, hash, fold...)."""
    targets = [layer.target for layer in lora.lora_layers(sam).values()] if config.lora_rank > 0 else []
    return {"model_type": config.model_type, "image_size": config.image_size,
            "base_checkpoint_sha256": sam.checkpoint_sha256, "targets": sorted(set(targets)) or None,
            "train_decoder": config.train_decoder, "fold": fold, "epoch": epoch,
            "val_dice": val.get("val_dice"), "seed": config.seed, "prompt": config.prompt}


def trainable_state(sam: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA tensors and every parameter with ``requires_grad`` (what changes in training)."""
    state = lora.lora_state_dict(sam)
    state.update({n: p.detach().clone() for n, p in sam.named_parameters() if p.requires_grad})
    return {k: v.cpu() for k, v in state.items()}


def make_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 0 over ``total_steps``."""
    warmup = int(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int, fold: int, epoch: int) -> None:
    """Seed torch (dropout, init) from (seed, fold, epoch): resumable without stored RNG state."""
    torch.manual_seed(int(np.random.default_rng([seed, fold, epoch]).integers(2**31)))


# --------------------------------------------------------------------------------------------
# One fold, all folds
# --------------------------------------------------------------------------------------------
def run_fold(config: TrainConfig, samples: Sequence[data.Sample], fold: int, train_idx: Sequence[int],
             val_idx: Sequence[int], checkpoint: Path | None, device: torch.device, num_workers: int = 0,
             rank: int = 0, world: int = 1, cache_dir: Path | None = None,
             embeddings: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Train one fold to the end (or early stop), resuming from ``fold_k/last.pt`` if present.

    Writes ``fold_k/best.pt`` (adapter of the best validation Dice), ``fold_k/last.pt`` (resume
    state, every epoch) and ``fold_k/done.json``; returns the fold's result and its history.
    ``embeddings`` is the run's shared frozen-encoder cache (memory), reused by every fold.
    """
    fold_dir = Path(config.output_dir) / f"fold_{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    sam = build_trainable_model(config, checkpoint, device)
    params = [p for p in sam.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    train_set = PromptDataset(samples, train_idx, config, fold, train=True)
    val_set = PromptDataset(samples, val_idx, config, fold, train=False)
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / world) / config.batch_size)
    scheduler = make_schedule(optimizer, steps_per_epoch * config.epochs, config.warmup_fraction)
    cache = EmbeddingCache(sam, config.precision, cache_dir, embeddings) if not config.encoder_trained else None
    ctx = Context(sam, config, device, cache, optimizer, scheduler, rank, world)

    state = {"epoch": -1, "best_dice": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": []}
    last = fold_dir / "last.pt"
    if last.is_file():
        saved = torch.load(last, map_location="cpu", weights_only=True)
        sam.load_state_dict(saved["trainable"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        log.info("fold %d: resuming after epoch %d (best val Dice %.4f at epoch %d)", fold,
                 state["epoch"], state["best_dice"], state["best_epoch"])
    val_loader = make_loader(val_set, config.batch_size, None, num_workers, rank, world)
    for epoch in range(state["epoch"] + 1, config.epochs):
        if config.early_stopping and state["bad_epochs"] >= config.patience:
            break
        start = time.perf_counter()
        seed_everything(config.seed, fold, epoch)
        train_set.epoch = epoch
        shuffle = int(np.random.default_rng([config.seed, fold, epoch, 7]).integers(2**31))
        row = train_one_epoch(ctx, make_loader(train_set, config.batch_size, shuffle, num_workers, rank, world), epoch, fold)
        row.update(validate(ctx, val_loader))
        row.update(fold=fold, epoch=epoch, lr=scheduler.get_last_lr()[0], seconds=round(time.perf_counter() - start, 2))
        improved = row["val_dice"] > state["best_dice"]
        state["history"].append(row)
        state["epoch"] = epoch
        if improved:
            state.update(best_dice=row["val_dice"], best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        if rank == 0:
            if improved:
                lora.save_adapter(fold_dir / "best.pt", sam, adapter_config(config, sam, fold, epoch, row))
            atomic_torch_save({"trainable": trainable_state(sam), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "state": state}, last)
            write_metrics_csv(config)
        log.info("fold %d epoch %d: loss %.4f, train Dice %.3f (low-res), val Dice %.4f, val IoU %.4f%s (%.1f s)",
                 fold, epoch, row["train_loss"], row["train_dice"], row["val_dice"], row["val_iou"],
                 " *" if improved else "", row["seconds"])
        if config.early_stopping and state["bad_epochs"] >= config.patience:
            log.info("fold %d: early stop, no improvement for %d epochs", fold, config.patience)
    if cache is not None:
        log.info("fold %d: embedding cache %d hits, %d encoder passes", fold, cache.hits, cache.misses)
    result = {"fold": fold, "best_val_dice": state["best_dice"], "best_epoch": state["best_epoch"],
              "epochs_run": state["epoch"] + 1, "adapter": str(fold_dir / "best.pt"),
              "val_size": len(val_idx), "train_size": len(train_idx)}
    best = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]), {})
    result.update({k: best.get(k) for k in ("val_iou", "val_pooled_dice")})
    if rank == 0:
        atomic_write_text(fold_dir / "done.json", json.dumps(result, indent=1))
    return result


def fold_histories(output_dir: Path) -> list[dict[str, Any]]:
    """Every fold's epoch rows, read back from the resume checkpoints."""
    rows = []
    for last in sorted(output_dir.glob("fold_*/last.pt"), key=lambda p: int(p.parent.name.split("_")[1])):
        rows += torch.load(last, map_location="cpu", weights_only=True)["state"]["history"]
    return rows


def write_metrics_csv(config: TrainConfig) -> None:
    """``metrics.csv``: one row per fold and epoch (rewritten whole, atomically)."""
    out = Path(config.output_dir)
    rows = fold_histories(out)
    columns = ["fold", "epoch", "train_loss", "train_dice", "val_dice", "val_iou", "val_pooled_dice", "lr", "seconds"]
    lines = [",".join(columns)] + [",".join(str(r.get(c, "")) for c in columns) for r in rows]
    atomic_write_text(out / "metrics.csv", "\n".join(lines) + "\n")


def summarize_folds(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation of the folds' best validation scores."""
    summary: dict[str, Any] = {"folds": list(results)}
    for key in ("best_val_dice", "val_iou", "val_pooled_dice"):
        values = np.array([r[key] for r in results if r.get(key) is not None], float)
        if values.size:
            summary[f"mean_{key}"] = float(values.mean())
            summary[f"std_{key}"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
    best = max(results, key=lambda r: r["best_val_dice"])
    summary["best_fold"] = best["fold"]
    summary["best_adapter"] = best["adapter"]
    return summary


def prepare_output_dir(config: TrainConfig, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: an existing run needs ``--resume`` (same config) or ``--overwrite``."""
    out = Path(config.output_dir)
    config_path = out / "config.json"
    if resume:
        if not config_path.is_file():
            raise UserError(f"--resume: no run to resume in {out} (no config.json); start it without --resume")
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        current = config.to_json()
        diff = [k for k in current if saved.get(k) != current[k]]
        if diff:
            shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in diff[:4])
            raise UserError(f"--resume: the options differ from the run in {out} ({shown}); resume with "
                            "the same options, or start a new --output_dir")
        return
    if out.exists() and any(out.iterdir()):
        if not config_path.is_file() and not overwrite:
            raise UserError(f"{out} exists and is not empty: choose a new --output_dir (or --overwrite)")
        if not overwrite:
            raise UserError(f"{out} holds another run: use --resume to continue it, --overwrite to replace it, "
                            "or a new --output_dir")
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        for fold_dir in out.glob("fold_*"):
            shutil.rmtree(fold_dir)
        log.warning("--overwrite: removed the previous run in %s", out)
    out.mkdir(parents=True, exist_ok=True)


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def setup(cls, device: torch.device) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return cls(dist.get_rank(), world)

    def barrier(self) -> None:
        """Wait for every process (no-op without torchrun)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def run_training(config: TrainConfig, samples: Sequence[data.Sample], device: torch.device,
                 num_workers: int = 0, folds: Sequence[tuple[list[int], list[int]]] | None = None,
                 cache_dir: Path | None = None) -> dict[str, Any]:
    """Train every fold (resuming finished ones from ``done.json``) and write the summary."""
    out = Path(config.output_dir)
    dist_info = Distributed.setup(device)
    if dist_info.world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    checkpoint = sam_model.resolve_checkpoint(config.model_type, config.checkpoint, announce=False)
    if folds is None:  # rank 0 writes folds.json, the others read it
        if dist_info.rank == 0:
            folds = data.load_or_make_folds(out, samples, config.num_splits, config.seed, config.slice_block,
                                            config.val_fraction)
        dist_info.barrier()
        if dist_info.rank != 0:
            folds = data.load_folds(out, samples)
    data.log_summary(samples, folds, config.slice_block)
    if dist_info.rank == 0:
        atomic_write_text(out / "config.json", json.dumps(config.to_json(), indent=1))
    results = []
    embeddings: dict[str, torch.Tensor] = {}  # frozen encoder: each image embedded once per run
    for fold, (train_idx, val_idx) in enumerate(folds):
        done = out / f"fold_{fold}" / "done.json"
        if done.is_file():
            results.append(json.loads(done.read_text(encoding="utf-8")))
            log.info("fold %d: already finished (best val Dice %.4f)", fold, results[-1]["best_val_dice"])
            continue
        results.append(run_fold(config, samples, fold, train_idx, val_idx, checkpoint, device, num_workers,
                                dist_info.rank, dist_info.world, cache_dir, embeddings))
    summary = summarize_folds(results)
    summary["config"] = config.to_json()
    if dist_info.rank == 0:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
        log.info("validation Dice over %d fold(s): %.4f +- %.4f (best fold %d)", len(results),
                 summary.get("mean_best_val_dice", 0.0), summary.get("std_best_val_dice", 0.0), summary["best_fold"])
    return summary


def export_merged(config: TrainConfig, adapter: Path, out_path: Path) -> Path:
    """Write the base model with the adapter merged as a plain SAM / MobileSAM state dict.

    The file loads unchanged with ``segment_anything`` / ``mobile_sam``'s own
    ``sam_model_registry[model_type](checkpoint=PATH)`` (1024 px): the model is rebuilt at
    1024 px from the base checkpoint (the frozen position embeddings are the base's), the
    adapter loaded and merged.
    """
    if out_path.exists():
        raise UserError(f"{out_path} exists: choose another --export_merged path (nothing was overwritten)")
    checkpoint = sam_model.resolve_checkpoint(config.model_type, config.checkpoint, announce=False)
    # Random base weights are rebuilt from the seed: the builders draw the same numbers at every
    # input size (size-dependent position tables are zero-initialised).
    torch.manual_seed(config.seed)
    sam = sam_model.build_model(config.model_type, checkpoint, 1024)
    lora.load_adapter(adapter, sam)
    state = lora.merged_state_dict(sam)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, out_path)
    log.info("exported the merged model (%s, adapter %s) to %s", config.model_type, adapter, out_path)
    return out_path


def iter_grid(ranks: Sequence[int], alphas: Sequence[float], lrs: Sequence[float]) -> Iterator[tuple[int, float, float]]:
    for r in ranks:
        for a in alphas:
            for lr in lrs:
                yield r, a, lr
