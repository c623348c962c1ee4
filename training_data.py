"""What a training step eats: prepared items (augmented, prompted, pre-processed), their loader, the embedding cache.

:class:`PromptDataset` runs in DataLoader workers: augmentation, prompt sampling (prompts.py) and
SAM's pre-processing; :class:`EmbeddingCache` keeps a frozen encoder's image embeddings, so each
image (each augmentation variant) is encoded once.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import nn

import model as sam_model
import runfiles
from dataset import augment
from prompts import Prompts, sample_prompts
from sample import Sample
from train_config import TrainConfig


@dataclass
class Item:
    """One image ready for a step: tensor 3xSxS, its prompts (pixel frame, with the target masks
    and ignored pixels) and the same prompts as the prompt encoder's tensors, low-res targets."""

    index: int
    key: str  # content hash (embedding cache key)
    image: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    prompts: Prompts
    tensors: sam_model.PromptTensors
    targets: torch.Tensor  # Nx1xhxw float {0,1} at low resolution (valid region only)
    labels: np.ndarray  # HxW instance labels (after augmentation)
    valid: torch.Tensor | None = None  # 1x1xhxw float: 0 where ignored (ambiguous regions), None = all


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

    def __init__(self, samples: Sequence[Sample], indices: Sequence[int], config: TrainConfig,
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
            image, labels, ignore = augment(image, labels, rng, ignore, enabled=cfg.augment,
                                                 brightness=amount, contrast=amount)
        prompts = sample_prompts(
            labels, rng, prompt=cfg.prompt if self.train else ("point" if cfg.prompt == "point" else "box"),
            num_points=cfg.num_points, box_jitter=cfg.box_jitter if self.train else 0.0,
            max_objects=cfg.max_objects if self.train else 0, ignore=ignore)
        prepared = sam_model.prepare_image(image, cfg.image_size)
        tensors = sam_model.PromptTensors()
        if len(prompts):
            tensors = sam_model.make_prompts(
                prepared.original_size, cfg.image_size,
                boxes=prompts.boxes if prompts.use_boxes else None,
                points=prompts.points if prompts.use_points else None,
                point_labels=prompts.point_labels if prompts.use_points else None)
        key = content_key(image) if not cfg.encoder_trained else ""  # only cached embeddings need it
        valid = None if ignore is None else low_res_targets(~ignore[None], prepared.input_size)
        return Item(index, key, prepared.tensor, prepared.input_size, prepared.original_size, prompts, tensors,
                    low_res_targets(prompts.masks, prepared.input_size), labels, valid)


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

    Keys combine the model type, the base weights (checkpoint hash, or the seed random weights
    were drawn from), image size, precision and the image's content hash; values live in memory
    and, with ``directory``, also on disk across runs.
    """

    def __init__(self, sam: nn.Module, precision: str, directory: Path | None = None,
                 memory: dict[str, torch.Tensor] | None = None, seed: int = 0) -> None:
        self.sam, self.precision, self.directory = sam, precision, directory
        weights = sam.checkpoint_sha256 or f"random-seed{seed}"
        self.prefix = f"{sam.model_type}-{weights}-{sam.image_encoder.img_size}-{precision}"
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
                    runfiles.torch_save(embs[j].cpu(), path)
        return torch.stack([e.to(device) for e in out])  # type: ignore[union-attr]
