"""What a training step eats: prepared items (augmented, prompted, pre-processed), their loader, the embedding cache.

:class:`PromptDataset` runs in DataLoader workers: augmentation, prompt sampling (prompts.py) and
SAM's pre-processing; :class:`EmbeddingCache` keeps the output of the encoder's frozen start (a
frozen encoder's image embeddings, or late LoRA's input of the first adapted block), so each image
(each augmentation variant) goes through it once.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import nn

from samlora.core import runfiles
from samlora.core.errors import UserError
from samlora.data.dataset import DIHEDRAL, augment
from samlora.data.prompts import Prompts, sample_prompts, selection_prompts
from samlora.data.sample import Sample
from samlora.models import encoder_blocks
from samlora.models import sam as sam_model
from samlora.models.model_info import ModelInfo
from samlora.training.config import TrainConfig
from samlora.training.instance_targets import MICRO_SAM_MIN_SIZE, instance_targets

log = logging.getLogger(__name__)


@dataclass
class Item:
    """One image ready for a step: tensor 3xSxS, its prompts (pixel frame, with the target masks
    and ignored pixels), the same prompts as the prompt encoder's tensors, and the target masks
    at the input resolution."""

    index: int
    key: str  # content hash (embedding cache key)
    image: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    prompts: Prompts
    tensors: sam_model.PromptTensors
    targets: torch.Tensor  # Nx1xhxw bool at the input resolution (h, w = input_size: no padding)
    labels: np.ndarray  # HxW instance labels (after augmentation)
    valid: torch.Tensor | None = None  # 1x1xhxw bool: False where ignored (ambiguous regions), None = all
    # 3xHxW float32 AIS decoder targets at the original size (instance_targets.py); training
    # items of a --instance_decoder run only
    instance_targets: torch.Tensor | None = None

    def groups(self, chunk: int) -> list[tuple[slice, int]]:
        """The objects' rows in decoder calls: runs of one prompt kind (bits prompts.BOX /
        POINTS; the objects are ordered by kind), cut into chunks of at most ``chunk`` rows."""
        kinds = self.prompts.object_kinds()
        out, start = [], 0
        for end in range(1, len(kinds) + 1):
            if end == len(kinds) or kinds[end] != kinds[start] or end - start == chunk:
                out.append((slice(start, end), int(kinds[start])))
                start = end
        return out


def content_key(image: np.ndarray) -> str:
    """A hash of the pixels (and shape): the embedding cache key of an image."""
    digest = hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16)
    digest.update(str(image.shape).encode())
    return digest.hexdigest()


def input_targets(masks: np.ndarray, input_size: tuple[int, int], keep_small: bool = True) -> torch.Tensor:
    """NxHxW bool masks -> Nx1xhxw bool at the input resolution (``input_size``: the image resized
    as SAM resizes it, without the padding), what the loss compares the upsampled logits with.

    Each mask is resized as its image is (area average when shrinking, bilinear when enlarging)
    and thresholded at 0.5. With ``keep_small`` an object that covers no output pixel by half keeps
    the one it covers most: a prompted object never has an empty target.
    """
    h, w = input_size
    out = np.zeros((masks.shape[0], 1, h, w), bool)
    for i, mask in enumerate(masks):
        if mask.shape == (h, w):
            out[i, 0] = mask
            continue
        shrink = h * w < mask.shape[0] * mask.shape[1]
        cover = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        out[i, 0] = cover >= 0.5
        if keep_small and not out[i, 0].any() and mask.any():
            out[i, 0].flat[int(np.argmax(cover))] = True
    return torch.from_numpy(out)


class PromptDataset(torch.utils.data.Dataset):
    """Samples -> :class:`Item` (augmentation, prompt sampling and pre-processing).

    The randomness of item ``i`` in ``epoch`` comes from ``(seed, fold, epoch, i)``, so it does
    not depend on worker count or on interruptions. With a cached encoder start (a frozen encoder
    or late LoRA, ``config.cached``; ``intensity=False``) there is no intensity change and each
    image has a fixed set of flip / rotation views (:meth:`variant`), so it is cached per view.
    Training items take sampled prompts (prompts.sample_prompts); the others (epoch selection,
    fold scores) take the prompts ``evaluate`` gives by default (prompts.selection_prompts).
    """

    def __init__(self, samples: Sequence[Sample], indices: Sequence[int], config: TrainConfig,
                 fold: int, train: bool) -> None:
        self.samples, self.indices, self.config = samples, list(indices), config
        self.fold, self.train, self.epoch = fold, train, 0
        self.intensity = not (train and config.cached)

    def __len__(self) -> int:
        return len(self.indices)

    def variant(self, index: int) -> tuple[bool, int]:
        """The flip / rotation of sample ``index`` this epoch, for a frozen (cached) encoder: one of
        its ``augment_variants`` views (the original first, the others a seeded choice of the 8),
        in turn by epoch, so each view is embedded once and every later epoch hits the cache."""
        others = [v for v in np.random.default_rng([self.config.seed, index]).permutation(len(DIHEDRAL)) if v != 0]
        views = [0, *others][:self.config.augment_variants]
        return DIHEDRAL[views[self.epoch % len(views)]]

    def __getitem__(self, position: int) -> Item:
        cfg = self.config
        index = self.indices[position]
        sample = self.samples[index]
        rng = np.random.default_rng([cfg.seed, self.fold, self.epoch if self.train else 0, index])
        image, labels, ignore = sample.image, sample.labels, sample.ignore
        if self.train:
            amount = 0.1 if (cfg.augment and self.intensity) else 0.0
            image, labels, ignore = augment(image, labels, rng, ignore, enabled=cfg.augment, brightness=amount,
                                            contrast=amount, geometry=None if self.intensity else self.variant(index))
        if self.train:
            prompts = sample_prompts(labels, rng, prompt=cfg.prompt, num_points=cfg.num_points,
                                     box_jitter=cfg.box_jitter, max_objects=cfg.max_objects, ignore=ignore)
        else:  # epoch selection and fold scores prompt as evaluate does
            prompts = selection_prompts(labels, cfg.prompt, ignore)
        if prompts.kinds is not None:  # --prompt mix: one kind per decoder call
            prompts = prompts.take(np.argsort(prompts.kinds, kind="stable"))
        prepared = sam_model.prepare_image(image, cfg.image_size)
        tensors = sam_model.PromptTensors()
        if len(prompts):  # every object's box and points; each call takes those of its objects' kind
            tensors = sam_model.make_prompts(
                prepared.original_size, cfg.image_size,
                boxes=prompts.boxes if prompts.use_boxes else None,
                points=prompts.points if prompts.use_points else None,
                point_labels=prompts.point_labels if prompts.use_points else None)
        key = content_key(image) if cfg.cached else ""  # only the cache needs it
        valid = None if ignore is None else input_targets(~ignore[None], prepared.input_size, keep_small=False)
        maps = torch.from_numpy(instance_targets(labels, MICRO_SAM_MIN_SIZE)) \
            if self.train and cfg.instance_decoder else None
        return Item(index, key, prepared.tensor, prepared.input_size, prepared.original_size, prompts, tensors,
                    input_targets(prompts.masks, prepared.input_size), labels, valid, maps)


def cached_augmentation(config: TrainConfig) -> str | None:
    """What a run with a cached encoder start (a frozen encoder, or late LoRA) loses of its
    augmentation, in one line; None when nothing is cached or augmentation is off."""
    if not (config.cached and config.augment):
        return None
    first = config.first_lora_block
    why = "the encoder is frozen" if first is None else \
        f"late LoRA (--lora_blocks {config.lora_blocks}) caches the input of block {first}"
    return (f"{why}: its output is cached per image view, so training sees no intensity augmentation and only "
            f"{config.augment_variants} of the 8 flips / rotations of each image (--augment_variants)")


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
# Embedding cache (a frozen encoder, or the frozen blocks before late LoRA)
# --------------------------------------------------------------------------------------------
def embedding_bytes(image_size: int, precision: str) -> int:
    """Bytes of one cached image embedding: 256 x (S/16)^2 values in the storage dtype."""
    return 256 * (image_size // 16) ** 2 * encoder_blocks.storage_dtype(precision).itemsize


def cached_bytes(config: TrainConfig) -> int:
    """Bytes one image view takes in the cache of ``config``'s run: its image embedding (frozen
    encoder) or its input of the first adapted block (late LoRA)."""
    block = config.first_lora_block
    if block is None:
        return embedding_bytes(config.image_size, config.precision)
    return encoder_blocks.block_input_bytes(config.model_type, config.image_size, block, config.precision)


def check_cache_budget(configs: Sequence[TrainConfig], n_images: int, memory_gb: float,
                       directory: Path | None) -> None:
    """State the cache's size up front; refuse one that cannot fit in ``memory_gb`` (unless it goes
    to disk) before anything is written. ``configs``: the runs that share the cache's memory (one
    training, or a search's configurations: each cached encoder start counted once)."""
    kinds = {(c.first_lora_block, c.augment_variants if c.augment else 1): c for c in configs if c.cached}
    need = 0
    for (block, views), config in kinds.items():
        size = cached_bytes(config)
        need += n_images * views * size
        log.info("%s cache: up to %d images x %d view(s) x %.1f MiB = %.2f GiB (--cache_memory_gb %g%s)",
                 "embedding" if block is None else f"block {block} input (late LoRA)", n_images, views,
                 size / 2**20, n_images * views * size / 2**30, memory_gb, f", on disk in {directory}" if directory else "")
    if need > memory_gb * 2**30 and directory is None:
        raise UserError(f"the cache needs {need / 2**30:.1f} GiB but --cache_memory_gb is {memory_gb:g}: raise it, "
                        "lower --augment_variants or --image_size, use --precision bf16, or keep it on disk with "
                        "--embedding_cache DIR")


