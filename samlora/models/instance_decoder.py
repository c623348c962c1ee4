"""The learned decoder of automatic instance segmentation (AIS), in micro-sam's state-dict layout.

A small convolutional decoder on SAM's image embedding (Bx256x(S/16)x(S/16), 256x64x64 at the
usual 1024 px for every backbone) that predicts three maps per pixel, each in [0, 1] (sigmoid):
``foreground``, ``center_distance`` (0 at an object's centre, 1 at its farthest pixel) and
``boundary_distance`` (0 at its most inner pixel, 1 on its boundary); instance_watershed.py turns
them into objects, instance_targets.py computes them from labels for training.

The layout is that of micro-sam's AIS decoder (``micro_sam.instance_segmentation.get_unetr``:
torch_em's ``UNETR`` with the SAM encoder, ``out_channels=3``, ``use_skip_connection=False``,
final sigmoid), so :meth:`InstanceDecoder.state_dict` is exactly what micro-sam stores as
``decoder_state`` (the UNETR's state dict without its ``encoder.`` keys), and a ``decoder_state``
of micro-sam loads here with ``strict=True``. The facts this follows (checked by
bench_microsam_decoder.py in micro-sam's environment):

* Widths ``[512, 256, 128, 64]`` (64 x 2**i, reversed). Without skip connections the four
  "deconv" blocks form one chain on the embedding: ``deconv1`` 256->512 (2x), ``deconv2``
  512->256 (4x), ``deconv3`` 256->128 (8x), ``deconv4`` 128->64 (16x); each is a 2x upsampler
  (bilinear + 1x1 conv, or a 2x2 transposed conv; :class:`_Upsample` convolves first, the same
  function at a quarter of the cost), a 3x3 conv, BatchNorm and ReLU.
* ``base`` (256->512 at 1x) and the up path ``decoder`` (3 stages: 2x upsampler to half the
  width, concatenation with the chain's output of that scale, a conv pair) run beside the
  chain. The chain's outputs are twice as wide as the up path expects, and torch_em's decoder
  centre-crops every dimension but the batch, channels included: stage i keeps channels
  ``[c/2, 3c/2)`` of a 2c-channel chain output (:func:`_centre_crop`).
* ``deconv_out`` (2x upsampler 64->64) brings the up path to 16x, it is concatenated with
  ``deconv4``'s output, ``decoder_head`` (conv pair 128->64) and ``out_conv`` (1x1, 64->3) follow.
* A conv pair is torch_em's ``ConvBlock2d``: InstanceNorm (no parameters), 3x3 conv, ReLU,
  InstanceNorm, 3x3 conv, ReLU.
* micro-sam runs the decoder as ``get_decoder`` returns it, in training mode, so its BatchNorm
  layers use the statistics of the image at hand, not the running averages; our eval mode does
  the same per image by default (bench_microsam_decoder.py: identical maps either way).

Sizes: the maps come out at 16x the embedding (the padded SxS input). :meth:`InstanceDecoder.
postprocess` brings them to the image as micro-sam's ``UNETR.postprocess_masks`` does (and as
SAM's masks are, :func:`model.postprocess_logits`): bilinear to SxS (``image_size``), crop to
``input_size`` (the resized image before the bottom-right padding: SAM's predictor's
``input_size``), bilinear to ``original_size`` (``align_corners=False``, no antialiasing).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from samlora.models import sam as model

log = logging.getLogger(__name__)

#: The output channels, in order.
MAP_NAMES: tuple[str, ...] = ("foreground", "center_distance", "boundary_distance")
EMBED_DIM = 256
INITIAL_FEATURES = 64
DEPTH = 3  # upsampling stages of the up path (and 2x steps of the chain beyond the first)


class _Upsample(nn.Module):
    """2x bilinear upsampling and a 1x1 conv (torch_em ``Upsampler2d``; keys ``conv.*``).

    torch_em upsamples first; this convolves first. The two are the same function: a 1x1 conv
    acts on each pixel alone and bilinear weights sum to 1 (edges included), so
    ``interp(W x + b) = W interp(x) + b``. Convolving at the low resolution costs a quarter of
    the multiply-adds and interpolates C' instead of C channels: the decoder runs ~1.2x faster
    forward and backward on a CPU, its maps equal torch_em's order to float rounding
    (tests/test_instance_decoder.py).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BxCxHxW -> BxC'x2Hx2W."""
        return F.interpolate(self.conv(x), scale_factor=2, mode="bilinear", align_corners=False)


class _TransposedUpsample(nn.Module):
    """2x2 transposed conv of stride 2 (torch_em ``SingleDeconv2DBlock``; keys ``block.*``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BxCxHxW -> BxC'x2Hx2W."""
        return self.block(x)


def _upsampler(in_channels: int, out_channels: int, transposed: bool) -> nn.Module:
    return (_TransposedUpsample if transposed else _Upsample)(in_channels, out_channels)


