"""The training engine shared by ``train`` and ``parameter_search``: steps, epochs, folds, resume.

Composed from small parts: training_data.py's items and embedding cache, losses.py,
:func:`backward_step`, :func:`train_one_epoch`, :func:`validate` (through segmenter.py, as
evaluate segments) and :func:`run_fold` (one fold_plan.FoldPlan: an outer fold or the final fit); the
k-fold loop is crossval.py's. Every epoch ends with an atomic resume checkpoint (fold_plan.FoldState);
the randomness of an epoch is derived from ``(seed, fold, epoch)``, so ``--resume`` after an
interruption ends with the same result as an uninterrupted run. The run directory's layout is runs.py's.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from samlora.core import runfiles
from samlora.core.errors import UserError
from samlora.data.sample import Sample
from samlora.inference import segmenter
from samlora.metrics import scores as metrics
from samlora.models import adapters, combined, encoder_blocks, lora
from samlora.models import sam as sam_model
from samlora.models.model_info import LoadedModel, ModelInfo
from samlora.training import ais
from samlora.training import rounds as iterative
from samlora.training import runs
from samlora.training.config import TrainConfig
from samlora.training.fold_plan import Distributed, FoldPlan, FoldResources, FoldState, StepPlan
from samlora.training.items import EmbeddingCache, Item, PromptDataset, make_cache, make_loader
from samlora.training.losses import decoder_targets, hard_dice, object_losses
from samlora.training.optim import make_schedule, param_groups

log = logging.getLogger(__name__)


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
    scaler: torch.amp.GradScaler | None = None  # fp16: gradients scaled so that they do not flush to zero
    rounds: int = 1  # prompting rounds per step (--sub_iterations)
    ais_losses: list[float] = field(default_factory=list)  # the AIS decoder's loss per step (ais.py)


def embed(ctx: Context, items: Sequence[Item]) -> torch.Tensor:
    """Bx256x(S/16)x(S/16) embeddings of the items' images: the cache's for a frozen encoder; for
    late LoRA the adapted blocks and the neck run on the cached input of the first adapted block
    (gradients flow into them only); else the whole encoder. Call under the context's autocast."""
    if ctx.cache is None:
        return sam_model.encode_images(ctx.sam, torch.stack([it.image for it in items]).to(ctx.device))
    cached = ctx.cache.get(items, ctx.device)
    if ctx.cache.block is None:
        return cached
    return encoder_blocks.run_from_block(ctx.sam.image_encoder, cached, ctx.cache.block)


def backward_step(ctx: Context, items: Sequence[Item]) -> tuple[float | None, float, bool]:
    """Forward and backward of a batch's loss: per image the mean over its objects of the loss
    averaged over the prompting rounds (``--sub_iterations``; as micro-sam, so ``--grad_clip``
    and ``train_loss`` mean the same at any round count), averaged over the images. Returns
    ``(loss, mean first-round Dice at the loss's resolution, finite)``, loss None when no image has objects.

    The embeddings are computed once and shared by every round (iterative.py). Each image's
    objects are decoded in chunks of one prompt kind (:func:`chunk_size`): the decoder's cost per
    prompt grows with the prompts that share a call. Every chunk's and round's share of the loss
    is back-propagated into a detached copy of the embeddings, which then back-propagates once
    through the encoder, so the gradients equal those of one unchunked step. Nothing is
    back-propagated once a loss is not finite (the caller stops the run).
    """
    with_objects = [it for it in items if len(it.prompts)]
    if not with_objects:
        return None, float("nan"), True
    with sam_model.autocast(ctx.device, ctx.config.precision):
        embeddings = embed(ctx, with_objects)
    leaf = embeddings.detach().requires_grad_(embeddings.requires_grad)
    step = _StepLoss(ctx)
    for j, item in enumerate(with_objects):
        tensors = item.tensors.to(ctx.device)
        targets = item.targets.to(ctx.device, torch.float32)
        valid = item.valid.to(ctx.device, torch.float32) if item.valid is not None else None
        step.share = 1 / len(item.prompts) / len(with_objects) / ctx.rounds
        clicks = iterative.make_clicks(item.prompts.masks, item.prompts.ignore, item.input_size, ctx.rounds,
                                       ctx.device) if ctx.rounds > 1 else None
        for rows, kind in item.groups(chunk_size(ctx)):
            iterative.decode_rounds(ctx.sam, leaf[j], iterative.with_kind(tensors.select(rows), kind), targets[rows],
                                    valid, ctx.rounds, step.round, ctx.device, ctx.config.precision,
                                    clicks.select(rows) if clicks is not None else None)
        step.dices.append(step.image_dice / len(item.prompts))
        step.image_dice = 0.0
    if step.finite and ais.training_decoder(ctx.sam) is not None:
        step.instance(leaf, with_objects)
    if step.finite and leaf.grad is not None and embeddings.requires_grad:
        embeddings.backward(leaf.grad)
    return step.total, float(np.mean(step.dices)), step.finite