def make_cache(sam: nn.Module, info: ModelInfo, config: TrainConfig, directory: Path | None = None,
               memory: dict[str, torch.Tensor] | None = None, max_bytes: float = float("inf")) -> "EmbeddingCache | None":
    """The cache of ``config``'s run on base model ``sam`` (``info``: its identity; None when the
    encoder trains from its first block)."""
    if not config.cached:
        return None
    return EmbeddingCache(sam, info, config.precision, directory, memory, config.seed, max_bytes,
                          config.first_lora_block)


class EmbeddingCache:
    """The output of the encoder's frozen start, computed once per image content (and view): the
    image embeddings of a frozen encoder (``block=None``), or the input of encoder ``block``, the
    first with LoRA (late LoRA: encoder_blocks.run_to_block).

    Keys combine the model type and base weights of ``info`` (checkpoint hash, or the seed random weights
    were drawn from), image size, precision, the block and the image's content hash. Values are
    kept in encoder_blocks.storage_dtype (bfloat16 unless fp32) in CPU memory up to ``max_bytes``
    (moved to the device per batch, as float32) and, with ``directory``, on disk across runs;
    beyond the memory budget they are read back from disk.
    """

    def __init__(self, sam: nn.Module, info: ModelInfo, precision: str, directory: Path | None = None,
                 memory: dict[str, torch.Tensor] | None = None, seed: int = 0, max_bytes: float = float("inf"),
                 block: int | None = None) -> None:
        self.sam, self.precision, self.directory, self.max_bytes = sam, precision, directory, max_bytes
        self.block = block
        weights = info.checkpoint_sha256 or f"random-seed{seed}"
        self.prefix = f"{info.model_type}-{weights}-{sam.image_encoder.img_size}-{precision}" + \
            ("" if block is None else f"-block{block}")
        # shared across the folds of a run: the frozen part is the same in every fold
        self.memory: dict[str, torch.Tensor] = {} if memory is None else memory
        self.bytes = sum(v.numel() * v.element_size() for v in self.memory.values())
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{hashlib.sha1((self.prefix + key).encode()).hexdigest()}.pt"

    def _keep(self, key: str, embedding: torch.Tensor) -> None:
        size = embedding.numel() * embedding.element_size()
        if self.bytes + size <= self.max_bytes:
            self.memory[self.prefix + key] = embedding
            self.bytes += size
        elif self.directory is None:
            raise UserError(f"the embedding cache outgrew --cache_memory_gb ({self.max_bytes / 2**30:.1f} GiB): raise "
                            "it or keep the embeddings on disk with --embedding_cache DIR")

    def _lookup(self, key: str) -> torch.Tensor | None:
        found = self.memory.get(self.prefix + key)
        path = self._path(key)
        if found is None and path is not None and path.is_file():
            found = torch.load(path, weights_only=True)
            self._keep(key, found)
        return found

    def compute(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Bx3xSxS images -> the frozen start's output (no gradients), on the CPU in the storage dtype."""
        with torch.no_grad(), sam_model.autocast(device, self.precision):
            out = sam_model.encode_images(self.sam, images) if self.block is None else \
                encoder_blocks.run_to_block(self.sam.image_encoder, images, self.block)
        return out.detach().to("cpu", encoder_blocks.storage_dtype(self.precision))

    def get(self, items: Sequence[Item], device: torch.device) -> torch.Tensor:
        """The cached outputs of the items' images, stacked, as float32 on ``device`` (the frozen
        start runs only for images not seen before): Bx256xgxg embeddings, or the input of
        ``block`` (BxgxgxC for SAM ViT, BxLxC for TinyViT)."""
        out = [self._lookup(item.key) for item in items]
        todo = [i for i, e in enumerate(out) if e is None]
        self.hits += len(items) - len(todo)
        self.misses += len(todo)
        if todo:
            embs = self.compute(torch.stack([items[i].image for i in todo]).to(device), device)
            for j, i in enumerate(todo):
                out[i] = embs[j].clone()  # its own storage: a view would keep (and save) the whole batch
                self._keep(items[i].key, out[i])
                path = self._path(items[i].key)
                if path is not None:
                    runfiles.torch_save(out[i], path)
        return torch.stack([e.to(device, torch.float32) for e in out])  # type: ignore[union-attr]
