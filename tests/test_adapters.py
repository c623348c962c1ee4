"""adapters.py: adapter files (save / load, atomic writes, errors) on the tiny SAM of conftest.py
and the real MobileSAM."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import perturb_lora, tiny_forward

from samlora.models import lora
from samlora.models.adapters import load_adapter, save_adapter
from samlora.models.lora import inject_lora, lora_state_dict, mark_only_lora_as_trainable, merge_lora


def _config(**extra) -> dict:
    return {"model_type": "tiny", "rank": 4, "alpha": 8, "targets": ["qkv", "decoder"],
            "image_size": 64, "checkpoint_sha256": "0" * 64, "fold": 1} | extra


def test_save_load_adapter_reproduces_outputs(tmp_path, tiny_vit, tiny_vit_base, tiny_inputs):
    inject_lora(tiny_vit, 4, 8, ("qkv", "decoder"))
    mark_only_lora_as_trainable(tiny_vit, train_decoder=True)
    perturb_lora(tiny_vit)
    with torch.no_grad():
        for p in tiny_vit.mask_decoder.parameters():
            p.add_(0.01)  # "trained" decoder weights
        expected = tiny_forward(tiny_vit, *tiny_inputs)
    path = save_adapter(tmp_path / "fold1" / "adapter.pt", tiny_vit,
                        _config(out_dir=tmp_path, targets=("qkv", "decoder")))
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["adapter.pt"]

    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "samlora-adapter" and payload["version"] == 1
    assert payload["config"]["out_dir"] == str(tmp_path)  # paths stored as strings
    assert payload["config"]["dropout"] == 0.0  # filled in from the model
    keys = set(payload["state_dict"])
    assert set(lora_state_dict(tiny_vit)) <= keys
    assert {k for k in keys if not k.endswith(("lora_A", "lora_B"))} == {
        k for k, p in tiny_vit.named_parameters()
        if k.startswith(("mask_decoder.", "prompt_encoder.mask_downscaling.")) and not k.endswith(("lora_A", "lora_B"))}

    fresh = copy.deepcopy(tiny_vit_base)  # no LoRA yet: injected from the adapter's config
    config = load_adapter(path, fresh)
    assert config["rank"] == 4 and config["targets"] == ["qkv", "decoder"] and config["fold"] == 1
    with torch.no_grad():
        assert torch.allclose(tiny_forward(fresh, *tiny_inputs), expected, atol=1e-6)

    pre_injected = copy.deepcopy(tiny_vit_base)
    inject_lora(pre_injected, 4, 8, ("qkv", "decoder"))
    load_adapter(path, pre_injected)
    with torch.no_grad():
        assert torch.allclose(tiny_forward(pre_injected, *tiny_inputs), expected, atol=1e-6)


def test_late_adapter_records_its_blocks_and_loads_into_them(tmp_path, tiny_vit, tiny_vit_base, tiny_inputs):
    """An adapter on the last block only records ``blocks: [1]``; loaded into a fresh base model it
    is injected there alone and reproduces the outputs; a config that contradicts the layers is refused."""
    inject_lora(tiny_vit, 4, 8, ("qkv",), blocks=(1,))
    perturb_lora(tiny_vit)
    with torch.no_grad():
        expected = tiny_forward(tiny_vit, *tiny_inputs)
    path = save_adapter(tmp_path / "late.pt", tiny_vit, _config(targets=["qkv"]))
    assert torch.load(path, weights_only=True)["config"]["blocks"] == [1]
    fresh = copy.deepcopy(tiny_vit_base)
    load_adapter(path, fresh)
    assert list(lora.lora_layers(fresh)) == ["image_encoder.blocks.1.attn.qkv"]
    with torch.no_grad():
        assert torch.allclose(tiny_forward(fresh, *tiny_inputs), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"config blocks \[0, 1\] differ from the model's LoRA blocks \[1\]"):
        save_adapter(tmp_path / "wrong.pt", tiny_vit, _config(targets=["qkv"], blocks=[0, 1]))


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
                      "dropout": 0.0, "blocks": list(range(10))}


def test_save_adapter_is_atomic(tmp_path, tiny_vit, monkeypatch):
    inject_lora(tiny_vit, 4, 8, ("qkv",))
    path = save_adapter(tmp_path / "adapter.pt", tiny_vit, _config(targets=["qkv"]))
    old = path.read_bytes()
    perturb_lora(tiny_vit)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half an adapter")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(path, tiny_vit, _config(targets=["qkv"]))
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.pt"]


def test_save_adapter_rejects_bad_config_and_merged_model(tmp_path, tiny_vit):
    inject_lora(tiny_vit, 4, 8, ("qkv",))
    with pytest.raises(ValueError, match="rank"):
        save_adapter(tmp_path / "a.pt", tiny_vit, {"rank": 8})
    with pytest.raises(ValueError, match="targets"):
        save_adapter(tmp_path / "a.pt", tiny_vit, {"targets": ["qkv", "proj"]})
    with pytest.raises(ValueError, match="object"):
        save_adapter(tmp_path / "a.pt", tiny_vit, {"thing": object()})
    merge_lora(tiny_vit)
    with pytest.raises(ValueError, match="unmerge"):
        save_adapter(tmp_path / "a.pt", tiny_vit, {})
    assert not list(tmp_path.iterdir())


def test_load_adapter_errors(tmp_path, tiny_vit, tiny_vit_base, vit_t):
    inject_lora(tiny_vit, 4, 8, ("qkv", "decoder"))
    mark_only_lora_as_trainable(tiny_vit)
    good = save_adapter(tmp_path / "good.pt", tiny_vit, _config())

    with pytest.raises(ValueError, match="not found"):
        load_adapter(tmp_path / "missing.pt", copy.deepcopy(tiny_vit_base))
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pt is not a LoRA adapter"):
        load_adapter(tmp_path / "garbage.pt", copy.deepcopy(tiny_vit_base))
    torch.save(tiny_vit_base.state_dict(), tmp_path / "full.pt")
    with pytest.raises(ValueError, match="full.pt is not a LoRA adapter.*--checkpoint"):
        load_adapter(tmp_path / "full.pt", copy.deepcopy(tiny_vit_base))
    payload = torch.load(good, weights_only=True)
    torch.save(payload | {"version": 99}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="future.pt: adapter format version 99"):
        load_adapter(tmp_path / "future.pt", copy.deepcopy(tiny_vit_base))

    # rank mismatch
    rank2 = copy.deepcopy(tiny_vit_base)
    inject_lora(rank2, 2, 8, ("qkv", "decoder"))
    with pytest.raises(ValueError, match=r"good.pt: shape mismatch .*lora_A.*different LoRA rank"):
        load_adapter(good, rank2)
    # missing keys: the model carries more LoRA layers than the file
    more = copy.deepcopy(tiny_vit_base)
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
        load_adapter(tmp_path / "noconf.pt", copy.deepcopy(tiny_vit_base))
    # merged models must be unmerged first
    merged = copy.deepcopy(tiny_vit_base)
    inject_lora(merged, 4, 8, ("qkv", "decoder"))
    merge_lora(merged)
    with pytest.raises(ValueError, match="unmerge"):
        load_adapter(good, merged)


def test_adapter_carries_the_instance_decoder(tmp_path, tiny_vit, tiny_vit_base):
    """A model with an AIS decoder attached saves it whole (BatchNorm statistics too) under
    ``instance_decoder.*``; loading the adapter into a fresh model attaches an equal decoder."""
    from samlora.models import adapters, instance_decoder

    inject_lora(tiny_vit, 4, 8, ("qkv",))
    mark_only_lora_as_trainable(tiny_vit)
    decoder = instance_decoder.attach(tiny_vit, instance_decoder.InstanceDecoder(initial_features=8, image_size=64))
    with torch.no_grad():
        for p in decoder.parameters():
            p.add_(0.01)
        for name, buffer in decoder.named_buffers():
            if name.endswith("running_mean"):
                buffer.add_(0.25)
    path = save_adapter(tmp_path / "adapter.pt", tiny_vit, _config(targets=("qkv",)))
    state = torch.load(path, weights_only=True)["state_dict"]
    assert adapters.has_decoder(state)
    _, decoder_part = instance_decoder.split_state(state)
    assert decoder_part.keys() == decoder.state_dict().keys()

    fresh = copy.deepcopy(tiny_vit_base)
    load_adapter(path, fresh)
    loaded = instance_decoder.attached(fresh)
    assert loaded is not None
    for key, value in decoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