class _StepLoss:
    """The loss of one step, round by round (the ``choose`` of iterative.decode_rounds): each
    round's share (``share``: the image's objects' weight over the rounds) is back-propagated at
    once; the first round's Dice is kept."""

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.total, self.finite = ctx, 0.0, True
        self.dices: list[float] = []
        self.image_dice, self.share = 0.0, 1.0  # this image's first-round Dice; its objects' weight per round

    def round(self, r: int, low_res: torch.Tensor, iou: torch.Tensor, targets: torch.Tensor,
              valid: torch.Tensor | None) -> None:
        """Loss of one round's NxCx(S/4)x(S/4) logits against Nx1xhxw ``targets`` (input
        resolution), back-propagated."""
        cfg = self.ctx.config
        logits, targets, valid = loss_frame(cfg, low_res, targets, valid)
        losses, best = object_losses(cfg.loss, logits, iou, targets, valid, cfg.iou_loss_weight)
        loss = losses.sum() * self.share
        self.finite = self.finite and bool(torch.isfinite(loss.detach()))
        self.total += float(loss.detach())
        if r == 0:
            self.image_dice += float(hard_dice(sam_model.pick_outputs(logits, best), targets).sum())
        if self.finite:
            scaler = self.ctx.scaler
            (scaler.scale(loss) if scaler is not None else loss).backward()

    def instance(self, leaf: torch.Tensor, items: Sequence[Item]) -> None:
        """The AIS decoder's loss (ais.decoder_loss) on the step's shared Bx256xgxg embeddings
        ``leaf`` times ``--instance_loss_weight``, back-propagated; kept in ``ctx.ais_losses``."""
        ctx = self.ctx
        with sam_model.autocast(ctx.device, ctx.config.precision):
            loss = ais.decoder_loss(ctx.sam.instance_decoder, leaf, items, ctx.device) * ctx.config.instance_loss_weight
        self.finite = bool(torch.isfinite(loss.detach()))
        ctx.ais_losses.append(float(loss.detach()))
        if self.finite:
            (ctx.scaler.scale(loss) if ctx.scaler is not None else loss).backward()


