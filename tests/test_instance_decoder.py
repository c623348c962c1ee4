"""The AIS decoder: micro-sam's state-dict layout (keys, shapes, order), shapes of its maps, the
resize back to the image, strict loading of foreign states, per-image BatchNorm statistics, and
the upsamplers' order (convolve, then upsample) against torch_em's."""
from __future__ import annotations

import pytest
import torch

from samlora.models import instance_decoder
from samlora.models import sam as model
from samlora.models.instance_decoder import InstanceDecoder

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny passes, a busy machine

# micro-sam's ``decoder_state`` (micro_sam.instance_segmentation.get_unetr: torch_em UNETR, SAM
# encoder, out_channels=3, use_skip_connection=False, interpolating upsamplers), written from the
# UNETR's source (torch_em/model/unetr.py, unet.py) and from its state dict printed in micro-sam's
# environment: every key that does not start with "encoder.", in order, with its shape.
# BatchNorm: weight, bias, running_mean, running_var, num_batches_tracked (a scalar).
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _conv_pair(prefix: str, cin: int, cout: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.block.1.weight", (cout, cin, 3, 3)), (f"{prefix}.block.1.bias", (cout,)),
            (f"{prefix}.block.4.weight", (cout, cout, 3, 3)), (f"{prefix}.block.4.bias", (cout,))]


def _deconv(prefix: str, cin: int, cout: int) -> list[tuple[str, tuple[int, ...]]]:
    return ([(f"{prefix}.block.0.conv.weight", (cout, cin, 1, 1)), (f"{prefix}.block.0.conv.bias", (cout,)),
             (f"{prefix}.block.1.block.weight", (cout, cout, 3, 3)), (f"{prefix}.block.1.block.bias", (cout,))]
            + [(f"{prefix}.block.2.{name}", () if name == "num_batches_tracked" else (cout,)) for name in _BN])


MICRO_SAM_DECODER_STATE: list[tuple[str, tuple[int, ...]]] = (
    _conv_pair("decoder.blocks.0", 512, 256) + _conv_pair("decoder.blocks.1", 256, 128)
    + _conv_pair("decoder.blocks.2", 128, 64)
    + [("decoder.samplers.0.conv.weight", (256, 512, 1, 1)), ("decoder.samplers.0.conv.bias", (256,)),
       ("decoder.samplers.1.conv.weight", (128, 256, 1, 1)), ("decoder.samplers.1.conv.bias", (128,)),
       ("decoder.samplers.2.conv.weight", (64, 128, 1, 1)), ("decoder.samplers.2.conv.bias", (64,))]
    + _deconv("deconv1", 256, 512) + _deconv("deconv2", 512, 256) + _deconv("deconv3", 256, 128)
    + _deconv("deconv4", 128, 64)
    + _conv_pair("base", 256, 512)
    + [("out_conv.weight", (3, 64, 1, 1)), ("out_conv.bias", (3,)),
       ("deconv_out.conv.weight", (64, 64, 1, 1)), ("deconv_out.conv.bias", (64,))]
    + _conv_pair("decoder_head", 128, 64)
)


@pytest.fixture(scope="module")
def decoder() -> InstanceDecoder:
    """micro-sam's sizes (for the layout; its forward passes take a loaded CPU seconds)."""
    torch.manual_seed(0)
    return InstanceDecoder(image_size=64).eval()


def small_decoder(seed: int = 0, image_size: int = 64) -> InstanceDecoder:
    """The same layout at widths 64..8 on a 32-channel embedding: quick forward passes."""
    torch.manual_seed(seed)
    return InstanceDecoder(embed_dim=32, initial_features=8, image_size=image_size).eval()


def test_state_dict_has_micro_sams_keys_shapes_and_order(decoder) -> None:
    ours = [(key, tuple(value.shape)) for key, value in decoder.state_dict().items()]
    assert ours == MICRO_SAM_DECODER_STATE
    assert len(ours) == 66
    assert sum(p.numel() for p in decoder.parameters()) == 9_591_235


def test_transposed_variant_has_micro_sams_keys() -> None:
    state = InstanceDecoder(transposed=True).state_dict()
    assert tuple(state["decoder.samplers.0.block.weight"].shape) == (512, 256, 2, 2)  # ConvTranspose2d: in, out
    assert tuple(state["deconv1.block.0.block.weight"].shape) == (256, 512, 2, 2)
    assert tuple(state["deconv_out.block.weight"].shape) == (64, 64, 2, 2)
    assert instance_decoder.uses_transposed_convs(state)
    assert not instance_decoder.uses_transposed_convs(InstanceDecoder().state_dict())