class _Conv3x3(nn.Module):
    """A padded 3x3 conv held as ``block`` (torch_em ``SingleConv2DBlock``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _BatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that, outside training, can normalise each image by its own statistics.

    micro-sam runs its AIS decoder as ``get_decoder`` builds it, in training mode (it never calls
    ``eval()``), so at inference its BatchNorm layers normalise with the statistics of the
    batch (one image, or one batch of tiles) rather than the running averages. With
    ``per_image_statistics`` (the default) this layer does that in eval mode for each image on
    its own, without touching the running averages: the same numbers as micro-sam for one image,
    and results that do not depend on how images are batched.
    """

    per_image_statistics: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.per_image_statistics:
            return super().forward(x)
        return F.instance_norm(x, None, None, self.weight, self.bias, use_input_stats=True, eps=self.eps)


class _UpConv(nn.Module):
    """2x upsampler, 3x3 conv, BatchNorm, ReLU (torch_em ``Deconv2DBlock``): BxCxHxW -> BxC'x2Hx2W."""

    def __init__(self, in_channels: int, out_channels: int, transposed: bool) -> None:
        super().__init__()
        self.block = nn.Sequential(_upsampler(in_channels, out_channels, transposed), _Conv3x3(out_channels),
                                   _BatchNorm(out_channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _ConvPair(nn.Module):
    """InstanceNorm, 3x3 conv, ReLU, twice (torch_em ``ConvBlock2d``): BxCxHxW -> BxC'xHxW."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.InstanceNorm2d(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.InstanceNorm2d(out_channels), nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def _centre_crop(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The centre of ``x`` in every dimension but the first (channels included), at ``shape``."""
    starts = [(have - want) // 2 for have, want in zip(x.shape[1:], shape[1:])]
    return x[(slice(None),) + tuple(slice(s, s + n) for s, n in zip(starts, shape[1:]))]


class _UpPath(nn.Module):
    """The up path (torch_em ``Decoder``): per stage, upsample to the next width, concatenate
    the centre crop of that scale's chain output, run a conv pair."""

    def __init__(self, widths: list[int], transposed: bool) -> None:
        super().__init__()
        pairs = list(zip(widths[:-1], widths[1:]))
        self.blocks = nn.ModuleList(_ConvPair(w_in, w_out) for w_in, w_out in pairs)
        self.samplers = nn.ModuleList(_upsampler(w_in, w_out, transposed) for w_in, w_out in pairs)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Bx512xhxw and the chain outputs (2x, 4x, 8x) -> Bx64x8hx8w."""
        for block, sampler, skip in zip(self.blocks, self.samplers, skips):
            x = sampler(x)
            x = block(torch.cat([x, _centre_crop(skip, x.shape)], dim=1))
        return x


class InstanceDecoder(nn.Module):
    """SAM's image embedding -> foreground, centre-distance and boundary-distance maps in [0, 1].

    Args:
        embed_dim: channels of the embedding (256 for every SAM backbone).
        initial_features: width of the finest level (64 in micro-sam; the widths are
            ``initial_features * 2**i``).
        image_size: side S of the padded square input whose embedding is decoded, used by
            :meth:`postprocess` (1024 in micro-sam).
        transposed: 2x2 transposed convs instead of bilinear + 1x1 conv for upsampling (torch_em's
            ``use_conv_transpose=True``, which micro-sam's loader recognises; see
            :func:`uses_transposed_convs`).

    Registration order follows torch_em's UNETR, so ``state_dict()`` lists the keys in the order
    micro-sam's ``decoder_state`` has them. In eval mode the BatchNorm layers normalise each image
    by its own statistics, as micro-sam's inference does (:class:`_BatchNorm`,
    :meth:`set_per_image_statistics`).
    """

    def __init__(self, embed_dim: int = EMBED_DIM, initial_features: int = INITIAL_FEATURES,
                 image_size: int = 1024, transposed: bool = False) -> None:
        super().__init__()
        widths = [initial_features * 2 ** i for i in range(DEPTH + 1)][::-1]  # [512, 256, 128, 64]
        self.embed_dim, self.image_size, self.transposed = embed_dim, image_size, transposed
        self.decoder = _UpPath(widths, transposed)
        self.deconv1 = _UpConv(embed_dim, widths[0], transposed)
        self.deconv2 = _UpConv(widths[0], widths[1], transposed)
        self.deconv3 = _UpConv(widths[1], widths[2], transposed)
        self.deconv4 = _UpConv(widths[2], widths[3], transposed)
        self.base = _ConvPair(embed_dim, widths[0])
        self.out_conv = nn.Conv2d(widths[-1], len(MAP_NAMES), 1)
        self.deconv_out = _upsampler(widths[-1], widths[-1], transposed)
        self.decoder_head = _ConvPair(2 * widths[-1], widths[-1])

    def set_per_image_statistics(self, on: bool) -> None:
        """Outside training, normalise with each image's own statistics (``True``, micro-sam's
        inference) or with the running averages of training (``False``); see :class:`_BatchNorm`."""
        for module in self.modules():
            if isinstance(module, _BatchNorm):
                module.per_image_statistics = on

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Bx256xhxw embeddings -> Bx3x16hx16w maps in [0, 1] (the padded input's frame)."""
        if embeddings.ndim != 4 or embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"expected Bx{self.embed_dim}xhxw image embeddings, got shape {tuple(embeddings.shape)}")
        z9 = self.deconv1(embeddings)
        z6 = self.deconv2(z9)
        z3 = self.deconv3(z6)
        z0 = self.deconv4(z3)
        x = self.decoder(self.base(embeddings), [z9, z6, z3])
        x = self.decoder_head(torch.cat([self.deconv_out(x), z0], dim=1))
        return torch.sigmoid(self.out_conv(x))

    def postprocess(self, maps: torch.Tensor, input_size: tuple[int, int],
                    original_size: tuple[int, int]) -> torch.Tensor:
        """Bx3xS'xS' maps -> Bx3xHxW at the original image size, as micro-sam resizes them.

        ``input_size``: (h, w) of the resized image inside the padded square; ``original_size``:
        (H, W) of the image. Bilinear interpolation keeps the values in [0, 1].
        """
        return model.postprocess_logits(maps, self.image_size, input_size, original_size)

    def predict(self, embeddings: torch.Tensor, input_size: tuple[int, int],
                original_size: tuple[int, int]) -> torch.Tensor:
        """Bx256xhxw embeddings of images of one size -> Bx3xHxW maps at ``original_size``."""
        return self.postprocess(self(embeddings), input_size, original_size)