def loss_frame(config: TrainConfig, low_res: torch.Tensor, targets: torch.Tensor,
               valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(logits, targets, valid)`` as the loss and the IoU head's target compare them.

    low_res: NxCx(S/4)x(S/4) logits; targets: Nx1xhxw at the input resolution; valid: 1x1xhxw or
    None. ``--loss_resolution input`` (micro-sam's): the logits upsampled to the input frame and
    cropped to ``hxw``, so a small object's target keeps its pixels. ``decoder`` (SAM's 1/4
    grid): the targets area-averaged down to the logits' grid (losses.decoder_targets), cheaper,
    but an object under ~2x2 input pixels has an empty target there.
    """
    if config.loss_resolution == "decoder":
        targets = decoder_targets(targets)
        valid = None if valid is None else decoder_targets(valid)
        return low_res[..., :targets.shape[-2], :targets.shape[-1]], targets, valid
    return sam_model.input_logits(low_res.float(), config.image_size, tuple(targets.shape[-2:])), targets, valid


def chunk_size(ctx: Context) -> int:
    """Prompts per decoder call in training: ``--decoder_chunk``, else the device's default."""
    return ctx.config.decoder_chunk or segmenter.default_chunk(ctx.device)


def sub_iterations(config: TrainConfig, device: torch.device) -> int:
    """Prompting rounds per step: ``--sub_iterations``, else the device's default: 8 on a GPU (as
    micro-sam; there the decoder is cheap next to the encoder) and 2 on a CPU (one correction
    round, where the decoder costs as much as the encoder)."""
    return config.sub_iterations or (8 if device.type == "cuda" else 2)


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
    decoder = ais.training_decoder(sam)
    if decoder is not None:  # its BatchNorm statistics are saved with it (adapters.trained_state)
        decoder.train()


def train_one_epoch(ctx: Context, loader: torch.utils.data.DataLoader, epoch: int, fold: int,
                    limit: int | None = None) -> dict[str, float]:
    """One pass over the training fold (its first ``limit`` batches when given: the last epoch of
    a run that stops mid-epoch); returns mean loss, first-round Dice and the fp16 steps the
    gradient scaler skipped. A NaN loss on any process stops every process with one message."""
    set_train_mode(ctx.sam)
    ctx.ais_losses.clear()
    params = [p for p in ctx.sam.parameters() if p.requires_grad]
    losses, dices, skipped = [], [], 0
    bar = tqdm(loader, desc=f"fold {fold} epoch {epoch}", leave=False, disable=ctx.rank != 0 or None)
    for step, items in enumerate(bar):
        if limit is not None and step >= limit:
            break
        ctx.optimizer.zero_grad(set_to_none=True)
        loss, dice, finite = backward_step(ctx, items)
        if loss is None and ctx.world == 1:  # no objects in this batch: nothing to learn from
            ctx.scheduler.step()
            continue
        if not all_finite(finite, ctx.world):
            raise UserError(f"the loss became {loss if not finite else 'NaN on another process'} in fold {fold}, "
                            f"epoch {epoch}: training stopped and the last good checkpoint kept; lower "
                            "--learning_rate or use --precision fp32")
        skipped += optimizer_step(ctx, params)  # no objects on this rank: zero gradients join the reduction
        ctx.scheduler.step()
        if loss is not None:
            losses.append(loss)
            dices.append(dice)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
    if skipped:
        log.warning("fold %s epoch %d: the fp16 gradient scaler skipped %d step(s) with inf/NaN gradients",
                    fold, epoch, skipped)
    out = {"train_loss": float(np.mean(losses)) if losses else 0.0,
           "train_dice": float(np.mean(dices)) if dices else 0.0, "skipped_steps": skipped}
    if ctx.ais_losses:  # the prompted loss stays train_loss: comparable with runs without the decoder
        out["train_ais_loss"] = float(np.mean(ctx.ais_losses))
    return out


def all_finite(finite: bool, world: int) -> bool:
    """Whether the loss was finite on every process (under torchrun all must stop together, or
    the others would wait for ever in the gradient reduction)."""
    flag = torch.tensor([1.0 if finite else 0.0])
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def optimizer_step(ctx: Context, params: Sequence[nn.Parameter]) -> int:
    """Gradient reduction, clipping and the optimiser step after :func:`backward_step`; returns 1
    when the fp16 gradient scaler skipped the step (inf/NaN gradients), else 0. The scaler unscales
    the gradients before they are clipped, so ``--grad_clip`` means the same in every precision."""
    scaler = ctx.scaler
    all_reduce_gradients(params, ctx.world)
    if scaler is not None:
        scaler.unscale_(ctx.optimizer)
    if ctx.config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, ctx.config.grad_clip)
    if scaler is None:
        ctx.optimizer.step()
        return 0
    before = scaler.get_scale()
    scaler.step(ctx.optimizer)
    scaler.update()
    return int(scaler.get_scale() < before)