def test_maps_are_sixteen_times_the_embedding_in_unit_range(decoder) -> None:
    with torch.no_grad():
        maps = decoder(torch.randn(2, 256, 2, 3))
    assert maps.shape == (2, 3, 32, 48)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    assert instance_decoder.MAP_NAMES == ("foreground", "center_distance", "boundary_distance")


def test_wrong_embedding_width_is_refused(decoder) -> None:
    with pytest.raises(ValueError, match="Bx256xhxw"):
        decoder(torch.randn(1, 32, 4, 4))


def test_postprocess_crops_the_padding_and_resizes_like_sam_masks() -> None:
    """An image of 30x40 at image_size 64 is resized to 48x64, padded to 64x64: the maps are
    cropped to 48x64 and resized to 30x40, as model.postprocess_logits does for SAM's masks."""
    original = (30, 40)
    input_size = model.preprocess_shape(original, 64)
    assert input_size == (48, 64)
    decoder = small_decoder()
    embedding = torch.randn(1, 32, 4, 4)
    with torch.no_grad():
        raw = decoder(embedding)
        out = decoder.predict(embedding, input_size, original)
    assert out.shape == (1, 3, 30, 40)
    expected = torch.nn.functional.interpolate(raw[..., :48, :64], original, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected)


def test_per_image_statistics_do_not_depend_on_the_batch() -> None:
    """Eval mode normalises each image by its own statistics (micro-sam's inference, which runs the
    decoder in training mode with one image a batch): one image alone == the same image in a batch
    == training mode on that image alone; with running statistics the numbers differ."""
    decoder = small_decoder(seed=1)
    a, b = torch.randn(1, 32, 4, 4), torch.randn(1, 32, 4, 4)
    with torch.no_grad():
        decoder.train()
        as_micro_sam = decoder(a)
        decoder.eval()
        alone = decoder(a)
        batched = decoder(torch.cat([a, b]))[:1]
        decoder.set_per_image_statistics(False)
        running = decoder(a)
    torch.testing.assert_close(alone, as_micro_sam, atol=1e-6, rtol=0)
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=0)
    assert float((running - alone).abs().max()) > 1e-3


def _torch_em_upsample(self, x: torch.Tensor) -> torch.Tensor:
    """torch_em's Upsampler2d order: bilinear 2x first, then the 1x1 conv."""
    return self.conv(torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))


def test_convolving_before_upsampling_gives_torch_ems_maps(monkeypatch) -> None:
    """_Upsample convolves at the low resolution (a quarter of the cost): the same function as
    torch_em's upsample-then-convolve, edges included (odd sizes), forward and gradients."""
    sampler = instance_decoder._Upsample(16, 8)
    x = torch.randn(2, 16, 5, 7, requires_grad=True)
    ours = sampler(x)
    (grad_ours,) = torch.autograd.grad(ours.square().sum(), x)
    decoder, embedding = small_decoder(seed=3), torch.randn(1, 32, 4, 4)
    with torch.no_grad():
        maps_ours = decoder(embedding)
    monkeypatch.setattr(instance_decoder._Upsample, "forward", _torch_em_upsample)
    theirs = sampler(x)
    (grad_theirs,) = torch.autograd.grad(theirs.square().sum(), x)
    with torch.no_grad():
        maps_theirs = decoder(embedding)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_ours, grad_theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps_ours, maps_theirs, atol=1e-6, rtol=0)


def test_training_updates_every_parameter() -> None:
    decoder = small_decoder(seed=2, image_size=32).train()
    maps = decoder(torch.randn(2, 32, 2, 2))
    maps.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters())


def test_decoder_from_state_round_trip_and_detects_the_variant(decoder) -> None:
    for source in (decoder, InstanceDecoder(embed_dim=32, initial_features=8, transposed=True)):
        loaded = instance_decoder.decoder_from_state(source.state_dict(), image_size=64)
        assert loaded.transposed == source.transposed
        for key, value in source.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("base.block.1.weight"), "no 'base.block.1.weight'"),
    (lambda s: s.pop("deconv2.block.1.block.bias"), "missing"),
    (lambda s: s.update({"extra.weight": torch.zeros(1)}), "unexpected"),
    (lambda s: s.update({"deconv3.block.1.block.weight": torch.zeros(1, 1, 3, 3)}), "size mismatch"),
])
def test_foreign_states_are_refused_with_one_message(decoder, change, message) -> None:
    state = dict(decoder.state_dict())
    change(state)
    with pytest.raises(ValueError, match=message):
        instance_decoder.decoder_from_state(state)
