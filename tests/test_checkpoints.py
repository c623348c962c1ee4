"""checkpoints.py: the registry of official files, verification, and reading a checkpoint into a
model (type checks, errors, position embeddings interpolated for another input size)."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from conftest import tiny_sam

from samlora.core.errors import UserError
from samlora.models import checkpoints
from samlora.models.checkpoints import CHECKPOINTS, CheckpointSpec, ChecksumError, default_checkpoint_path, verify_file
from samlora.models.sam import build_model

PAYLOAD = os.urandom(300 * 1024)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


# --- the registry and verification ---------------------------------------------------------
def test_registry_sanity() -> None:
    assert set(CHECKPOINTS) == {"vit_t", "vit_b", "vit_l", "vit_h"}
    for model_type, spec in CHECKPOINTS.items():
        assert spec.model_type == model_type
        assert urlparse(spec.url).scheme == "https"
        assert spec.filename == Path(urlparse(spec.url).path).name
        assert spec.sha256 is not None and re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
        assert spec.sha256_prefix == spec.sha256[:6]
        assert spec.size is not None and spec.size > 10_000_000
        if model_type != "vit_t":
            # SAM's file-name suffix is an MD5 prefix, not a SHA-256 one: a file checked with
            # torch.hub's "name carries the SHA-256 prefix" rule would always be rejected.
            suffix = re.fullmatch(rf"sam_{model_type}_([0-9a-f]{{6}})\.pth", spec.filename)
            assert suffix is not None and not spec.sha256.startswith(suffix.group(1))


def test_default_checkpoint_path() -> None:
    assert default_checkpoint_path("vit_b") == Path("weights/sam_vit_b_01ec64.pth")
    assert default_checkpoint_path("vit_t", "w") == Path("w/mobile_sam.pt")
    with pytest.raises(ValueError, match="vit_t"):
        default_checkpoint_path("vit_x")


def test_verify_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(PAYLOAD)
    verify_file(path, CheckpointSpec("t", "u", "f.bin", PAYLOAD_SHA256, size=len(PAYLOAD)))
    # prefix + size only, for entries without a published full hash
    verify_file(path, CheckpointSpec("t", "u", "f.bin", sha256_prefix=PAYLOAD_SHA256[:6],
                                     size=len(PAYLOAD)))
    with pytest.raises(ChecksumError, match="bytes, expected"):
        verify_file(path, CheckpointSpec("t", "u", "f.bin", PAYLOAD_SHA256, size=len(PAYLOAD) + 1))
    wrong = "0" * 64 if PAYLOAD_SHA256[0] != "0" else "1" * 64
    with pytest.raises(ChecksumError, match="SHA-256"):
        verify_file(path, CheckpointSpec("t", "u", "f.bin", wrong))
    with pytest.raises(ValueError):
        CheckpointSpec("t", "u", "f.bin")  # nothing to verify against


# --- reading a checkpoint into a model -----------------------------------------------------
def test_checkpoint_errors(tmp_path: Path) -> None:
    """Real vit_t / vit_b: the official tensor layout, as users' files have it."""
    vit_t = build_model("vit_t", image_size=256).sam
    tpath = tmp_path / "mobile_sam.pt"
    torch.save(vit_t.state_dict(), tpath)
    with pytest.raises(UserError, match="is a vit_t checkpoint but --model_type is vit_b"):
        build_model("vit_b", checkpoint=tpath)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        build_model("vit_t", checkpoint=junk)
    partial_state = {k: v for k, v in vit_t.state_dict().items() if not k.startswith("mask_decoder.")}
    torch.save(partial_state, tmp_path / "partial.pt")
    with pytest.raises(UserError, match="lacks"):
        build_model("vit_t", checkpoint=tmp_path / "partial.pt")
    with pytest.raises(UserError, match="does not exist"):
        build_model("vit_t", checkpoint=tmp_path / "missing.pt")
    # a 1024 checkpoint (wrapped as {"model": ...}) loads into a 256 px MobileSAM
    torch.save({"model": build_model("vit_t").sam.state_dict()}, tmp_path / "wrapped.pt")
    assert build_model("vit_t", checkpoint=tmp_path / "wrapped.pt", image_size=256).info.checkpoint_sha256


def test_a_built_model_carries_its_info_beside_it(tmp_path: Path) -> None:
    """build_model returns ``(sam, info)``: the type, input size and the loaded file's SHA-256
    (None: random weights) in a frozen record; nothing is set on SAM's module. BaseModels hands
    out the same record."""
    from samlora.models import adapters
    from samlora.models.model_info import ModelInfo

    sam, info = build_model("vit_t", image_size=256)
    assert info == ModelInfo("vit_t", 256, None) and info.random_weights
    path = tmp_path / "mobile_sam.pt"
    torch.save(sam.state_dict(), path)
    loaded = build_model("vit_t", checkpoint=path, image_size=256)
    assert loaded.info == ModelInfo("vit_t", 256, hashlib.sha256(path.read_bytes()).hexdigest())
    assert not loaded.info.random_weights
    hidden = ("model_type", "checkpoint_sha256", "random_weights")
    assert not any(hasattr(model, name) for model in (sam, loaded.sam) for name in hidden)
    bases = adapters.BaseModels("vit_t", path, 256)
    assert bases.info() == loaded.info and bases.sha256 == loaded.info.checkpoint_sha256
    assert adapters.BaseModels("vit_t", None, 256).info(3) == info