@torch.no_grad()
def validation_rows(ctx: Context, loader: torch.utils.data.DataLoader) -> list[dict[str, Any]]:
    """Per-image semantic scores (with the sample ``index``) at the original image size.

    Prompted as ``evaluate`` prompts by default (prompts.selection_prompts: one exact box per
    object, or one click at its deepest pixel when training used ``--prompt point``, answered
    with the best of SAM's three masks by predicted IoU); images without objects are skipped, as
    in ``evaluate``, and segmented as evaluate segments them (segmenter.py). Under
    torchrun every process scores its share and all get every row.
    """
    ctx.sam.eval()
    rows = []
    for items in loader:
        items = [it for it in items if len(it.prompts)]  # nothing to prompt: every model scores 1
        if not items:
            continue
        with sam_model.autocast(ctx.device, ctx.config.precision):
            embeddings = embed(ctx, items)
            for j, item in enumerate(items):
                found = segmenter.decode_instances(ctx.sam, embeddings[j:j + 1], item.prompts, item.original_size,
                                                   chunk=chunk_size(ctx))
                pred = segmenter.paint_instances(found, item.original_size)[0]
                scores = metrics.semantic_metrics(item.labels, pred, ignore=item.prompts.ignore)
                rows.append({"index": item.index, **scores})
    if ctx.world > 1:
        import torch.distributed as dist

        gathered: list[list[dict]] = [[] for _ in range(ctx.world)]
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    return sorted(rows, key=lambda r: r["index"])


def validate(ctx: Context, loader: torch.utils.data.DataLoader) -> dict[str, float]:
    """Mean per-image Dice and IoU and the pooled Dice of :func:`validation_rows`."""
    rows = validation_rows(ctx, loader)
    if not rows:
        return {"val_dice": 0.0, "val_iou": 0.0, "val_pooled_dice": 0.0}
    pooled = metrics.pooled_semantic_metrics(rows)
    return {"val_dice": float(np.mean([r["dice"] for r in rows])),
            "val_iou": float(np.mean([r["iou"] for r in rows])),
            "val_pooled_dice": float(pooled["dice"])}


# --------------------------------------------------------------------------------------------
# Model set-up, checkpoints
# --------------------------------------------------------------------------------------------
def build_trainable_model(config: TrainConfig, checkpoint: Path | None, device: torch.device) -> LoadedModel:
    """``(sam, info)``: the base model with LoRA injected and only the chosen parameters
    trainable, on ``device``, and the base model's :class:`ModelInfo`.

    Random base weights (no checkpoint) come from ``torch.manual_seed(config.seed)`` alone, so
    every fold and :func:`export_merged` rebuild the very same base model.
    """
    torch.manual_seed(config.seed)
    sam, info = combined.build_model(config.model_type, checkpoint, config.image_size)  # + a combined file's decoder
    if config.lora_rank > 0:
        targets = lora.parse_targets(config.lora_targets)
        if config.freeze_encoder:
            targets = tuple(t for t in targets if lora.TARGETS[t].scope != "image_encoder")
        lora.inject_lora(sam, config.lora_rank, config.lora_alpha, targets, config.lora_dropout,
                         config.lora_block_indices if config.encoder_trained else None)
    lora.mark_only_lora_as_trainable(sam, train_decoder=config.train_decoder)
    ais.ensure_decoder(sam, config.instance_decoder)  # after the freeze: its parameters train
    return LoadedModel(sam.to(device), info)


def adapter_config(config: TrainConfig, sam: nn.Module, info: ModelInfo, fold: int | None, epoch: int,
                   val: dict[str, float], rounds: int) -> dict[str, Any]:
    """What an adapter file records about its training: model type, input size and the training
    patch size (the scale objects were seen at), targets, the encoder blocks with LoRA
    (``--lora_blocks`` resolved; None without encoder LoRA), base weights, fold (None: the final
    fit on all training data), epoch, its selection score, seed, prompt and prompting rounds."""
    targets = [layer.target for layer in lora.lora_layers(sam).values()] if config.lora_rank > 0 else []
    return {"model_type": config.model_type, "image_size": config.image_size, "patch_size": config.patch_size,
            "base_checkpoint_sha256": info.checkpoint_sha256, "targets": sorted(set(targets)) or None,
            "blocks": list(config.lora_block_indices) if config.encoder_trained else None,
            "train_decoder": config.train_decoder, "fold": fold, "epoch": epoch,
            "selection_dice": val.get("val_dice"), "seed": config.seed, "prompt": config.prompt,
            "sub_iterations": rounds}


def epoch_steps(n_items: int, batch_size: int, world: int = 1) -> int:
    """Optimiser steps (batches) in an epoch over ``n_items`` training items, each of ``world``
    processes taking ceil(n / world) of them (make_loader pads the order to that)."""
    return math.ceil(math.ceil(n_items / world) / batch_size)


