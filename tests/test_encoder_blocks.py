"""encoder_blocks.py: block numbering per backbone, ``--lora_blocks`` specs, the encoder run in two
halves (up to a block, on from it) equal to its whole forward, and the cached sizes per block."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_sam

from samlora.models import encoder_blocks
from samlora.models import sam as sam_model
from samlora.models.encoder_blocks import block_names, parse_blocks, run_from_block, run_to_block


@pytest.mark.parametrize("spec, count, expected", [
    ("all", 12, tuple(range(12))), ("ALL ", 3, (0, 1, 2)), ("last3", 12, (9, 10, 11)), ("last2", 10, (8, 9)),
    ("6-11", 12, tuple(range(6, 12))), ("0,9-11", 12, (0, 9, 10, 11)), ("11,9,9-10", 12, (9, 10, 11)),
    ("5", 12, (5,)),
])
def test_parse_blocks(spec: str, count: int, expected: tuple[int, ...]) -> None:
    assert parse_blocks(spec, count) == expected


@pytest.mark.parametrize("spec, match", [
    ("last0", "lastN needs N in 1..12"), ("last13", "lastN needs N in 1..12"), ("lastx", "not a block number"),
    ("12", "outside blocks 0-11"), ("9-6", "runs backwards"), ("-1", "not a block number"), ("a-b", "not a block"),
    ("", "give all, lastN"), (",", "give all, lastN"),
])
def test_parse_blocks_refuses_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=rf"--lora_blocks .*{match}"):
        parse_blocks(spec, 12)


def test_block_numbering_per_backbone() -> None:
    """SAM ViT: blocks.k; TinyViT: its transformer blocks numbered across stages 1-3 (stage 0 is
    convolutional and has no number), so vit_t's last stage is blocks 8-9 (last2)."""
    assert block_names(tiny_sam("vit", image_size=64, depth=3)) == ["blocks.0", "blocks.1", "blocks.2"]
    tinyvit = block_names(tiny_sam("vit_t", image_size=256))
    assert tinyvit == ["layers.1.blocks.0", "layers.1.blocks.1"] + [f"layers.2.blocks.{j}" for j in range(6)] + \
        ["layers.3.blocks.0", "layers.3.blocks.1"]
    assert [tinyvit[k] for k in parse_blocks("last2", 10)] == ["layers.3.blocks.0", "layers.3.blocks.1"]
    with pytest.raises(ValueError, match="no numbered blocks"):
        block_names(torch.nn.Linear(2, 2))


def _upstream_tinyvit(encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """TinyViT's own forward_features (its stages' forwards), with the token grid side S/16."""
    x = encoder.patch_embed(x)
    for layer in encoder.layers:
        x = layer(x)
    side = encoder.img_size // 16
    return encoder.neck(x.view(x.shape[0], side, side, x.shape[-1]).permute(0, 3, 1, 2))


@pytest.mark.parametrize("kind, size", [("vit", 64), ("vit_t", 256)])
def test_two_halves_equal_the_whole_forward(kind: str, size: int, one_thread) -> None:
    sam = tiny_sam(kind, image_size=size, depth=4) if kind == "vit" else tiny_sam(kind, image_size=size)
    encoder = sam.image_encoder
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = encoder(images)
        if kind == "vit_t":  # our TinyViT forward is the steps': check it against the stages' own forwards
            torch.testing.assert_close(whole, _upstream_tinyvit(encoder, images), rtol=0, atol=0)
        for k in range(len(block_names(sam))):
            middle = run_to_block(encoder, images, k)
            torch.testing.assert_close(run_from_block(encoder, middle, k), whole, rtol=0, atol=0)
    with pytest.raises(ValueError, match="block 99 does not exist"):
        run_to_block(encoder, images, 99)


def test_block_inputs_table_matches_the_built_models(one_thread) -> None:
    """The cached size of every block's input (encoder_blocks.BLOCK_INPUTS) is what the real vit_t and
    vit_b hand to that block (built at 256 px), and vit_l / vit_h follow their registry's depth and width."""
    image = torch.zeros(1, 3, 256, 256)
    for model_type in ("vit_t", "vit_b"):
        torch.manual_seed(0)
        encoder = sam_model.build_model(model_type, None, 256).sam.image_encoder
        assert len(block_names(encoder)) == encoder_blocks.block_count(model_type)
        with torch.no_grad():
            for k, (stride, channels) in enumerate(encoder_blocks.BLOCK_INPUTS[model_type]):
                x = run_to_block(encoder, image, k)
                assert x.numel() == (256 // stride) ** 2 * channels and x.shape[-1] == channels, (model_type, k)
    for model_type in ("vit_l", "vit_h"):
        keywords = sam_model.MODEL_REGISTRY[model_type].builder.keywords
        assert encoder_blocks.BLOCK_INPUTS[model_type] == ((16, keywords["embed_dim"]),) * keywords["depth"]
    # the figure: vit_b at 1024 px, bf16: 64 x 64 x 768 values = 6.3 MB per image
    assert encoder_blocks.block_input_bytes("vit_b", 1024, 9, "bf16") == 64 * 64 * 768 * 2 == 6_291_456
    assert encoder_blocks.block_input_bytes("vit_t", 1024, 8, "fp32") == 64 * 64 * 320 * 4
