"""trainer.py: the optimiser step (fp16 gradient scaler, weight-decay groups), dropout seeds per process."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pytest
import torch
from conftest import count_encoder_calls, tiny_sam

from samlora.models import lora
from samlora.models import sam as sam_model
from samlora.training import trainer
from samlora.training.config import TrainConfig


def _lora_model() -> torch.nn.Module:
    sam = tiny_sam("vit", image_size=64)
    lora.inject_lora(sam, 2, 2, "qkv")
    lora.mark_only_lora_as_trainable(sam, train_decoder=True)
    return sam


def _step(sam: torch.nn.Module, precision: str, scale_loss: float) -> tuple[dict[str, torch.Tensor], int]:
    """One optimiser step on a loss whose gradients are tiny (``scale_loss``), under autocast."""
    config = TrainConfig(data_dir="", output_dir="", precision=precision, grad_clip=1.0)
    optimizer = torch.optim.AdamW(trainer.param_groups(sam, 0.0), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    ctx = trainer.Context(sam, config, torch.device("cpu"), None, optimizer, None, scaler=scaler)
    before = {n: p.detach().clone() for n, p in sam.named_parameters() if "lora_A" in n}
    autocast = torch.autocast("cpu", dtype=torch.float16) if precision == "fp16" else contextlib.nullcontext()
    with autocast:
        embedding = sam.image_encoder(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    loss = embedding.float().mean() * scale_loss
    (scaler.scale(loss) if scaler is not None else loss).backward()
    skipped = trainer.optimizer_step(ctx, [p for p in sam.parameters() if p.requires_grad])
    return {n: p.detach() - before[n] for n, p in sam.named_parameters() if "lora_A" in n}, skipped


def test_fp16_with_the_gradient_scaler_updates_lora(one_thread) -> None:
    """Gradients of ~1e-8 underflow in fp16; scaled, every lora_A still gets an update."""
    torch.manual_seed(0)
    sam = _lora_model()
    with torch.no_grad():
        for layer in lora.lora_layers(sam).values():
            layer.lora_B.normal_(std=0.01)  # lora_B = 0 would give lora_A no gradient at all
    updates, skipped = [], 1
    for _ in range(4):  # the scaler may skip its first steps while it finds its scale
        delta, skipped = _step(sam, "fp16", 1e-6)
        updates.append(delta)
        if not skipped:
            break
    assert skipped == 0
    assert all(v.abs().max() > 0 for v in updates[-1].values())


def test_weight_decay_exempts_by_kind_not_by_name() -> None:
    """Decay on every weight matrix, the decoder's ``*_token_to_image`` / ``*_image_to_token``
    attention and its LoRA factors included (the substring "token" once exempted 62 of them);
    none on biases, norm layers and embeddings (SAM's tokens, the prompt embeddings)."""
    sam = _lora_model()
    decay, plain = trainer.param_groups(sam, 0.1)
    names = {id(p): n for n, p in sam.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in plain["params"]}
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert any(n.endswith("lora_A") for n in decayed) and any(n.endswith("lora_B") for n in decayed)
    for attention in ("cross_attn_token_to_image", "cross_attn_image_to_token", "final_attn_token_to_image"):
        assert any(attention in n and n.endswith("q_proj.weight") for n in decayed), attention
    assert "mask_decoder.iou_token.weight" in spared and "mask_decoder.mask_tokens.weight" in spared
    assert any("norm" in n and n.endswith("weight") for n in spared)
    assert not any(n.endswith("bias") or "norm" in n for n in decayed)
    assert "prompt_encoder.mask_downscaling.0.weight" in decayed  # a convolution (trained with the decoder)
    assert "prompt_encoder.mask_downscaling.1.weight" in spared  # its LayerNorm2d
    assert len(decayed) + len(spared) == sum(p.requires_grad for p in sam.parameters())

    decoder_lora = tiny_sam("vit", image_size=64)
    lora.inject_lora(decoder_lora, 2, 2, "decoder")
    lora.mark_only_lora_as_trainable(decoder_lora)
    decay, plain = trainer.param_groups(decoder_lora, 0.1)
    assert len(decay["params"]) == 2 * len(lora.lora_layers(decoder_lora)) and not plain["params"]


def test_dropout_seeds_differ_between_processes_and_repeat_on_resume() -> None:
    draws = {}
    for rank in (0, 1):
        trainer.seed_everything(3, 0, 2, rank)
        draws[rank] = torch.rand(4)
    trainer.seed_everything(3, 0, 2, 0)
    assert torch.equal(torch.rand(4), draws[0]) and not torch.equal(draws[0], draws[1])
    trainer.seed_everything(3, 0, 2)  # one process: rank 0
    assert torch.equal(torch.rand(4), draws[0])


def test_cpu_refuses_fp16_from_the_command_line() -> None:
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        sam_model.autocast(torch.device("cpu"), "fp16")


@pytest.mark.slow
def test_frozen_encoder_with_augmentation_embeds_each_view_once(main, em_crops, tmp_path, monkeypatch,
                                                                 one_thread, caplog) -> None:
    """Flips and rotations on, a frozen encoder, 3 epochs: each image is embedded once per view
    (2 views), the embeddings live on the CPU, and epoch 3 runs on the cache alone; the run says
    at its start that it has no intensity augmentation and 2 of the 8 views."""
    from conftest import EM4, SMALL

    calls = count_encoder_calls(monkeypatch)
    kept = []
    monkeypatch.setattr(trainer.EmbeddingCache, "_keep",
                        lambda self, key, emb, keep=trainer.EmbeddingCache._keep: (kept.append(emb.device.type),
                                                                                    keep(self, key, emb)))
    data = em_crops(EM4, 128)
    argv = ["train", "--data_dir", str(data), *SMALL, "--freeze_encoder", "--lora_targets", "decoder",
            "--lora_rank", "2", "--max_objects", "2", "--epochs", "3", "--augment_variants", "2",
            "--val_fraction", "0.25", "--output_dir", str(tmp_path / "run")]
    with caplog.at_level(logging.WARNING, logger="crossval"):
        assert main(argv) == 0
    said = [r.getMessage() for r in caplog.records if "no intensity augmentation" in r.getMessage()]
    assert len(said) == 1 and "only 2 of the 8 flips / rotations" in said[0]  # said once, at the start
    assert sum(calls) <= 4 * 2 and set(kept) == {"cpu"}
    assert main([*argv[:-1], str(tmp_path / "small"), "--cache_memory_gb", "0.0001"]) == 2
    assert not (tmp_path / "small").exists()


@pytest.mark.parametrize("rounds", [1, 3])
def test_chunked_decoding_gives_the_gradients_of_the_whole_step(em_crops, one_thread, rounds: int) -> None:
    """The prompts of an image decoded one by one, each chunk's (and round's) loss
    back-propagated through a detached embedding and the encoder once: the gradients and the
    loss equal those of one decoder call per prompt kind and round (mixed prompts, correction
    rounds)."""
    import dataclasses

    from conftest import EM4

    from samlora.data.dataset import load_dataset
    from samlora.training.items import PromptDataset

    torch.manual_seed(0)
    sam = tiny_sam("vit", image_size=64)
    lora.inject_lora(sam, 2, 2, "qkv")
    lora.mark_only_lora_as_trainable(sam, train_decoder=True)
    with torch.no_grad():
        for layer in lora.lora_layers(sam).values():
            layer.lora_B.normal_(std=0.05)
    config = TrainConfig(data_dir="", output_dir="", image_size=64, max_objects=6, augment=False, prompt="mix")
    item = PromptDataset(load_dataset(em_crops(EM4, 128)), [0], config, 0, train=True)[0]
    assert len(item.prompts) >= 2 and len(item.groups(1000)) >= 2  # several prompt kinds
    results = {}
    for chunk in (1, 1000):
        ctx = trainer.Context(sam, dataclasses.replace(config, decoder_chunk=chunk), torch.device("cpu"), rounds=rounds)
        sam.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the correction clicks' draws (per image, so chunking does not change them)
        loss, _, finite = trainer.backward_step(ctx, [item])
        results[chunk] = loss, {n: p.grad.clone() for n, p in sam.named_parameters() if p.grad is not None}
    (one, by_one), (whole, at_once) = results[1], results[1000]
    assert finite and one == pytest.approx(whole, rel=1e-5)
    assert by_one.keys() == at_once.keys() and any("lora_A" in n for n in by_one)  # reached the encoder
    for name in by_one:
        torch.testing.assert_close(by_one[name], at_once[name], rtol=1e-4, atol=1e-6)


def test_sub_iterations_share_one_embedding_and_average_the_rounds(main, em4, tmp_path, monkeypatch) -> None:
    """Eight rounds encode each image once, like one round, and their losses are averaged (the
    train loss keeps its scale; summed, eight rounds gave more than twice one round's loss)."""
    from conftest import TINY_TRAIN

    calls = count_encoder_calls(monkeypatch)
    losses = {}
    for rounds in (1, 8):
        calls.clear()
        out = tmp_path / f"r{rounds}"
        assert main(["train", "--data_dir", str(em4), "--output_dir", str(out), *TINY_TRAIN, "--epochs", "1",
                     "--sub_iterations", str(rounds), "--no_augment", "--val_fraction", "0.25"]) == 0
        losses[rounds] = float((out / "metrics.csv").read_text().splitlines()[1].split(",")[2])
        losses[f"calls{rounds}"] = sum(calls)
    assert losses["calls1"] == losses["calls8"]  # the rounds cost the decoder only
    assert losses[8] < 2 * losses[1]  # eight rounds' losses averaged, not summed


@pytest.mark.parametrize("rounds", [2, 5])
def test_the_step_loss_is_the_mean_over_rounds(em_crops, one_thread, monkeypatch, rounds: int) -> None:
    """Item 10: with every round's object loss 1, a step's loss is 1 at any round count (as
    micro-sam divides by its sub-iterations), so --grad_clip and train_loss mean the same at 8
    and 2 rounds; summed, it was the round count."""
    from conftest import EM4

    from samlora.data.dataset import load_dataset
    from samlora.training.items import PromptDataset

    def ones(kind, logits, iou, targets, valid=None, weight=1.0):
        return logits.float().flatten(1).mean(1) * 0 + 1, torch.zeros(len(logits), dtype=torch.long)

    monkeypatch.setattr(trainer, "object_losses", ones)
    sam = tiny_sam("vit", image_size=64)
    config = TrainConfig(data_dir="", output_dir="", image_size=64, max_objects=3, augment=False, prompt="box")
    item = PromptDataset(load_dataset(em_crops(EM4, 128)), [0], config, 0, train=True)[0]
    loss, _, finite = trainer.backward_step(trainer.Context(sam, config, torch.device("cpu"), rounds=rounds), [item])
    assert finite and loss == pytest.approx(1.0)


def test_cached_embeddings_are_stored_one_by_one(tmp_path) -> None:
    """Each cached embedding owns its storage: a file on disk holds one embedding, not the batch
    it was computed in."""
    from types import SimpleNamespace

    from samlora.models.model_info import ModelInfo
    from samlora.training.items import EmbeddingCache

    sam, info = tiny_sam("vit", image_size=64), ModelInfo("vit_b", 64)
    cache = EmbeddingCache(sam, info, "fp32", tmp_path)
    items = [SimpleNamespace(key=f"k{i}", image=torch.randn(3, 64, 64)) for i in range(4)]
    batch = cache.get(items, torch.device("cpu"))
    one = batch[0].numel() * batch[0].element_size()
    files = sorted(tmp_path.glob("*.pt"))
    assert len(files) == 4 and all(f.stat().st_size < 2 * one for f in files)
    assert all(v._base is None for v in cache.memory.values())
    again = EmbeddingCache(sam, info, "fp32", tmp_path).get(items, torch.device("cpu"))
    torch.testing.assert_close(again, batch)


@pytest.mark.parametrize("kind", ["vit", "vit_t"])
def test_cached_late_lora_step_equals_the_uncached_step(em_crops, one_thread, kind: str) -> None:
    """Late LoRA (the last two blocks; vit_t: its last stage, built as train builds it): the blocks
    before the first adapted one run without gradients, and once their output is cached they do
    not run at all; the cached step's loss and gradients equal the uncached step's, and every
    LoRA tensor of the adapted blocks gets a gradient."""
    import dataclasses

    from conftest import EM4

    from samlora.data.dataset import load_dataset
    from samlora.models.encoder_blocks import block_names
    from samlora.models.model_info import ModelInfo
    from samlora.training.items import PromptDataset, make_cache

    config = TrainConfig(data_dir="", output_dir="", model_type="vit_b" if kind == "vit" else "vit_t",
                         image_size=64 if kind == "vit" else 256, lora_rank=2, lora_alpha=2, lora_targets="qkv,mlp",
                         lora_blocks="2-3" if kind == "vit" else "last2", train_decoder=True, max_objects=4,
                         augment=False, prompt="mix")
    if kind == "vit":  # the tiny ViT: 4 blocks
        torch.manual_seed(0)
        sam, info = tiny_sam("vit", image_size=64, depth=4), ModelInfo("vit_b", 64)
        lora.inject_lora(sam, 2, 2, ("qkv", "mlp"), blocks=(2, 3))
        lora.mark_only_lora_as_trainable(sam, train_decoder=True)
    else:
        sam, info = trainer.build_trainable_model(config, None, torch.device("cpu"))
    first = config.first_lora_block
    assert config.cached and first == (2 if kind == "vit" else 8)
    with torch.no_grad():
        for layer in lora.lora_layers(sam).values():
            layer.lora_B.normal_(std=0.05)
    item = PromptDataset(load_dataset(em_crops(EM4, 128)), [0], config, 0, train=True)[0]
    ran: dict[int, list[bool]] = {}
    for k, name in enumerate(block_names(sam)):
        sam.image_encoder.get_submodule(name).register_forward_hook(
            lambda module, inputs, output, k=k: ran.setdefault(k, []).append(output.requires_grad))

    def step(cache) -> tuple[float, dict[str, torch.Tensor]]:
        ctx = trainer.Context(sam, dataclasses.replace(config, decoder_chunk=1), torch.device("cpu"), cache, rounds=2)
        sam.zero_grad(set_to_none=True)
        ran.clear()
        torch.manual_seed(1)  # the same correction clicks in both steps
        loss, _, finite = trainer.backward_step(ctx, [item])
        assert finite
        return loss, {n: p.grad.clone() for n, p in sam.named_parameters() if p.grad is not None}

    loss, grads = step(None)  # the whole encoder: the early blocks run, without gradients
    assert all(ran[k] == [False] for k in range(first)) and all(ran[k] == [True] for k in range(first, len(ran)))
    adapted = {f"{name}.lora_{ab}" for name, layer in lora.lora_layers(sam).items()
               if name.startswith("image_encoder.") for ab in "AB"}
    assert adapted and adapted <= set(grads) and all(grads[n].abs().sum() > 0 for n in adapted)
    encoder_grads = {n for n in grads if n.startswith("image_encoder.")}
    assert encoder_grads == adapted  # nothing else in the encoder
    cache = make_cache(sam, info, config)
    assert cache.block == first
    step(cache)  # fills the cache
    cached_loss, cached_grads = step(cache)
    assert sorted(ran) == list(range(first, len(block_names(sam))))  # the early blocks did not run
    assert cache.hits == 1 and cache.misses == 1
    assert cached_loss == pytest.approx(loss, rel=1e-5) and cached_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(cached_grads[name], grads[name], rtol=1e-4, atol=1e-6)


def test_cache_budget_counts_late_lora_block_inputs(caplog) -> None:
    """The size is stated up front per cached encoder start (vit_b late LoRA at 1024 px, bf16: 6.0
    MiB per image view) and a run that cannot fit is refused; a search's configurations that share
    a start are counted once, other starts add up."""
    from samlora.training.items import cached_bytes, check_cache_budget

    late = TrainConfig(data_dir="", output_dir="", model_type="vit_b", precision="bf16", lora_blocks="last3")
    assert late.first_lora_block == 9 and cached_bytes(late) == 6_291_456
    assert not TrainConfig(data_dir="", output_dir="", model_type="vit_b").cached  # full depth: nothing cached
    with caplog.at_level(logging.INFO, logger="training_data"):
        check_cache_budget([late, late], 100, 1.2, None)  # 100 images x 2 views x 6 MiB = 1.17 GiB
    assert "block 9 input (late LoRA) cache: up to 100 images x 2 view(s) x 6.0 MiB = 1.17 GiB" in caplog.text
    with pytest.raises(ValueError, match="the cache needs 1.2 GiB but --cache_memory_gb is 1"):
        check_cache_budget([late], 100, 1.0, None)
    check_cache_budget([late], 100, 1.0, Path("on_disk"))  # on disk: no memory limit
    stage = TrainConfig(data_dir="", output_dir="", model_type="vit_b", precision="bf16", lora_blocks="6-11")
    with pytest.raises(ValueError, match="the cache needs 2.3 GiB"):
        check_cache_budget([late, stage], 100, 2.0, None)


def test_small_objects_keep_their_targets_and_the_loss_sees_them(cpm15) -> None:
    """Real H&E tiles (nuclei_cpm15) at a 256 px input: nuclei that shrink below the decoder's
    1/4 grid keep a non-empty target at the input resolution, where the loss and the IoU head's
    target are computed. A mask that misses such a nucleus costs a full Dice loss and has IoU 0;
    on the 1/4 grid (``--loss_resolution decoder``) its target is empty, so missing it looked
    perfect (IoU 1)."""
    import dataclasses

    from samlora.training.items import PromptDataset
    from samlora.training.losses import decoder_targets, mask_iou, object_losses

    config = TrainConfig(data_dir="", output_dir="", image_size=256, max_objects=0, augment=False, box_jitter=0.0)
    lost_share = []
    for index in range(3):
        targets = PromptDataset(cpm15, [index], config, 0, train=True)[0].targets.float()  # Nx1xhxw, h or w 256
        assert max(targets.shape[-2:]) == 256 and targets.flatten(1).sum(1).min() > 0  # every nucleus has pixels
        lost = decoder_targets(targets).flatten(1).sum(1) == 0
        lost_share.append(float(lost.float().mean()))
        if not lost.any():
            continue
        small = targets[lost]
        miss = torch.full((len(small), 1, 64, 64), -20.0)  # predicts nothing: Dice loss >= 1 - 1/2 (smoothing 1)
        for where, loss_bound, expected_iou in (("input", 0.5, 0.0), ("decoder", 0.01, 1.0)):
            logits, frame_targets, _ = trainer.loss_frame(dataclasses.replace(config, loss_resolution=where), miss,
                                                          small, None)
            loss, _ = object_losses("dice_ce", logits, torch.ones(len(small), 1), frame_targets, iou_weight=0.0)
            true_iou = mask_iou(logits, frame_targets)  # the IoU head's target
            if where == "input":
                assert logits.shape[-2:] == small.shape[-2:] and bool((loss > loss_bound).all())
            else:
                assert bool((loss < loss_bound).all())
            assert torch.allclose(true_iou, torch.full_like(true_iou, expected_iou))
    assert max(lost_share) > 0.05  # on the 1/4 grid many nuclei vanish


def test_cached_runs_say_what_augmentation_they_lose() -> None:
    """A frozen encoder or late LoRA caches each image view: no intensity change and only
    ``--augment_variants`` of the 8 flips / rotations; full-depth LoRA and --no_augment lose nothing."""
    from samlora.training.items import cached_augmentation

    base = dict(data_dir="", output_dir="", model_type="vit_t")
    frozen = cached_augmentation(TrainConfig(**base, freeze_encoder=True, lora_targets="decoder", augment_variants=3))
    late = cached_augmentation(TrainConfig(**base, lora_blocks="last2"))
    assert "encoder is frozen" in frozen and "only 3 of the 8" in frozen and "no intensity" in frozen
    assert "--lora_blocks last2" in late and "block 8" in late and "only 2 of the 8" in late
    assert cached_augmentation(TrainConfig(**base)) is None
    assert cached_augmentation(TrainConfig(**base, lora_blocks="last2", augment=False)) is None


@pytest.mark.parametrize("prompt", ["point", "mix"])
def test_epoch_selection_prompts_as_evaluate_does(em_crops, prompt: str) -> None:
    """Item 7: the images that choose the epoch (and score a fold) are prompted as ``evaluate``
    prompts by default: one click at each object's deepest pixel for --prompt point (a single
    click, SAM's multimask case), the exact box otherwise; before, point-trained runs were
    selected with random positive and negative points, another protocol than evaluate's."""
    import numpy as np
    from conftest import EM4

    from samlora.data.dataset import load_dataset
    from samlora.data.prompts import object_prompts
    from samlora.training.items import PromptDataset

    config = TrainConfig(data_dir="", output_dir="", image_size=64, augment=False, prompt=prompt, num_points=2)
    samples = load_dataset(em_crops(EM4, 128))
    item = PromptDataset(samples, [0], config, 0, train=False)[0]
    expected = object_prompts(samples[0].labels, "point" if prompt == "point" else "box", samples[0].ignore)
    assert (item.prompts.use_boxes, item.prompts.use_points) == (expected.use_boxes, expected.use_points)
    np.testing.assert_array_equal(item.prompts.points, expected.points)
    np.testing.assert_array_equal(item.prompts.point_labels, expected.point_labels)
    np.testing.assert_array_equal(item.prompts.boxes, expected.boxes)
    assert item.tensors.single_click() == (prompt == "point")


def test_fold_state_reads_the_resume_state_earlier_runs_wrote(tmp_path: Path) -> None:
    """``last.pt`` keeps the fold's state as the plain dict earlier runs wrote (the same five keys,
    loadable with ``weights_only=True``): FoldState reads it and writes it back unchanged; an epoch
    improves on a better selection Dice, or always without one; a final-fit plan is labelled
    ``final`` in the metrics rows and records no fold in its adapter."""
    from samlora.training.fold_plan import FoldPlan, FoldState, StepPlan

    earlier = {"epoch": 2, "best_dice": 0.5, "best_epoch": 1, "bad_epochs": 1,
               "history": [{"fold": 0, "epoch": e, "val_dice": d} for e, d in enumerate((0.4, 0.5, 0.45))]}
    torch.save({"state": earlier}, tmp_path / "last.pt")
    state = FoldState.from_saved(torch.load(tmp_path / "last.pt", weights_only=True)["state"])
    assert state == FoldState(2, 0.5, 1, 1, earlier["history"]) and state.to_saved() == earlier
    assert not state.record({"epoch": 3, "val_dice": 0.5}) and (state.best_epoch, state.bad_epochs) == (1, 2)
    assert state.record({"epoch": 4, "val_dice": 0.6}) and (state.best_epoch, state.bad_epochs) == (4, 0)
    assert state.record({"epoch": 5}) and (state.epoch, state.best_epoch, state.best_dice) == (5, 5, -1.0)
    torch.save({"state": state.to_saved()}, tmp_path / "last.pt")
    again = FoldState.from_saved(torch.load(tmp_path / "last.pt", weights_only=True)["state"])
    assert again == state and len(again.history) == 6
    outer = FoldPlan.outer(tmp_path, 1, [0, 1], [2], [3])
    assert (outer.label, outer.adapter_fold, outer.directory, outer.steps) == (1, 1, tmp_path / "fold_1", None)
    final = FoldPlan.final_fit(tmp_path, 3, [0, 1, 2], [4], StepPlan(schedule=10, stop=4))
    assert (final.label, final.adapter_fold, final.fold, final.select_idx) == ("final", None, 3, ())
    assert final.directory == tmp_path / "final" and final.steps == StepPlan(10, 4)
