"""Training of the AIS decoder (``train --instance_decoder``): attaching it, its loss, its scores and
the watershed thresholds chosen after training.

The decoder (models/instance_decoder.py) rides on the model as ``sam.instance_decoder``, so it
trains, saves in the adapter, resumes and is all-reduced with the LoRA tensors. It trains on the
same image embeddings as the prompted loss, in the same backward pass (trainer.backward_step): a
frozen encoder's embedding cache serves both and the decoder adds little to a step.

**Loss**, as torch_em's ``DiceBasedDistanceLoss(mask_distances_in_bg=True)`` that micro-sam's
joint trainer uses: the sum of three soft Dice losses per image, ``1 - 2 sum(p t) / (sum p^2 +
sum t^2)``: the foreground map against the foreground, and each distance map against its target,
both multiplied by the target foreground (the distances are learned on objects only). Ignored
pixels (``Sample.ignore``) are left out of all three. Images without objects are not in the loss:
their foreground Dice has no gradient (its numerator is 0 whatever the prediction), and the
prompted loss skips them too; every image with objects teaches the background around them.

**Scores**: micro-sam's mSA (metrics/accuracy.py) of the watershed's instances
(inference/instance_watershed.py) on images with objects, at their original size, ignored pixels
left out. ``val_ais_msa`` (metrics.csv) uses the default thresholds; after training the
thresholds are chosen on the fold's selection images by a small grid (:data:`GRID`, as
micro-sam's instance-segmentation grid search: centre and boundary distance thresholds, plus
``min_size``), the default first so that ties keep it, and stored in ``best.pt``'s config under
:data:`WATERSHED_KEY`.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from samlora.inference.instance_watershed import WatershedOptions, maps_to_instances
from samlora.metrics.accuracy import mean_segmentation_accuracy
from samlora.models import adapters, instance_decoder
from samlora.models import sam as sam_model

log = logging.getLogger(__name__)

#: The adapter config's key of the chosen watershed thresholds (a dict of WatershedOptions fields).
WATERSHED_KEY = "watershed"
#: The thresholds the grid tries (micro-sam's grid search: 0.3..0.7 for both distances; min_size).
GRID: dict[str, tuple[float, ...]] = {
    "center_distance_threshold": (0.3, 0.4, 0.5, 0.6, 0.7),
    "boundary_distance_threshold": (0.3, 0.4, 0.5, 0.6, 0.7),
    "min_size": (0, 25),
}
EPS = 1e-7  # torch_em's dice_score eps

Embed = Callable[[Any, Sequence[Any]], torch.Tensor]  # trainer.embed(ctx, items) -> Bx256xgxg


# --------------------------------------------------------------------------------------------
# The decoder on the model
# --------------------------------------------------------------------------------------------
def ensure_decoder(sam: nn.Module, enabled: bool) -> instance_decoder.InstanceDecoder | None:
    """With ``enabled`` (``--instance_decoder``): the AIS decoder ``sam`` carries (from an
    adapter or a combined checkpoint: it is fine-tuned), else a new one (random, from torch's
    current seed) attached at the encoder's input size; its parameters made trainable (after
    lora.mark_only_lora_as_trainable froze everything). Without: the carried one (frozen), or None."""
    decoder = instance_decoder.attached(sam)
    if not enabled:
        return decoder
    if decoder is None:
        decoder = instance_decoder.attach(sam, new_decoder(sam.image_encoder.img_size))
    decoder.requires_grad_(True)
    log.info("AIS decoder: %s trainable parameters", f"{sum(p.numel() for p in decoder.parameters()):,}")
    return decoder


def new_decoder(image_size: int) -> instance_decoder.InstanceDecoder:
    """A new AIS decoder of micro-sam's widths for ``image_size`` px input (tests shrink it)."""
    return instance_decoder.InstanceDecoder(image_size=image_size)


