"""What the training rows of the bench modules share: a small training configuration, a LoRA model
with its optimiser and a one-image-per-step loader on real samples, and the row reporter's type."""
from __future__ import annotations

import time
from typing import Callable

import torch

from samlora.data.sample import Sample
from samlora.models import sam as sam_model
from samlora.training import losses, trainer
from samlora.training.config import TrainConfig
from samlora.training.items import PromptDataset, make_cache, make_loader

Report = Callable[..., None]  # report(name, value, unit_or_note): prints and records one row


def make_config(model_type: str, image_size: int, precision: str = "fp32", **changes) -> TrainConfig:
    base = dict(data_dir="", output_dir="", model_type=model_type, checkpoint="none", image_size=image_size,
                precision=precision, max_objects=4, lora_rank=8, lora_alpha=8, box_jitter=0.1)
    base.update(changes)
    return TrainConfig(**base)


class Setup:
    """A LoRA model, a context with optimiser, and a one-image-per-step loader on real samples."""

    def __init__(self, config: TrainConfig, samples: list[Sample]) -> None:
        torch.manual_seed(0)
        self.config = config
        self.sam, info = trainer.build_trainable_model(config, None, torch.device("cpu"))
        params = [p for p in self.sam.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        sched = trainer.make_schedule(opt, 10_000, 0.0)
        cache = make_cache(self.sam, info, config)
        self.ctx = trainer.Context(self.sam, config, torch.device("cpu"), cache, opt, sched)
        self.dataset = PromptDataset(samples, range(len(samples)), config, 0, train=True)
        self.loader = make_loader(self.dataset, 1, None, 0)
        self.item = self.dataset[0]

    def epoch(self) -> float:
        """Seconds per step of a real training epoch (data, prompts, loss, optimiser included)."""
        start = time.perf_counter()
        trainer.train_one_epoch(self.ctx, self.loader, 0, 0)
        return (time.perf_counter() - start) / len(self.dataset)

    def bare(self, encoder: bool = True) -> float:
        """One bare forward+backward of the same model on a prepared input (no data work)."""
        sam, item = self.sam, self.item
        prompts = item.tensors
        with sam_model.autocast(torch.device("cpu"), self.config.precision):
            if encoder:
                emb = sam.image_encoder(item.image[None])
            else:
                emb = self._embedding()
            low, iou = sam_model.decode(sam, emb[0], prompts)  # every prompt in one decoder call
        logits, targets, _ = trainer.loss_frame(self.config, low, item.targets.float(), None)
        loss = losses.compute_loss("dice_ce", logits, iou, targets)
        loss.backward()
        self.sam.zero_grad(set_to_none=True)
        return 0.0

    def _embedding(self) -> torch.Tensor:
        if not hasattr(self, "_emb"):
            with torch.no_grad(), sam_model.autocast(torch.device("cpu"), self.config.precision):
                self._emb = self.sam.image_encoder(self.item.image[None])
        return self._emb
