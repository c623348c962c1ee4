"""lora.py: injection per backbone, behaviour at init, merging, training, state dicts, export.

Forward-behaviour tests run on the tiny SAM of conftest.py (64 px ViT encoder, 32-channel
decoder) and on the real MobileSAM TinyViT attention / MLP blocks fed small token tensors; the
real vit_t / vit_b (random weights) are used for layer names, parameter counts and the merged
export. Adapter files: test_adapters.py.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
from conftest import perturb_lora, tiny_forward

from samlora.models import lora
from samlora.models.lora import (
    TARGETS,
    LoRALinear,
    count_parameters,
    inject_lora,
    load_lora_state_dict,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    merged_state_dict,
    unmerge_lora,
)

ALL_TARGETS = ("qkv", "proj", "mlp", "decoder")


# ---------------------------------------------------------------------------- model fixtures
# tiny_vit / tiny_vit_base / tiny_inputs (a 64 px tiny SAM and its inputs), vit_t / vit_t_base
# (the real MobileSAM): conftest.py
@pytest.fixture(scope="session")
def vit_b_base() -> nn.Module:
    from segment_anything import sam_model_registry
    torch.manual_seed(0)
    return sam_model_registry["vit_b"]().eval()


@pytest.fixture
def vit_b(vit_b_base) -> nn.Module:
    return copy.deepcopy(vit_b_base)


def _tinyvit_blocks(sam: nn.Module):
    """The TinyViT blocks of a MobileSAM model (layers 1..3; layer 0 is convolutional)."""
    return [blk for layer in sam.image_encoder.layers[1:] for blk in layer.blocks]


# ---------------------------------------------------------------------------- the layer
def test_lora_linear_init_and_freeze():
    base = nn.Linear(20, 30)
    layer = LoRALinear(base, rank=4, alpha=8, dropout=0.1)
    assert layer.base is base and not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (30, 4)
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert torch.count_nonzero(layer.lora_B) == 0
    # kaiming_uniform_(a=sqrt(5)) draws from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 20
    assert layer.lora_A.abs().max() <= 20 ** -0.5 and layer.lora_A.std() > 0.05
    assert layer.scaling == 2.0 and not layer.merged
    x = torch.randn(5, 7, 20)
    layer.train()  # dropout active: still exactly the base output at init
    assert torch.equal(layer(x), base(x))


def test_lora_linear_follows_base_dtype():
    layer = LoRALinear(nn.Linear(6, 4).double(), rank=2, alpha=2)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64
    assert layer(torch.randn(3, 6, dtype=torch.float64)).dtype == torch.float64


def test_dropout_only_on_lora_path_and_eval_never_merges():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), rank=4, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(64, 16)
    layer.train()
    a, b = layer(x), layer(x)
    assert not torch.allclose(a, b)  # dropout on the LoRA path
    layer.eval()
    assert not layer.merged
    expected = layer.base(x) + x @ layer.delta_weight().T
    assert torch.allclose(layer(x), expected, atol=1e-5)
    layer.train()
    assert not layer.merged


# ---------------------------------------------------------------------------- injection
def test_inject_names_vit_b(vit_b):
    names = inject_lora(vit_b, 4, 4, ALL_TARGETS)
    blocks = range(12)
    expected = set()
    for i in blocks:
        expected |= {f"image_encoder.blocks.{i}.attn.qkv", f"image_encoder.blocks.{i}.attn.proj",
                     f"image_encoder.blocks.{i}.mlp.lin1", f"image_encoder.blocks.{i}.mlp.lin2"}
    attns = [f"layers.{i}.{a}" for i in range(2) for a in
             ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")]
    attns.append("final_attn_token_to_image")
    for a in attns:
        expected |= {f"mask_decoder.transformer.{a}.{p}"
                     for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert set(names) == expected and len(names) == len(expected) == 48 + 28
    # the decoder's MLPs, hypernetworks and the prompt encoder stay plain
    assert isinstance(vit_b.mask_decoder.transformer.layers[0].mlp.lin1, nn.Linear)
    assert not isinstance(vit_b.mask_decoder.transformer.layers[0].mlp.lin1, LoRALinear)
    assert not any(isinstance(m, LoRALinear) for m in vit_b.prompt_encoder.modules())
    assert not any(isinstance(m, LoRALinear)
                   for m in vit_b.mask_decoder.output_hypernetworks_mlps.modules())


def test_inject_names_vit_t(vit_t):
    names = inject_lora(vit_t, 4, 4, ("qkv", "proj", "mlp"))
    blocks = [(1, b) for b in range(2)] + [(2, b) for b in range(6)] + [(3, b) for b in range(2)]
    expected = set()
    for layer, b in blocks:
        p = f"image_encoder.layers.{layer}.blocks.{b}"
        expected |= {f"{p}.attn.qkv", f"{p}.attn.proj", f"{p}.mlp.fc1", f"{p}.mlp.fc2"}
    assert set(names) == expected
    assert not isinstance(vit_t.image_encoder.head, LoRALinear)  # TinyViT's unused classifier
    decoder_names = inject_lora(vit_t, 4, 4, "decoder")
    assert len(decoder_names) == 28 and all(n.startswith("mask_decoder.transformer.")
                                            for n in decoder_names)


def test_targets_documented():
    assert set(TARGETS) == {"qkv", "qv", "proj", "mlp", "decoder"}
    assert all(t.description for t in TARGETS.values())
    assert lora.parse_targets(" qkv, decoder ,") == ("qkv", "decoder")


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, "rank"), ({"rank": -2}, "rank"), ({"rank": 2.5}, "rank"),
    ({"rank": True}, "rank"),
    ({"alpha": 0}, "alpha"), ({"alpha": -1.0}, "alpha"), ({"alpha": float("nan")}, "alpha"),
    ({"dropout": -0.1}, "dropout"), ({"dropout": 1.0}, "dropout"),
    ({"targets": ("qkvv",)}, r"unknown LoRA target.*'qkvv'.*qkv, qv, proj, mlp, decoder"),
    ({"targets": ()}, "no LoRA targets"),
    ({"targets": ("qkv", "qv")}, "choose one"),
])
def test_inject_rejects_bad_arguments(tiny_vit, kwargs, match):
    args = {"rank": 4, "alpha": 8, "targets": ("qkv",), "dropout": 0.0} | kwargs
    before = copy.deepcopy(tiny_vit.state_dict())
    with pytest.raises(ValueError, match=match):
        inject_lora(tiny_vit, **args)
    assert not lora.lora_layers(tiny_vit)
    assert before.keys() == tiny_vit.state_dict().keys()


def test_inject_nothing_matched_names_targets_and_layers(tiny_vit):
    encoder = tiny_vit.image_encoder  # a bare encoder has no decoder attention
    with pytest.raises(ValueError, match=r"'decoder' \(of requested qkv, decoder\) matched no "
                                         r"layer.*Linear layers present: blocks\.0\.attn\.qkv"):
        inject_lora(encoder, 4, 8, ("qkv", "decoder"))
    assert not lora.lora_layers(encoder)  # nothing was wrapped before the error


def test_inject_twice_is_an_error(tiny_vit):
    inject_lora(tiny_vit, 4, 8, ("qkv",))
    with pytest.raises(ValueError, match="already carry LoRA"):
        inject_lora(tiny_vit, 4, 8, ("qkv",))
    with pytest.raises(ValueError, match="already carry LoRA"):
        inject_lora(tiny_vit, 4, 8, ("qv",))
    assert inject_lora(tiny_vit, 4, 8, ("proj",))  # other layers may still be added
    assert all(not isinstance(m.base, LoRALinear) for m in lora.lora_layers(tiny_vit).values())


# ---------------------------------------------------------------------------- behaviour
def test_output_unchanged_at_init(tiny_vit, tiny_inputs, vit_t):
    before = tiny_forward(tiny_vit, *tiny_inputs)
    inject_lora(tiny_vit, 4, 8, ALL_TARGETS, dropout=0.1)
    assert torch.equal(tiny_forward(tiny_vit, *tiny_inputs), before)

    block = _tinyvit_blocks(vit_t)[0]  # real TinyViT attention and MLP on 7x7-token windows
    tokens = torch.randn(3, 49, block.attn.qkv.in_features)
    ref_attn, ref_mlp = block.attn(tokens), block.mlp(tokens)
    inject_lora(vit_t, 4, 8, ("qkv", "proj", "mlp"))
    assert isinstance(block.attn.qkv, LoRALinear)
    assert torch.equal(block.attn(tokens), ref_attn) and torch.equal(block.mlp(tokens), ref_mlp)


@pytest.mark.parametrize("train_decoder", [False, True])
def test_optimizer_step_changes_only_trainable(tiny_vit, tiny_inputs, train_decoder):
    inject_lora(tiny_vit, 4, 8, ("qkv", "proj", "mlp", "decoder"))
    mark_only_lora_as_trainable(tiny_vit, train_decoder=train_decoder)
    before = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    opt = torch.optim.AdamW([p for p in tiny_vit.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.1)
    tiny_vit.train()
    for _ in range(2):  # step 1 moves lora_B only (A's gradient is B^T... = 0), step 2 also A
        opt.zero_grad()
        tiny_forward(tiny_vit, *tiny_inputs).square().mean().backward()
        opt.step()
    after = tiny_vit.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_keys = set(lora_state_dict(tiny_vit))
    allowed = lora_keys | ({k for k in before if k.startswith(("mask_decoder.", "prompt_encoder.mask_downscaling."))}
                           if train_decoder else set())
    assert changed <= allowed, sorted(changed - allowed)[:5]
    assert lora_keys <= changed  # every lora_A and lora_B moved
    decoder_changed = {k for k in changed - lora_keys if k.startswith("mask_decoder.")}
    assert bool(decoder_changed) == train_decoder


def test_merge_equals_unmerged_and_unmerge_restores(tiny_vit, tiny_vit_base, tiny_inputs):
    inject_lora(tiny_vit, 4, 8, ALL_TARGETS)
    perturb_lora(tiny_vit)
    base_weights = {n: m.base.weight.detach().clone()
                    for n, m in lora.lora_layers(tiny_vit).items()}
    with torch.no_grad():
        unmerged = tiny_forward(tiny_vit, *tiny_inputs)
        assert merge_lora(tiny_vit) == len(base_weights)
        assert all(m.merged for m in lora.lora_layers(tiny_vit).values())
        merge_lora(tiny_vit)  # a second merge is a no-op
        merged = tiny_forward(tiny_vit, *tiny_inputs)
        tiny_vit.train()
        tiny_vit.eval()  # mode switches never unmerge
        assert all(m.merged for m in lora.lora_layers(tiny_vit).values())
        unmerge_lora(tiny_vit)
        unmerge_lora(tiny_vit)
        again = tiny_forward(tiny_vit, *tiny_inputs)
        plain = tiny_forward(tiny_vit_base, *tiny_inputs)
    assert not torch.allclose(unmerged, plain, atol=1e-4)  # the perturbed LoRA does something
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=1e-4)
    assert torch.allclose(again, unmerged, atol=1e-6)
    for name, layer in lora.lora_layers(tiny_vit).items():
        assert not layer.merged
        assert torch.allclose(layer.base.weight, base_weights[name], atol=1e-6)


# ---------------------------------------------------------------------------- q/v only
def _qkv_delta(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer(x) - layer.base(x)


def test_qv_only_sam_vit_layout(tiny_vit, vit_b):
    """SAM ViT: qkv(x).reshape(B, N, 3, heads, -1) -> [q | k | v]; only k must stay unchanged."""
    for model in (tiny_vit, vit_b):
        names = inject_lora(model, 4, 8, ("qv",))
        perturb_lora(model)
        for name in names:
            layer = model.get_submodule(name)
            attn = model.get_submodule(name.rpartition(".")[0])
            x = torch.randn(2, 3, 3, layer.in_features)
            delta = _qkv_delta(layer, x).reshape(2, 9, 3, attn.num_heads, -1)
            q, k, v = delta.unbind(2)
            assert torch.count_nonzero(k) == 0
            assert q.abs().min() > 0 and v.abs().min() > 0
            # the merged weight respects the same mask
            rows = layer.delta_weight().reshape(3, -1, layer.in_features)
            assert torch.count_nonzero(rows[1]) == 0 and torch.count_nonzero(rows[0]) > 0
    # training never moves the k rows of lora_B: their gradient is exactly zero
    layer = tiny_vit.image_encoder.blocks[0].attn.qkv
    tiny_vit.image_encoder(torch.randn(1, 3, 64, 64)).square().mean().backward()
    grad_rows = layer.lora_B.grad.reshape(3, -1, layer.rank)
    assert torch.count_nonzero(grad_rows[1]) == 0 and torch.count_nonzero(grad_rows[0]) > 0


def test_qv_only_tinyvit_layout(vit_t):
    """TinyViT: qkv(x).view(B, N, heads, -1).split([key_dim, key_dim, d]) per head."""
    names = inject_lora(vit_t, 4, 8, ("qv",))
    assert len(names) == 10
    perturb_lora(vit_t)
    for name in names:
        layer = vit_t.get_submodule(name)
        attn = vit_t.get_submodule(name.rpartition(".")[0])
        x = torch.randn(2, 49, layer.in_features)
        delta = _qkv_delta(layer, x).view(2, 49, attn.num_heads, -1)
        q, k, v = delta.split([attn.key_dim, attn.key_dim, attn.d], dim=3)
        assert torch.count_nonzero(k) == 0, name
        assert q.abs().min() > 0 and v.abs().min() > 0, name
        # a [q | k | v]-block mask would have changed part of TinyViT's k: prove it differs
        sam_style = torch.ones(layer.out_features)
        sam_style[layer.out_features // 3: 2 * layer.out_features // 3] = 0
        assert not torch.equal(layer.lora_out_mask, sam_style)
    # and the real attention forward with the q/v adapter matches a merged q/v-only weight
    attn = _tinyvit_blocks(vit_t)[0].attn
    attn.train()  # TinyViT's Attention.train() returns None, so no chaining
    tokens = torch.randn(2, 49, attn.qkv.in_features)
    with torch.no_grad():
        out = attn(tokens)
        attn.qkv.merge()
        assert torch.allclose(attn(tokens), out, atol=1e-5)


def test_full_qkv_changes_k_on_both_backbones(tiny_vit, vit_t):
    """Control for the two tests above: the whole-output 'qkv' target does change k."""
    for model, layout in ((tiny_vit, "sam"), (vit_t, "tinyvit")):
        name = inject_lora(model, 4, 8, ("qkv",))[0]
        perturb_lora(model)
        layer = model.get_submodule(name)
        attn = model.get_submodule(name.rpartition(".")[0])
        x = torch.randn(2, 4, layer.in_features)
        delta = _qkv_delta(layer, x)
        if layout == "sam":
            k = delta.reshape(2, 4, 3, attn.num_heads, -1)[:, :, 1]
        else:
            k = delta.view(2, 4, attn.num_heads, -1).split([attn.key_dim, attn.key_dim,
                                                             attn.d], dim=3)[1]
        assert torch.count_nonzero(k) > 0


# ---------------------------------------------------------------------------- counts
def _lora_formula(model: nn.Module, rank: int) -> int:
    return sum(rank * (m.in_features + m.out_features) for m in lora.lora_layers(model).values())


@pytest.mark.parametrize("rank", [4, 8])
@pytest.mark.parametrize("model_type", ["vit_t", "vit_b"])
def test_trainable_count_formula(request, model_type, rank, caplog):
    model = request.getfixturevalue(model_type)
    total_before = count_parameters(model)[1]
    inject_lora(model, rank, 2 * rank, ("qkv",))
    with caplog.at_level(logging.INFO, logger="lora"):
        trainable, total = mark_only_lora_as_trainable(model)
    assert trainable == _lora_formula(model, rank)
    assert total == total_before + trainable
    assert (trainable, total) == count_parameters(model)
    assert "%" in caplog.text and f"{trainable:,}" in caplog.text
    decoder_params = sum(p.numel() for p in model.mask_decoder.parameters()) + \
        sum(p.numel() for p in model.prompt_encoder.mask_downscaling.parameters())
    with_decoder, _ = mark_only_lora_as_trainable(model, train_decoder=True)
    assert with_decoder == trainable + decoder_params
    logging.getLogger("lora").info(
        "%s rank %d qkv: %d / %d trainable (%.2f %%); with decoder %d (%.2f %%)", model_type,
        rank, trainable, total, 100 * trainable / total, with_decoder, 100 * with_decoder / total)
    layers = {"vit_t": 10, "vit_b": 12}[model_type]
    assert len(lora.lora_layers(model)) == layers


def test_mark_only_lora_without_lora_is_an_error(tiny_vit):
    with pytest.raises(ValueError, match="inject_lora"):
        mark_only_lora_as_trainable(tiny_vit)
    trainable, _ = mark_only_lora_as_trainable(tiny_vit, train_decoder=True)  # decoder only
    assert trainable == sum(p.numel() for p in tiny_vit.mask_decoder.parameters()) + \
        sum(p.numel() for p in tiny_vit.prompt_encoder.mask_downscaling.parameters())


def test_train_decoder_also_trains_the_mask_prompt_embedding(tiny_vit):
    """Every correction round feeds the previous mask as a prompt: the prompt encoder's
    ``mask_downscaling`` that embeds it trains with the decoder; the rest of the prompt encoder
    and the image encoder stay frozen."""
    mark_only_lora_as_trainable(tiny_vit, train_decoder=True)
    trainable = {n for n, p in tiny_vit.named_parameters() if p.requires_grad}
    downscaling = {n for n, _ in tiny_vit.named_parameters() if n.startswith("prompt_encoder.mask_downscaling.")}
    assert downscaling and downscaling <= trainable
    assert all(n.startswith(("mask_decoder.", "prompt_encoder.mask_downscaling.")) for n in trainable)


# ---------------------------------------------------------------------------- state dicts
def test_lora_state_dict_round_trip_and_errors(tiny_vit, tiny_vit_base):
    inject_lora(tiny_vit, 4, 8, ("qkv", "decoder"))
    perturb_lora(tiny_vit)
    state = lora_state_dict(tiny_vit)
    assert state and all(k.endswith(("lora_A", "lora_B")) for k in state)
    other = copy.deepcopy(tiny_vit_base)
    inject_lora(other, 4, 8, ("qkv", "decoder"))
    load_lora_state_dict(other, state)
    for k, v in lora_state_dict(other).items():
        assert torch.equal(v, state[k])
    with pytest.raises(ValueError, match="missing keys: image_encoder.blocks.0.attn.qkv.lora_A"):
        load_lora_state_dict(other, {k: v for k, v in state.items() if "qkv" not in k})
    with pytest.raises(ValueError, match="unexpected keys: nope.lora_A"):
        load_lora_state_dict(other, state | {"nope.lora_A": torch.zeros(1)})
    wrong_rank = copy.deepcopy(tiny_vit_base)
    inject_lora(wrong_rank, 2, 8, ("qkv", "decoder"))
    with pytest.raises(ValueError, match=r"shape mismatch.*different LoRA rank"):
        load_lora_state_dict(wrong_rank, state)


def _strict_load(fresh: nn.Module, state: dict) -> None:
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_merged_state_dict_loads_into_plain_models(tiny_vit, tiny_vit_base, tiny_inputs, vit_t,
                                                   vit_t_base, vit_b):
    from mobile_sam import sam_model_registry as mobile_registry
    from segment_anything import sam_model_registry as sam_registry

    inject_lora(tiny_vit, 4, 8, ALL_TARGETS)
    perturb_lora(tiny_vit)
    with torch.no_grad():
        expected = tiny_forward(tiny_vit, *tiny_inputs)
    exported = merged_state_dict(tiny_vit)
    assert not any(".base." in k or k.endswith(("lora_A", "lora_B")) for k in exported)
    assert exported.keys() == tiny_vit_base.state_dict().keys()
    assert not any(m.merged for m in lora.lora_layers(tiny_vit).values())  # model untouched
    plain = copy.deepcopy(tiny_vit_base)
    _strict_load(plain, exported)
    with torch.no_grad():
        assert torch.allclose(tiny_forward(plain, *tiny_inputs), expected, atol=1e-5)
    merge_lora(tiny_vit)  # exporting a merged model gives the same weights
    again = merged_state_dict(tiny_vit)
    assert all(torch.allclose(again[k], exported[k], atol=1e-6) for k in exported)

    inject_lora(vit_t, 8, 16, ("qkv", "decoder"))
    perturb_lora(vit_t)
    exported = merged_state_dict(vit_t)
    _strict_load(mobile_registry["vit_t"](), exported)
    layer = vit_t.image_encoder.layers[1].blocks[0].attn.qkv
    key = "image_encoder.layers.1.blocks.0.attn.qkv.weight"
    assert torch.allclose(exported[key], vit_t_base.state_dict()[key] + layer.delta_weight())

    inject_lora(vit_b, 4, 8, ("qv", "proj", "mlp"))
    _strict_load(sam_registry["vit_b"](), merged_state_dict(vit_b))


# ---------------------------------------------------------------------------- late LoRA (--lora_blocks)
def test_inject_into_chosen_blocks_only(vit_b, vit_t, tiny_vit):
    """Encoder targets go only into the numbered blocks given (SAM ViT blocks.k; TinyViT numbered
    across its stages, encoder_blocks.py); the decoder target is not limited by them."""
    names = inject_lora(vit_b, 4, 4, ("qkv", "decoder"), blocks=(9, 10, 11))
    encoder = {n for n in names if n.startswith("image_encoder.")}
    assert encoder == {f"image_encoder.blocks.{k}.attn.qkv" for k in (9, 10, 11)}
    assert len(names) - len(encoder) == 28  # every decoder attention layer
    assert not isinstance(vit_b.image_encoder.blocks[8].attn.qkv, LoRALinear)
    names = inject_lora(vit_t, 4, 4, ("qkv", "mlp"), blocks=(8, 9))  # vit_t's last stage
    assert set(names) == {f"image_encoder.layers.3.blocks.{j}.{layer}" for j in (0, 1)
                          for layer in ("attn.qkv", "mlp.fc1", "mlp.fc2")}
    before = copy.deepcopy(tiny_vit.state_dict())
    with pytest.raises(ValueError, match=r"LoRA blocks \[2\] do not exist: this encoder has blocks 0-1"):
        inject_lora(tiny_vit, 4, 4, ("qkv",), blocks=(2,))
    assert not lora.lora_layers(tiny_vit) and before.keys() == tiny_vit.state_dict().keys()


def test_merged_late_adapter_equals_the_unmerged_model(tiny_vit, tiny_vit_base, tiny_inputs):
    """A late adapter (LoRA on the last block only) merged and exported as a plain state dict gives
    the unmerged model's outputs; the early block's weights are the base's, bit for bit."""
    inject_lora(tiny_vit, 4, 8, ("qkv", "proj", "mlp"), blocks=(1,))
    perturb_lora(tiny_vit)
    with torch.no_grad():
        unmerged = tiny_forward(tiny_vit, *tiny_inputs)
        plain = copy.deepcopy(tiny_vit_base)
        _strict_load(plain, merged_state_dict(tiny_vit))
        assert torch.allclose(tiny_forward(plain, *tiny_inputs), unmerged, atol=1e-5)
        assert not torch.allclose(tiny_forward(tiny_vit_base, *tiny_inputs), unmerged, atol=1e-4)
    base = tiny_vit_base.state_dict()
    assert all(torch.equal(v, base[k]) for k, v in plain.state_dict().items() if k.startswith("image_encoder.blocks.0."))
