"""LoRA: injection per backbone, behaviour at init, merging, training, adapters, export.

Forward-behaviour tests run on a tiny SAM (64 px ViT encoder, 32-channel decoder) and on the
real MobileSAM TinyViT attention / MLP blocks fed small token tensors; the real vit_t / vit_b
(random weights) are used for layer names, parameter counts and the merged export.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn

import lora
from adapters import load_adapter, save_adapter
from lora import (
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
def _build_tiny_sam(seed: int = 0) -> nn.Module:
    """A 64 px SAM with segment_anything's own classes: 48-dim 2-block ViT, 32-dim decoder."""
    from segment_anything.modeling import (
        ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer,
    )
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=4,
                              window_size=2, global_attn_indexes=[1], use_rel_pos=True,
                              out_chans=32)
    prompt = PromptEncoder(embed_dim=32, image_embedding_size=(4, 4), input_image_size=(64, 64),
                           mask_in_chans=8)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=32, iou_head_hidden_dim=32,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64,
                                                        num_heads=2))
    sam = Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder)
    # Make the random init less degenerate: decoder outputs then depend on every layer.
    with torch.no_grad():
        for p in sam.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return sam.eval()


def _tiny_forward(sam: nn.Module, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Images Bx3x64x64, boxes Bx4 -> low-res logits Bx1x16x16 and IoU Bx1, concatenated flat."""
    embeddings = sam.image_encoder(images)
    outs = []
    for i in range(images.shape[0]):
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes[i:i + 1], masks=None)
        masks, iou = sam.mask_decoder(
            image_embeddings=embeddings[i:i + 1], image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        outs.append(torch.cat([masks.flatten(), iou.flatten()]))
    return torch.stack(outs)


@pytest.fixture(scope="session")
def tiny_sam_base() -> nn.Module:
    return _build_tiny_sam()


@pytest.fixture
def tiny_sam(tiny_sam_base) -> nn.Module:
    return copy.deepcopy(tiny_sam_base)


@pytest.fixture(scope="session")
def tiny_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=g)
    boxes = torch.tensor([[8.0, 10.0, 40.0, 50.0], [20.0, 4.0, 60.0, 30.0]])
    return images, boxes


@pytest.fixture(scope="session")
def vit_t_base() -> nn.Module:
    from mobile_sam import sam_model_registry
    torch.manual_seed(0)
    return sam_model_registry["vit_t"]().eval()


@pytest.fixture
def vit_t(vit_t_base) -> nn.Module:
    return copy.deepcopy(vit_t_base)


@pytest.fixture(scope="session")
def vit_b_base() -> nn.Module:
    from segment_anything import sam_model_registry
    torch.manual_seed(0)
    return sam_model_registry["vit_b"]().eval()


@pytest.fixture
def vit_b(vit_b_base) -> nn.Module:
    return copy.deepcopy(vit_b_base)


def _perturb_lora(model: nn.Module, seed: int = 3, scale: float = 0.05) -> None:
    """Give every lora_B a non-zero value, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(scale * torch.randn(layer.lora_B.shape, generator=g))


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
def test_inject_rejects_bad_arguments(tiny_sam, kwargs, match):
    args = {"rank": 4, "alpha": 8, "targets": ("qkv",), "dropout": 0.0} | kwargs
    before = copy.deepcopy(tiny_sam.state_dict())
    with pytest.raises(ValueError, match=match):
        inject_lora(tiny_sam, **args)
    assert not lora.lora_layers(tiny_sam)
    assert before.keys() == tiny_sam.state_dict().keys()


def test_inject_nothing_matched_names_targets_and_layers(tiny_sam):
    encoder = tiny_sam.image_encoder  # a bare encoder has no decoder attention
    with pytest.raises(ValueError, match=r"'decoder' \(of requested qkv, decoder\) matched no "
                                         r"layer.*Linear layers present: blocks\.0\.attn\.qkv"):
        inject_lora(encoder, 4, 8, ("qkv", "decoder"))
    assert not lora.lora_layers(encoder)  # nothing was wrapped before the error


def test_inject_twice_is_an_error(tiny_sam):
    inject_lora(tiny_sam, 4, 8, ("qkv",))
    with pytest.raises(ValueError, match="already carry LoRA"):
        inject_lora(tiny_sam, 4, 8, ("qkv",))
    with pytest.raises(ValueError, match="already carry LoRA"):
        inject_lora(tiny_sam, 4, 8, ("qv",))
    assert inject_lora(tiny_sam, 4, 8, ("proj",))  # other layers may still be added
    assert all(not isinstance(m.base, LoRALinear) for m in lora.lora_layers(tiny_sam).values())


# ---------------------------------------------------------------------------- behaviour
def test_output_unchanged_at_init(tiny_sam, tiny_inputs, vit_t):
    before = _tiny_forward(tiny_sam, *tiny_inputs)
    inject_lora(tiny_sam, 4, 8, ALL_TARGETS, dropout=0.1)
    assert torch.equal(_tiny_forward(tiny_sam, *tiny_inputs), before)

    block = _tinyvit_blocks(vit_t)[0]  # real TinyViT attention and MLP on 7x7-token windows
    tokens = torch.randn(3, 49, block.attn.qkv.in_features)
    ref_attn, ref_mlp = block.attn(tokens), block.mlp(tokens)
    inject_lora(vit_t, 4, 8, ("qkv", "proj", "mlp"))
    assert isinstance(block.attn.qkv, LoRALinear)
    assert torch.equal(block.attn(tokens), ref_attn) and torch.equal(block.mlp(tokens), ref_mlp)


@pytest.mark.parametrize("train_decoder", [False, True])
def test_optimizer_step_changes_only_trainable(tiny_sam, tiny_inputs, train_decoder):
    inject_lora(tiny_sam, 4, 8, ("qkv", "proj", "mlp", "decoder"))
    mark_only_lora_as_trainable(tiny_sam, train_decoder=train_decoder)
    before = {k: v.clone() for k, v in tiny_sam.state_dict().items()}
    opt = torch.optim.AdamW([p for p in tiny_sam.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.1)
    tiny_sam.train()
    for _ in range(2):  # step 1 moves lora_B only (A's gradient is B^T... = 0), step 2 also A
        opt.zero_grad()
        _tiny_forward(tiny_sam, *tiny_inputs).square().mean().backward()
        opt.step()
    after = tiny_sam.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_keys = set(lora_state_dict(tiny_sam))
    allowed = lora_keys | ({k for k in before if k.startswith("mask_decoder.")}
                           if train_decoder else set())
    assert changed <= allowed, sorted(changed - allowed)[:5]
    assert lora_keys <= changed  # every lora_A and lora_B moved
    decoder_changed = {k for k in changed - lora_keys if k.startswith("mask_decoder.")}
    assert bool(decoder_changed) == train_decoder


def test_merge_equals_unmerged_and_unmerge_restores(tiny_sam, tiny_sam_base, tiny_inputs):
    inject_lora(tiny_sam, 4, 8, ALL_TARGETS)
    _perturb_lora(tiny_sam)
    base_weights = {n: m.base.weight.detach().clone()
                    for n, m in lora.lora_layers(tiny_sam).items()}
    with torch.no_grad():
        unmerged = _tiny_forward(tiny_sam, *tiny_inputs)
        assert merge_lora(tiny_sam) == len(base_weights)
        assert all(m.merged for m in lora.lora_layers(tiny_sam).values())
        merge_lora(tiny_sam)  # a second merge is a no-op
        merged = _tiny_forward(tiny_sam, *tiny_inputs)
        tiny_sam.train()
        tiny_sam.eval()  # mode switches never unmerge
        assert all(m.merged for m in lora.lora_layers(tiny_sam).values())
        unmerge_lora(tiny_sam)
        unmerge_lora(tiny_sam)
        again = _tiny_forward(tiny_sam, *tiny_inputs)
        plain = _tiny_forward(tiny_sam_base, *tiny_inputs)
    assert not torch.allclose(unmerged, plain, atol=1e-4)  # the perturbed LoRA does something
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=1e-4)
    assert torch.allclose(again, unmerged, atol=1e-6)
    for name, layer in lora.lora_layers(tiny_sam).items():
        assert not layer.merged
        assert torch.allclose(layer.base.weight, base_weights[name], atol=1e-6)


# ---------------------------------------------------------------------------- q/v only
def _qkv_delta(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer(x) - layer.base(x)


def test_qv_only_sam_vit_layout(tiny_sam, vit_b):
    """SAM ViT: qkv(x).reshape(B, N, 3, heads, -1) -> [q | k | v]; only k must stay unchanged."""
    for model in (tiny_sam, vit_b):
        names = inject_lora(model, 4, 8, ("qv",))
        _perturb_lora(model)
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
    layer = tiny_sam.image_encoder.blocks[0].attn.qkv
    tiny_sam.image_encoder(torch.randn(1, 3, 64, 64)).square().mean().backward()
    grad_rows = layer.lora_B.grad.reshape(3, -1, layer.rank)
    assert torch.count_nonzero(grad_rows[1]) == 0 and torch.count_nonzero(grad_rows[0]) > 0


def test_qv_only_tinyvit_layout(vit_t):
    """TinyViT: qkv(x).view(B, N, heads, -1).split([key_dim, key_dim, d]) per head."""
    names = inject_lora(vit_t, 4, 8, ("qv",))
    assert len(names) == 10
    _perturb_lora(vit_t)
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


def test_full_qkv_changes_k_on_both_backbones(tiny_sam, vit_t):
    """Control for the two tests above: the whole-output 'qkv' target does change k."""
    for model, layout in ((tiny_sam, "sam"), (vit_t, "tinyvit")):
        name = inject_lora(model, 4, 8, ("qkv",))[0]
        _perturb_lora(model)
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
    decoder_params = sum(p.numel() for p in model.mask_decoder.parameters())
    with_decoder, _ = mark_only_lora_as_trainable(model, train_decoder=True)
    assert with_decoder == trainable + decoder_params
    logging.getLogger("lora").info(
        "%s rank %d qkv: %d / %d trainable (%.2f %%); with decoder %d (%.2f %%)", model_type,
        rank, trainable, total, 100 * trainable / total, with_decoder, 100 * with_decoder / total)
    layers = {"vit_t": 10, "vit_b": 12}[model_type]
    assert len(lora.lora_layers(model)) == layers


def test_mark_only_lora_without_lora_is_an_error(tiny_sam):
    with pytest.raises(ValueError, match="inject_lora"):
        mark_only_lora_as_trainable(tiny_sam)
    trainable, _ = mark_only_lora_as_trainable(tiny_sam, train_decoder=True)  # decoder only
    assert trainable == sum(p.numel() for p in tiny_sam.mask_decoder.parameters())


# ---------------------------------------------------------------------------- state dicts
def test_lora_state_dict_round_trip_and_errors(tiny_sam, tiny_sam_base):
    inject_lora(tiny_sam, 4, 8, ("qkv", "decoder"))
    _perturb_lora(tiny_sam)
    state = lora_state_dict(tiny_sam)
    assert state and all(k.endswith(("lora_A", "lora_B")) for k in state)
    other = copy.deepcopy(tiny_sam_base)
    inject_lora(other, 4, 8, ("qkv", "decoder"))
    load_lora_state_dict(other, state)
    for k, v in lora_state_dict(other).items():
        assert torch.equal(v, state[k])
    with pytest.raises(ValueError, match="missing keys: image_encoder.blocks.0.attn.qkv.lora_A"):
        load_lora_state_dict(other, {k: v for k, v in state.items() if "qkv" not in k})
    with pytest.raises(ValueError, match="unexpected keys: nope.lora_A"):
        load_lora_state_dict(other, state | {"nope.lora_A": torch.zeros(1)})
    wrong_rank = copy.deepcopy(tiny_sam_base)
    inject_lora(wrong_rank, 2, 8, ("qkv", "decoder"))
    with pytest.raises(ValueError, match=r"shape mismatch.*different LoRA rank"):
        load_lora_state_dict(wrong_rank, state)


def _strict_load(fresh: nn.Module, state: dict) -> None:
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_merged_state_dict_loads_into_plain_models(tiny_sam, tiny_sam_base, tiny_inputs, vit_t,
                                                   vit_t_base, vit_b):
    from mobile_sam import sam_model_registry as mobile_registry
    from segment_anything import sam_model_registry as sam_registry

    inject_lora(tiny_sam, 4, 8, ALL_TARGETS)
    _perturb_lora(tiny_sam)
    with torch.no_grad():
        expected = _tiny_forward(tiny_sam, *tiny_inputs)
    exported = merged_state_dict(tiny_sam)
    assert not any(".base." in k or k.endswith(("lora_A", "lora_B")) for k in exported)
    assert exported.keys() == tiny_sam_base.state_dict().keys()
    assert not any(m.merged for m in lora.lora_layers(tiny_sam).values())  # model untouched
    plain = copy.deepcopy(tiny_sam_base)
    _strict_load(plain, exported)
    with torch.no_grad():
        assert torch.allclose(_tiny_forward(plain, *tiny_inputs), expected, atol=1e-5)
    merge_lora(tiny_sam)  # exporting a merged model gives the same weights
    again = merged_state_dict(tiny_sam)
    assert all(torch.allclose(again[k], exported[k], atol=1e-6) for k in exported)

    inject_lora(vit_t, 8, 16, ("qkv", "decoder"))
    _perturb_lora(vit_t)
    exported = merged_state_dict(vit_t)
    _strict_load(mobile_registry["vit_t"](), exported)
    layer = vit_t.image_encoder.layers[1].blocks[0].attn.qkv
    key = "image_encoder.layers.1.blocks.0.attn.qkv.weight"
    assert torch.allclose(exported[key], vit_t_base.state_dict()[key] + layer.delta_weight())

    inject_lora(vit_b, 4, 8, ("qv", "proj", "mlp"))
    _strict_load(sam_registry["vit_b"](), merged_state_dict(vit_b))


# ---------------------------------------------------------------------------- adapter files
def _config(**extra) -> dict:
    return {"model_type": "tiny", "rank": 4, "alpha": 8, "targets": ["qkv", "decoder"],
            "image_size": 64, "checkpoint_sha256": "0" * 64, "fold": 1} | extra


def test_save_load_adapter_reproduces_outputs(tmp_path, tiny_sam, tiny_sam_base, tiny_inputs):
    inject_lora(tiny_sam, 4, 8, ("qkv", "decoder"))
    mark_only_lora_as_trainable(tiny_sam, train_decoder=True)
    _perturb_lora(tiny_sam)
    with torch.no_grad():
        for p in tiny_sam.mask_decoder.parameters():
            p.add_(0.01)  # "trained" decoder weights
        expected = _tiny_forward(tiny_sam, *tiny_inputs)
    path = save_adapter(tmp_path / "fold1" / "adapter.pt", tiny_sam,
                        _config(out_dir=tmp_path, targets=("qkv", "decoder")))
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["adapter.pt"]

    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "samlora-adapter" and payload["version"] == 1
    assert payload["config"]["out_dir"] == str(tmp_path)  # paths stored as strings
    assert payload["config"]["dropout"] == 0.0  # filled in from the model
    keys = set(payload["state_dict"])
    assert set(lora_state_dict(tiny_sam)) <= keys
    assert {k for k in keys if not k.endswith(("lora_A", "lora_B"))} == {
        k for k, p in tiny_sam.named_parameters() if k.startswith("mask_decoder.")
        and not k.endswith(("lora_A", "lora_B"))}

    fresh = copy.deepcopy(tiny_sam_base)  # no LoRA yet: injected from the adapter's config
    config = load_adapter(path, fresh)
    assert config["rank"] == 4 and config["targets"] == ["qkv", "decoder"] and config["fold"] == 1
    with torch.no_grad():
        assert torch.allclose(_tiny_forward(fresh, *tiny_inputs), expected, atol=1e-6)

    pre_injected = copy.deepcopy(tiny_sam_base)
    inject_lora(pre_injected, 4, 8, ("qkv", "decoder"))
    load_adapter(path, pre_injected)
    with torch.no_grad():
        assert torch.allclose(_tiny_forward(pre_injected, *tiny_inputs), expected, atol=1e-6)


def test_adapter_is_small_for_vit_t(tmp_path, vit_t):
    inject_lora(vit_t, 8, 16, ("qkv",))
    mark_only_lora_as_trainable(vit_t)
    path = save_adapter(tmp_path / "a.pt", vit_t, {"model_type": "vit_t"})
    full = sum(p.numel() * p.element_size() for p in vit_t.parameters())
    size = path.stat().st_size
    logging.getLogger("lora").info("vit_t rank 8 qkv adapter: %d bytes (model %d)", size, full)
    assert size < 1_000_000 and size < 0.05 * full
    config = torch.load(path, weights_only=True)["config"]
    assert config == {"model_type": "vit_t", "targets": ["qkv"], "rank": 8, "alpha": 16.0,
                      "dropout": 0.0}


def test_save_adapter_is_atomic(tmp_path, tiny_sam, monkeypatch):
    inject_lora(tiny_sam, 4, 8, ("qkv",))
    path = save_adapter(tmp_path / "adapter.pt", tiny_sam, _config(targets=["qkv"]))
    old = path.read_bytes()
    _perturb_lora(tiny_sam)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half an adapter")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(path, tiny_sam, _config(targets=["qkv"]))
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.pt"]


def test_save_adapter_rejects_bad_config_and_merged_model(tmp_path, tiny_sam):
    inject_lora(tiny_sam, 4, 8, ("qkv",))
    with pytest.raises(ValueError, match="rank"):
        save_adapter(tmp_path / "a.pt", tiny_sam, {"rank": 8})
    with pytest.raises(ValueError, match="targets"):
        save_adapter(tmp_path / "a.pt", tiny_sam, {"targets": ["qkv", "proj"]})
    with pytest.raises(ValueError, match="object"):
        save_adapter(tmp_path / "a.pt", tiny_sam, {"thing": object()})
    merge_lora(tiny_sam)
    with pytest.raises(ValueError, match="unmerge"):
        save_adapter(tmp_path / "a.pt", tiny_sam, {})
    assert not list(tmp_path.iterdir())


def test_load_adapter_errors(tmp_path, tiny_sam, tiny_sam_base, vit_t):
    inject_lora(tiny_sam, 4, 8, ("qkv", "decoder"))
    mark_only_lora_as_trainable(tiny_sam)
    good = save_adapter(tmp_path / "good.pt", tiny_sam, _config())

    with pytest.raises(ValueError, match="not found"):
        load_adapter(tmp_path / "missing.pt", copy.deepcopy(tiny_sam_base))
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pt is not a LoRA adapter"):
        load_adapter(tmp_path / "garbage.pt", copy.deepcopy(tiny_sam_base))
    torch.save(tiny_sam_base.state_dict(), tmp_path / "full.pt")
    with pytest.raises(ValueError, match="full.pt is not a LoRA adapter.*--checkpoint"):
        load_adapter(tmp_path / "full.pt", copy.deepcopy(tiny_sam_base))
    payload = torch.load(good, weights_only=True)
    torch.save(payload | {"version": 99}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="future.pt: adapter format version 99"):
        load_adapter(tmp_path / "future.pt", copy.deepcopy(tiny_sam_base))

    # rank mismatch
    rank2 = copy.deepcopy(tiny_sam_base)
    inject_lora(rank2, 2, 8, ("qkv", "decoder"))
    with pytest.raises(ValueError, match=r"good.pt: shape mismatch .*lora_A.*different LoRA rank"):
        load_adapter(good, rank2)
    # missing keys: the model carries more LoRA layers than the file
    more = copy.deepcopy(tiny_sam_base)
    inject_lora(more, 4, 8, ("qkv", "proj", "decoder"))
    with pytest.raises(ValueError, match=r"good.pt does not fit.*missing keys: "
                                         r"image_encoder.blocks.0.attn.proj.lora_A"):
        load_adapter(good, more)
    # unexpected keys: an adapter for another model type; the model is left without LoRA
    with pytest.raises(ValueError, match=r"good.pt does not fit.*missing keys: image_encoder\."
                                         r"layers\.1.*unexpected keys: image_encoder\.blocks"):
        load_adapter(good, vit_t)
    assert not lora.lora_layers(vit_t)
    # a config without the LoRA settings cannot be injected automatically
    payload["config"] = {"model_type": "tiny"}
    torch.save(payload, tmp_path / "noconf.pt")
    with pytest.raises(ValueError, match="noconf.pt: .*lacks rank, alpha, targets"):
        load_adapter(tmp_path / "noconf.pt", copy.deepcopy(tiny_sam_base))
    # merged models must be unmerged first
    merged = copy.deepcopy(tiny_sam_base)
    inject_lora(merged, 4, 8, ("qkv", "decoder"))
    merge_lora(merged)
    with pytest.raises(ValueError, match="unmerge"):
        load_adapter(good, merged)