def uses_transposed_convs(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a ``decoder_state`` upsamples with transposed convs (micro-sam's own test: its
    up path's samplers hold ``block`` rather than ``conv`` tensors)."""
    return any(".block." in key for key in state if key.startswith("decoder.samplers"))


def decoder_from_state(state: Mapping[str, torch.Tensor], image_size: int = 1024) -> InstanceDecoder:
    """An :class:`InstanceDecoder` holding a ``decoder_state`` (ours or micro-sam's), loaded strictly.

    The embedding width and the finest width are read from the tensors' shapes.

    Raises:
        ValueError: the state is no AIS decoder of this layout (names the missing / unexpected keys
            or the mismatched shape).
    """
    try:
        embed_dim = int(state["base.block.1.weight"].shape[1])
        initial_features = int(state["out_conv.weight"].shape[1])
    except KeyError as exc:
        raise ValueError(f"not an instance-segmentation decoder state: no {exc.args[0]!r} tensor") from None
    decoder = InstanceDecoder(embed_dim, initial_features, image_size, uses_transposed_convs(state))
    try:
        missing, unexpected = decoder.load_state_dict(dict(state), strict=False)
    except RuntimeError as exc:  # a shape mismatch
        raise ValueError(f"decoder state does not fit the AIS decoder: {str(exc).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ValueError(f"decoder state does not fit the AIS decoder: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return decoder


# --------------------------------------------------------------------------------------------
# The decoder carried by a SAM model
# --------------------------------------------------------------------------------------------
#: The attribute of a SAM model that holds its AIS decoder; its tensors are ``instance_decoder.*``
#: in the model's state dict, in adapter files and in resume checkpoints.
ATTRIBUTE = "instance_decoder"
PREFIX = ATTRIBUTE + "."


def attach(sam: nn.Module, decoder: InstanceDecoder) -> InstanceDecoder:
    """Make ``decoder`` a submodule of ``sam`` (``sam.instance_decoder``), on ``sam``'s device.

    Carried by the model, it trains, saves (adapters.trained_state), resumes, is reduced under
    torchrun and moves with ``sam.to(...)`` like SAM's own mask decoder. Returns the decoder.
    """
    device = next(sam.parameters()).device
    sam.add_module(ATTRIBUTE, decoder.to(device))
    return decoder


def attached(sam: nn.Module) -> InstanceDecoder | None:
    """The AIS decoder ``sam`` carries, or None."""
    decoder = getattr(sam, ATTRIBUTE, None)
    return decoder if isinstance(decoder, InstanceDecoder) else None


def split_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A model's (or adapter's) state -> ``(SAM's tensors, the decoder's tensors without the prefix)``:
    the decoder's part is a ``decoder_state`` in micro-sam's layout."""
    sam_part = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    decoder_part = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    return sam_part, decoder_part


def decoder_state(sam: nn.Module) -> dict[str, torch.Tensor]:
    """The ``decoder_state`` of the decoder ``sam`` carries (micro-sam's keys, CPU copies), or {}."""
    decoder = attached(sam)
    if decoder is None:
        return {}
    return {k: v.detach().cpu().clone() for k, v in decoder.state_dict().items()}
