"""The training engine shared by ``train`` and ``parameter_search``: steps, epochs, folds, resume.

Composed from small parts: training_data.py's items and embedding cache, losses.py,
:func:`train_one_epoch`, :func:`validate` (through inference.py, as evaluate segments),
:func:`run_fold` and :func:`run_training` (the k-fold loop). Every epoch ends with an atomic
resume checkpoint; the randomness of an epoch is derived from ``(seed, fold, epoch)``, so
``--resume`` after an interruption ends with the same result as an uninterrupted run. The run
directory's layout is runs.py's.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import adapters
import checkpoints
import dataset as data
import folds as folds_lib
import inference
import lora
import metrics
import model as sam_model
import runfiles
import runs
from errors import UserError
from losses import compute_loss, hard_dice
from sample import Sample
from train_config import TrainConfig
from training_data import EmbeddingCache, Item, PromptDataset, make_loader

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


def embed(ctx: Context, items: Sequence[Item]) -> torch.Tensor:
    """Bx256x(S/16)x(S/16) embeddings of the items' images (the cache's for a frozen encoder).
    Call under the context's autocast."""
    if ctx.cache is not None:
        return ctx.cache.get(items, ctx.device)
    return sam_model.encode_images(ctx.sam, torch.stack([it.image for it in items]).to(ctx.device))


def forward_items(ctx: Context, items: Sequence[Item]) -> list[sam_model.SamOutput]:
    """Run :func:`model.sam_forward` on items that have prompts (low-res logits, differentiable)."""
    items = [it for it in items if len(it.prompts)]
    if not items:
        return []
    prompts = [it.tensors.to(ctx.device) for it in items]
    with sam_model.autocast(ctx.device, ctx.config.precision):
        return sam_model.sam_forward(ctx.sam, None, prompts, [it.input_size for it in items],
                                     image_embeddings=embed(ctx, items))


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