def keys_cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.75 (the kernel of PyTorch's bicubic mode)."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``n_out x n_in`` weights of a bicubic resize with half-pixel centres (align_corners=False):
    output i samples the input at ``(i + 0.5) * n_in / n_out - 0.5`` from its 4 nearest pixels,
    indices past the border clamped to it."""
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        source = (i + 0.5) * n_in / n_out - 0.5
        base = int(np.floor(source))
        for k in (-1, 0, 1, 2):
            weights[i, min(max(base + k, 0), n_in - 1)] += keys_cubic(source - (base + k))
    return weights


def test_checkpoint_positions_are_interpolated_for_a_smaller_input(tmp_path: Path) -> None:
    """A 1024 px checkpoint with non-zero position tables, loaded into a 512 px model: the 64x64
    absolute embedding is its bicubic resampling to 32x32 (computed here from the kernel, and a
    linear ramp kept exactly inside the border), the global block's 127-row relative tables are
    their linear resampling to 63 rows (np.interp), and every other tensor loads unchanged.

    Tiny ViTs with 12 blocks (ViT-B's tensor names, so the file is read as a vit_b checkpoint);
    segment_anything initialises these tables at 0, so the test fills them itself."""
    rng = np.random.default_rng(0)
    state = tiny_sam("vit", image_size=1024, depth=12).state_dict()
    channels = state["image_encoder.pos_embed"].shape[-1]
    y, x = np.mgrid[0:64, 0:64].astype(np.float64)
    pos = rng.normal(size=(64, 64, channels))  # every tap's weight shows in the result
    pos[..., 0] = 0.5 * y - 0.25 * x + 3  # a linear ramp
    pos[..., 1] = np.sin(y / 5) * np.cos(x / 7)  # a smooth pattern
    state["image_encoder.pos_embed"] = torch.tensor(pos[None], dtype=torch.float32)
    rel_keys = [k for k, v in state.items() if k.endswith(("rel_pos_h", "rel_pos_w")) and v.shape[0] == 2 * 64 - 1]
    assert rel_keys == ["image_encoder.blocks.1.attn.rel_pos_h", "image_encoder.blocks.1.attn.rel_pos_w"]
    for key in rel_keys:
        table = rng.normal(size=tuple(state[key].shape))
        table[:, 0] = np.linspace(-1.0, 2.0, table.shape[0])  # a ramp: linear interpolation keeps it
        state[key] = torch.tensor(table, dtype=torch.float32)
    path = tmp_path / "sam_vit_b_1024.pth"
    torch.save(state, path)

    small = tiny_sam("vit", image_size=512, seed=1, depth=12)
    sha256 = checkpoints.load_checkpoint(small, path, "vit_b").sha256
    assert sha256 and len(sha256) == 64
    loaded = small.state_dict()

    resized = loaded["image_encoder.pos_embed"].double().numpy()
    assert resized.shape == (1, 32, 32, channels)
    weights = bicubic_matrix(64, 32)
    expected = np.einsum("iy,yxc,jx->ijc", weights, pos, weights)
    np.testing.assert_allclose(resized[0], expected, rtol=1e-5, atol=1e-5)
    centres = 2 * np.arange(32) + 0.5  # output i sits at input coordinate 2i + 0.5
    inner = slice(1, 31)  # all 4 taps inside the 64 px grid: no clamping
    ramp = 0.5 * centres[:, None] - 0.25 * centres[None, :] + 3
    np.testing.assert_allclose(resized[0, inner, inner, 0], ramp[inner, inner], rtol=0, atol=1e-4)
    assert not np.allclose(resized[0, 0, 0, 0], ramp[0, 0], atol=1e-3)  # the border is clamped, not extrapolated

    sources = np.maximum((np.arange(63) + 0.5) * 127 / 63 - 0.5, 0)
    for key in rel_keys:
        table = state[key].double().numpy()
        got = loaded[key].double().numpy()
        assert got.shape == (63, table.shape[1])
        expected = np.stack([np.interp(sources, np.arange(127), column) for column in table.T], axis=1)
        # torch computes the source coordinates (up to 125.5) in float32: ~1e-5 of a sample step
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
        np.testing.assert_allclose(got[:, 0], np.interp(sources, np.arange(127), np.linspace(-1.0, 2.0, 127)),
                                   rtol=0, atol=1e-5)
    for key, value in loaded.items():  # every other tensor is loaded unchanged
        if key != "image_encoder.pos_embed" and key not in rel_keys:
            assert torch.equal(value, state[key]), key