def training_decoder(sam: nn.Module) -> instance_decoder.InstanceDecoder | None:
    """The carried AIS decoder when it trains (its parameters require gradients), else None."""
    decoder = instance_decoder.attached(sam)
    return decoder if decoder is not None and any(p.requires_grad for p in decoder.parameters()) else None


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------
def soft_dice_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BxHxW maps in [0, 1] -> (B,) ``1 - 2 sum(p t) / (sum p^2 + sum t^2)`` per image (torch_em's
    dice_score: squared sums in the denominator, clamped at eps)."""
    num = (pred * target).flatten(1).sum(1)
    den = (pred * pred).flatten(1).sum(1) + (target * target).flatten(1).sum(1)
    return 1 - 2 * num / den.clamp_min(EPS)


def distance_dice_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Bx3xHxW predicted maps vs Bx3xHxW targets (foreground, centre, boundary distance) -> (B,)
    the sum of the three Dice losses, the distances masked to the target foreground; ``valid``
    (BxHxW, 1 where scored) leaves ignored pixels out."""
    if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(f"expected Bx3xHxW maps and targets of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if valid is not None:
        pred, target = pred * valid[:, None], target * valid[:, None]
    fg = target[:, 0]
    return soft_dice_loss(pred[:, 0], fg) + soft_dice_loss(pred[:, 1] * fg, target[:, 1] * fg) + \
        soft_dice_loss(pred[:, 2] * fg, target[:, 2] * fg)


def decoder_loss(decoder: nn.Module, embeddings: torch.Tensor, items: Sequence[Any],
                 device: torch.device) -> torch.Tensor:
    """The mean over ``items`` (with ``instance_targets``) of :func:`distance_dice_loss` of the
    decoder's maps on their Bx256xgxg ``embeddings``, each brought to its item's original size
    (InstanceDecoder.postprocess). Call under the step's autocast; the loss is float32."""
    maps = decoder(embeddings)
    losses = []
    for j, item in enumerate(items):
        if item.instance_targets is None:
            raise ValueError("an item without instance_targets reached the AIS decoder's loss")
        pred = decoder.postprocess(maps[j:j + 1].float(), item.input_size, item.original_size)
        target = item.instance_targets.to(device, torch.float32)[None]
        ignore = item.prompts.ignore
        valid = None if ignore is None else torch.from_numpy(~ignore).to(device, torch.float32)[None]
        losses.append(distance_dice_loss(pred, target, valid))
    return torch.cat(losses).mean()


# --------------------------------------------------------------------------------------------
# Scores, the watershed grid
# --------------------------------------------------------------------------------------------
def grid_options() -> list[WatershedOptions]:
    """The watershed options :func:`choose_watershed` tries: the defaults first, then :data:`GRID`."""
    default = WatershedOptions()
    names = list(GRID)
    grid = [dataclasses.replace(default, **dict(zip(names, values)))
            for values in itertools.product(*(GRID[n] for n in names))]
    return [default] + [o for o in grid if o != default]


@torch.no_grad()
def msa_rows(ctx: Any, loader: torch.utils.data.DataLoader, embed: Embed,
             options: Sequence[WatershedOptions]) -> list[dict[str, Any]]:
    """Per image with objects of ``loader`` (with the sample ``index``): ``msa``, the mSA of the
    watershed's instances under each of ``options``. Under torchrun every process scores its
    share and all get every row. ``ctx``: trainer.Context; ``embed``: trainer.embed."""
    ctx.sam.eval()
    decoder = instance_decoder.attached(ctx.sam)
    if decoder is None:
        raise ValueError("the model carries no AIS decoder")
    rows = []
    for items in loader:
        items = [it for it in items if len(it.prompts)]
        if not items:
            continue
        with sam_model.autocast(ctx.device, ctx.config.precision):
            embeddings = embed(ctx, items)
            maps = decoder(embeddings)
        for j, item in enumerate(items):
            image_maps = decoder.postprocess(maps[j:j + 1].float(), item.input_size, item.original_size)[0]
            image_maps = image_maps.cpu().numpy()
            rows.append({"index": item.index, "msa": [
                mean_segmentation_accuracy(item.labels, maps_to_instances(image_maps, o), item.prompts.ignore)
                for o in options]})
    if ctx.world > 1:
        import torch.distributed as dist

        gathered: list[list[dict]] = [[] for _ in range(ctx.world)]
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    return sorted(rows, key=lambda r: r["index"])


def mean_msa(ctx: Any, loader: torch.utils.data.DataLoader, embed: Embed,
             options: WatershedOptions = WatershedOptions()) -> float:
    """Mean mSA over the images with objects of ``loader`` under ``options`` (0.0 without any)."""
    rows = msa_rows(ctx, loader, embed, [options])
    return float(np.mean([r["msa"][0] for r in rows])) if rows else 0.0


def choose_watershed(ctx: Any, loader: torch.utils.data.DataLoader, embed: Embed) -> tuple[WatershedOptions, float]:
    """The :func:`grid_options` entry of the best mean mSA on ``loader``'s images (the first of
    equal ones: the defaults win ties), and that mSA; the defaults and 0.0 without images."""
    options = grid_options()
    rows = msa_rows(ctx, loader, embed, options)
    if not rows:
        return options[0], 0.0
    means = np.mean([r["msa"] for r in rows], axis=0)
    best = int(np.argmax(means))
    log.info("watershed thresholds chosen on %d selection image(s): %s (mSA %.4f; defaults %.4f)", len(rows),
             options[best], means[best], means[0])
    return options[best], float(means[best])


def store_watershed(path: Path, sam: nn.Module, options: WatershedOptions, score: float | None) -> None:
    """Rewrite the adapter ``path`` (whose weights ``sam`` holds) with ``options`` in its config
    under :data:`WATERSHED_KEY` and their selection mSA under ``selection_ais_msa``."""
    config, _ = adapters.read_adapter(path)
    config[WATERSHED_KEY] = dataclasses.asdict(options)
    config["selection_ais_msa"] = score
    adapters.save_adapter(path, sam, config)


def fold_results(ctx: Any, adapter: Path, select: torch.utils.data.DataLoader | None,
                 score: torch.utils.data.DataLoader | None, scored: list[dict[str, Any]], embed: Embed) -> dict[str, Any]:
    """After a fold with the AIS decoder: the watershed thresholds chosen on the selection
    images (:func:`choose_watershed`; the defaults without a selection split), stored in the
    fold's ``adapter`` (by rank 0); each scored row gets its image's AIS mSA under them
    (``ais_msa``). Returns the result's ``watershed`` and ``selection_ais_msa``."""
    options, chosen = choose_watershed(ctx, select, embed) if select is not None else (WatershedOptions(), None)
    if ctx.rank == 0:
        store_watershed(adapter, ctx.sam, options, chosen)
    if score is not None:
        msa = {r["index"]: r["msa"][0] for r in msa_rows(ctx, score, embed, [options])}
        for row in scored:
            row["ais_msa"] = msa[row["index"]]
    return {"watershed": dataclasses.asdict(options), "selection_ais_msa": chosen}


def watershed_of(config: dict[str, Any]) -> WatershedOptions:
    """The watershed options an adapter config records (defaults when it records none)."""
    return WatershedOptions(**config.get(WATERSHED_KEY, {}))