def seed_everything(seed: int, fold: int, epoch: int, rank: int = 0) -> None:
    """Seed torch (dropout) from (seed, fold, epoch) and the process's rank, so torchrun processes
    draw different dropout masks: resumable without stored RNG state."""
    torch.manual_seed(int(np.random.default_rng([seed, fold, epoch] + ([rank] if rank else [])).integers(2**31)))


# --------------------------------------------------------------------------------------------
# One fold, all folds
# --------------------------------------------------------------------------------------------
def run_fold(config: TrainConfig, samples: Sequence[Sample], plan: FoldPlan, shared: FoldResources) -> dict[str, Any]:
    """Train one fold on ``plan.train_idx`` (resuming from ``last.pt``), choose its checkpoint, score it.

    The epoch is chosen (best checkpoint, early stopping) by the Dice on ``plan.select_idx``: an
    inner validation split of the training groups, never the images the fold is scored on; without
    one the last epoch is kept. The chosen adapter (``best.pt``) is then scored once on
    ``plan.score_idx`` (the outer fold): those per-image rows are the fold's unbiased estimate.
    Writes ``best.pt``, ``last.pt`` and ``done.json`` in ``plan.directory``; returns the result.
    ``shared`` holds what every fold of the run shares (the embedding cache among it).
    """
    sam, info = build_trainable_model(config, shared.checkpoint, shared.device)
    optimizer = torch.optim.AdamW(param_groups(sam, config.weight_decay), lr=config.learning_rate)
    train_set = PromptDataset(samples, plan.train_idx, config, plan.fold, train=True)
    per_epoch = epoch_steps(len(train_set), config.batch_size, shared.world)
    steps = plan.steps or StepPlan(per_epoch * config.epochs, per_epoch * config.epochs)
    scheduler = make_schedule(optimizer, steps.schedule, config.warmup_fraction)
    cache = make_cache(sam, info, config, shared.cache_dir, shared.embeddings, shared.cache_bytes)
    scaler = torch.amp.GradScaler(shared.device.type) if config.precision == "fp16" else None
    ctx = Context(sam, config, shared.device, cache, optimizer, scheduler, shared.rank, shared.world, scaler,
                  sub_iterations(config, shared.device))
    state = resume_fold(plan, sam, optimizer, scheduler)
    log.info("fold %s: %d prompting round(s) per step (--sub_iterations)", plan.label, ctx.rounds)
    select = fold_loader(ctx, samples, plan, plan.select_idx, shared.num_workers) if plan.select_idx else None
    for epoch in range(state.epoch + 1, math.ceil(steps.stop / per_epoch)):
        if config.early_stopping and state.bad_epochs >= config.patience:
            log.info("fold %s: early stop, no improvement for %d epochs", plan.label, config.patience)
            break
        row = run_epoch(ctx, plan, train_set, select, epoch, steps.stop - epoch * per_epoch, shared.num_workers)
        end_epoch(ctx, info, state, row, plan)
    if cache is not None:
        log.info("fold %s: %s cache %d hits, %d passes through the frozen part", plan.label,
                 "embedding" if cache.block is None else f"block {cache.block} input", cache.hits, cache.misses)
    Distributed(shared.rank, shared.world).barrier()  # rank 0 writes best.pt; every process reads it back
    sam.load_state_dict(adapters.read_adapter(plan.directory / "best.pt")[1], strict=False)  # the chosen epoch
    score = fold_loader(ctx, samples, plan, plan.score_idx, shared.num_workers) if plan.score_idx else None
    scored = validation_rows(ctx, score) if score is not None else []
    instance = ais.fold_results(ctx, plan.directory / "best.pt", select, score, scored, embed) \
        if ais.training_decoder(sam) is not None else {}
    result = {"fold": plan.fold, "best_epoch": state.best_epoch, "epochs_run": state.epoch + 1,
              "selection": "inner validation split" if plan.select_idx else "last epoch (no inner split)",
              "selection_dice": state.best_dice if plan.select_idx else None,
              "adapter": str(plan.directory / "best.pt"), "train_size": len(plan.train_idx),
              "selection_size": len(plan.select_idx), "scored_size": len(scored),
              "scored": [{"index": r["index"], "key": samples[r["index"]].key, "dice": r["dice"], "iou": r["iou"],
                          **({"ais_msa": r["ais_msa"]} if "ais_msa" in r else {})} for r in scored], **instance}
    if shared.rank == 0:
        runfiles.write_json(plan.directory / "done.json", result)
    return result