@torch.no_grad()
def validate(ctx: Context, loader: torch.utils.data.DataLoader) -> dict[str, float]:
    """Dice and IoU at the original image size on the validation fold (no augmentation).

    Box prompts without jitter (points when training used points); images without objects are
    skipped, as in ``evaluate``, and segmented as evaluate segments them (inference.py).
    ``dice``/``iou`` are means of per-image semantic scores; ``pooled_dice`` sums pixels over
    the fold first.
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
                found = inference.decode_instances(ctx.sam, embeddings[j:j + 1], item.prompts, item.original_size,
                                                   chunk=max(1, len(item.prompts)))
                pred = inference.paint_instances(found, item.original_size)[0]
                rows.append(metrics.semantic_metrics(item.labels, pred, ignore=item.prompts.ignore))
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
def run_fold(config: TrainConfig, samples: Sequence[Sample], fold: int, train_idx: Sequence[int],
             val_idx: Sequence[int], checkpoint: Path | None, device: torch.device, num_workers: int = 0,
             rank: int = 0, world: int = 1, cache_dir: Path | None = None,
             embeddings: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Train one fold to the end (or early stop), resuming from ``fold_k/last.pt`` if present.

    Writes ``fold_k/best.pt`` (adapter of the best validation Dice), ``fold_k/last.pt`` (resume
    state, every epoch) and ``fold_k/done.json``; returns the fold's result and its history.
    ``embeddings`` is the run's shared frozen-encoder cache (memory), reused by every fold.
    """
    fold_dir = runs.fold_dir(Path(config.output_dir), fold)
    sam = build_trainable_model(config, checkpoint, device)
    params = [p for p in sam.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    train_set = PromptDataset(samples, train_idx, config, fold, train=True)
    val_set = PromptDataset(samples, val_idx, config, fold, train=False)
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / world) / config.batch_size)
    scheduler = make_schedule(optimizer, steps_per_epoch * config.epochs, config.warmup_fraction)
    cache = EmbeddingCache(sam, config.precision, cache_dir, embeddings) if not config.encoder_trained else None
    ctx = Context(sam, config, device, cache, optimizer, scheduler, rank, world)

    last = fold_dir / "last.pt"
    state = resume_fold(last, sam, optimizer, scheduler, fold)
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
                adapters.save_adapter(fold_dir / "best.pt", sam, adapter_config(config, sam, fold, epoch, row))
            runfiles.torch_save({"trainable": trainable_state(sam), "optimizer": optimizer.state_dict(),
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
        runfiles.write_json(fold_dir / "done.json", result)
    return result


def resume_fold(last: Path, sam: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, fold: int) -> dict[str, Any]:
    """The fold's training state: loaded from its resume checkpoint ``last`` (into the model,
    optimiser and schedule) when there is one, else a fresh state."""
    if not last.is_file():
        return {"epoch": -1, "best_dice": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": []}
    saved = torch.load(last, map_location="cpu", weights_only=True)
    sam.load_state_dict(saved["trainable"], strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state = saved["state"]
    log.info("fold %d: resuming after epoch %d (best val Dice %.4f at epoch %d)", fold,
             state["epoch"], state["best_dice"], state["best_epoch"])
    return state


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
    runfiles.write_csv(out / runs.METRICS_FILE, rows, columns)


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


def claim_output_dir(config: TrainConfig, resume: bool, overwrite: bool) -> runfiles.OutputDir:
    """The run directory (runfiles' one rule): an existing run needs ``--resume`` with the same
    options, or ``--overwrite``, which removes only the earlier run's files."""
    out = runfiles.OutputDir(config.output_dir, "train")
    config_path = out.path / runs.CONFIG_FILE
    if resume:
        if not config_path.is_file():
            raise UserError(f"--resume: no run to resume in {out.path} (no config.json); start it without --resume")
        saved = runs.read_run_config(out.path)
        current = config.to_json()
        diff = [k for k in current if saved.get(k) != current[k]]
        if diff:
            shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in diff[:4])
            raise UserError(f"--resume: the options differ from the run in {out.path} ({shown}); resume with "
                            "the same options, or start a new --output_dir")
        return out.claim(overwrite=False, resume=True)
    if config_path.is_file() and not overwrite:
        raise UserError(f"{out.path} holds another run: use --resume to continue it, --overwrite to replace it, "
                        "or a new --output_dir")
    if overwrite and config_path.is_file() and out.owner() is None:
        _remove_unrecorded_run(out.path)
    return out.claim(overwrite)


def _remove_unrecorded_run(path: Path) -> None:
    """A run written before run directories had a manifest: remove the files train writes (by
    name), so that no stale ``last.pt`` is resumed; anything else stays."""
    for name in (runs.CONFIG_FILE, folds_lib.FOLDS_FILE, runs.METRICS_FILE, runs.SUMMARY_FILE, runs.LOG_FILE):
        (path / name).unlink(missing_ok=True)
    for fold_path in path.glob("fold_*"):
        for name in ("best.pt", "last.pt", "done.json"):
            (fold_path / name).unlink(missing_ok=True)
    log.warning("--overwrite: removed the earlier run's files in %s", path)


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


def run_training(config: TrainConfig, samples: Sequence[Sample], device: torch.device,
                 num_workers: int = 0, folds: Sequence[tuple[list[int], list[int]]] | None = None,
                 cache_dir: Path | None = None) -> dict[str, Any]:
    """Train every fold (resuming finished ones from ``done.json``) and write the summary."""
    out = Path(config.output_dir)
    dist_info = Distributed.setup(device)
    if dist_info.world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    checkpoint = checkpoints.resolve_checkpoint(config.model_type, config.checkpoint, announce=False)
    if folds is None:  # rank 0 writes folds.json, the others read it
        if dist_info.rank == 0:
            folds = folds_lib.load_or_make_folds(out, samples, config.num_splits, config.seed, config.slice_block,
                                            config.val_fraction)
        dist_info.barrier()
        if dist_info.rank != 0:
            folds = folds_lib.load_folds(out, samples)
    data.log_summary(samples, folds, config.slice_block)
    if dist_info.rank == 0:
        runfiles.write_json(out / runs.CONFIG_FILE, config.to_json())
    results = []
    embeddings: dict[str, torch.Tensor] = {}  # frozen encoder: each image embedded once per run
    for fold, (train_idx, val_idx) in enumerate(folds):
        done = runs.fold_dir(out, fold) / "done.json"
        if done.is_file():
            results.append(json.loads(done.read_text(encoding="utf-8")))
            log.info("fold %d: already finished (best val Dice %.4f)", fold, results[-1]["best_val_dice"])
            continue
        results.append(run_fold(config, samples, fold, train_idx, val_idx, checkpoint, device, num_workers,
                                dist_info.rank, dist_info.world, cache_dir, embeddings))
    summary = summarize_folds(results)
    summary["config"] = config.to_json()
    if dist_info.rank == 0:
        runfiles.write_json(out / runs.SUMMARY_FILE, summary)
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
    checkpoint = checkpoints.resolve_checkpoint(config.model_type, config.checkpoint, announce=False)
    # Random base weights are rebuilt from the adapter's seed: the builders draw the same numbers
    # at every input size (size-dependent position tables are zero-initialised).
    bases = adapters.BaseModels(config.model_type, checkpoint, 1024)
    state = lora.merged_state_dict(adapters.load_finetuned(bases, adapter, config.seed, merge=False))
    runfiles.torch_save(state, out_path, rerun="rerun the command")
    log.info("exported the merged model (%s, adapter %s) to %s", config.model_type, adapter, out_path)
    return out_path