def fold_loader(ctx: Context, samples: Sequence[Sample], plan: FoldPlan, indices: Sequence[int],
                num_workers: int) -> torch.utils.data.DataLoader:
    """The unshuffled, unaugmented loader of ``samples[indices]`` (selection or scoring)."""
    return make_loader(PromptDataset(samples, indices, ctx.config, plan.fold, train=False), ctx.config.batch_size,
                       None, num_workers, ctx.rank, ctx.world)


def run_epoch(ctx: Context, plan: FoldPlan, train_set: PromptDataset, select: torch.utils.data.DataLoader | None,
              epoch: int, limit: int, num_workers: int = 0) -> dict[str, Any]:
    """Train epoch ``epoch`` (its first ``limit`` steps at most), seeded from (seed, fold, epoch),
    then score the selection loader ``select``; returns the epoch's metrics row (``fold``:
    :attr:`FoldPlan.label`)."""
    start = time.perf_counter()
    config = ctx.config
    seed_everything(config.seed, plan.fold, epoch, ctx.rank)
    train_set.epoch = epoch
    shuffle = int(np.random.default_rng([config.seed, plan.fold, epoch, 7]).integers(2**31))
    row = train_one_epoch(ctx, make_loader(train_set, config.batch_size, shuffle, num_workers, ctx.rank, ctx.world),
                          epoch, plan.fold, limit=limit)
    row.update(validate(ctx, select) if select is not None else {})
    if select is not None and ais.training_decoder(ctx.sam) is not None:
        row["val_ais_msa"] = ais.mean_msa(ctx, select, embed)
    row.update(fold=plan.label, epoch=epoch, lr=ctx.scheduler.get_last_lr()[0],
               seconds=round(time.perf_counter() - start, 2))
    return row


def end_epoch(ctx: Context, info: ModelInfo, state: FoldState, row: dict[str, Any], plan: FoldPlan) -> None:
    """Book-keeping after an epoch: the chosen checkpoint (``best.pt``: the best selection Dice,
    or every epoch without a selection split), the resume state, metrics.csv and the log line."""
    improved = state.record(row)
    if ctx.rank == 0:
        if improved:
            adapters.save_adapter(plan.directory / "best.pt", ctx.sam,
                                  adapter_config(ctx.config, ctx.sam, info, plan.adapter_fold, row["epoch"], row,
                                                 ctx.rounds))
        runfiles.torch_save({"trainable": adapters.trained_state(ctx.sam), "optimizer": ctx.optimizer.state_dict(),
                             "scheduler": ctx.scheduler.state_dict(), "state": state.to_saved()},
                            plan.directory / "last.pt")
        runs.write_metrics_csv(Path(ctx.config.output_dir))
    log.info("fold %s epoch %d: loss %.4f, train Dice %.3f (first round)%s (%.1f s)", plan.label, row["epoch"],
             row["train_loss"], row["train_dice"],
             f", selection Dice {row['val_dice']:.4f}, IoU {row['val_iou']:.4f}" + (" *" if improved else "")
             if "val_dice" in row else "", row["seconds"])


def resume_fold(plan: FoldPlan, sam: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler) -> FoldState:
    """The fold's training state: loaded from its resume checkpoint ``last.pt`` (into the model,
    optimiser and schedule) when there is one, else a fresh state."""
    last = plan.directory / "last.pt"
    if not last.is_file():
        return FoldState()
    saved = torch.load(last, map_location="cpu", weights_only=True)
    sam.load_state_dict(saved["trainable"], strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state = FoldState.from_saved(saved["state"])
    log.info("fold %s: resuming after epoch %d (best val Dice %.4f at epoch %d)", plan.label,
             state.epoch, state.best_dice, state.best_epoch)
    return state
