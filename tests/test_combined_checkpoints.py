"""micro-sam's combined checkpoint ({"model_state", "decoder_state"}): reading it (--checkpoint
attaches the AIS decoder), refusing another backbone's or a damaged one, writing it with
``train --export_merged`` (beside the plain SAM file), and downloading micro-sam's published
models (two files checked by XXH128, combined) from a local HTTP server."""
from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN, tiny_sam

from samlora.core.errors import UserError
from samlora.models import checkpoints, instance_decoder
from samlora.models.combined import build_model


def small_decoder(seed: int = 0) -> instance_decoder.InstanceDecoder:
    torch.manual_seed(seed)
    decoder = instance_decoder.InstanceDecoder(initial_features=8)
    with torch.no_grad():
        for p in decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return decoder


def vit_t_state(image_size: int = 256) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return build_model("vit_t", None, image_size).sam.state_dict()


def test_decoder_prefix_is_instance_decoders() -> None:
    assert checkpoints.DECODER_PREFIX == instance_decoder.PREFIX


def test_read_unwraps_model_state_and_ignores_other_keys(tmp_path: Path) -> None:
    sam = tiny_sam("vit", depth=12)
    decoder = small_decoder().state_dict()
    path = tmp_path / "combined.pt"  # as torch_em training files: sam.* keys, an optimizer beside
    torch.save({"model_state": {f"sam.{k}": v for k, v in sam.state_dict().items()}, "decoder_state": decoder,
                "model_name": "x", "optimizer_state": {"lr": torch.tensor(1.0)}}, path)
    state = checkpoints.read_state_dict(path)
    assert state.keys() == sam.state_dict().keys()
    assert checkpoints.detect_model_type(state) == "vit_b"
    _, read_decoder = checkpoints.read_checkpoint(path)
    assert read_decoder is not None and all(torch.equal(read_decoder[k], v) for k, v in decoder.items())
    plain = tmp_path / "plain.pt"
    torch.save(sam.state_dict(), plain)
    assert checkpoints.read_checkpoint(plain)[1] is None


def test_checkpoint_combined_attaches_the_decoder(tmp_path: Path) -> None:
    state, decoder = vit_t_state(), small_decoder().state_dict()
    path = tmp_path / "vit_t_combined.pt"
    torch.save(checkpoints.combined_state(state, decoder), path)
    sam, info = build_model("vit_t", path, 256)
    carried = instance_decoder.attached(sam)
    assert carried is not None and carried.image_size == 256 and not carried.training
    assert carried.state_dict().keys() == decoder.keys()
    assert all(torch.equal(carried.state_dict()[k], v) for k, v in decoder.items())
    assert all(torch.equal(sam.state_dict()[k], v) for k, v in state.items())
    assert info.checkpoint_sha256 == checkpoints.sha256_file(path)  # the whole file's hash, as before
    # resolve_checkpoint (every command's --checkpoint check) accepts it
    assert checkpoints.resolve_checkpoint("vit_t", str(path)) == path
    plain = tmp_path / "plain.pt"
    torch.save(state, plain)
    assert instance_decoder.attached(build_model("vit_t", plain, 256).sam) is None


def test_other_backbone_and_damaged_decoder_are_one_line_errors(tmp_path: Path) -> None:
    decoder = small_decoder().state_dict()
    vit_b = tmp_path / "vit_b_lm.pt"
    torch.save(checkpoints.combined_state(tiny_sam("vit", depth=12).state_dict(), decoder), vit_b)
    with pytest.raises(UserError) as caught:
        checkpoints.resolve_checkpoint("vit_t", str(vit_b))
    message = str(caught.value)
    assert str(vit_b) in message and "vit_b" in message and "--model_type vit_b" in message
    assert "\n" not in message
    state = vit_t_state()
    damaged = tmp_path / "damaged.pt"
    torch.save({"model_state": state, "decoder_state": {"out_conv.weight": torch.zeros(3, 8, 1, 1)}}, damaged)
    with pytest.raises(UserError, match="decoder_state is damaged"):
        build_model("vit_t", damaged, 256)
    not_tensors = tmp_path / "not_tensors.pt"
    torch.save({"model_state": state, "decoder_state": {"a": 1}}, not_tensors)
    with pytest.raises(UserError, match="damaged"):
        checkpoints.read_checkpoint(not_tensors)


def test_cli_exit_2_for_other_backbone(main, tmp_path: Path, em6: Path) -> None:
    path = tmp_path / "vit_b_lm.pt"
    torch.save(checkpoints.combined_state(tiny_sam("vit", depth=12).state_dict(), small_decoder().state_dict()),
               path)
    assert main(["train", "--data_dir", str(em6), "--output_dir", str(tmp_path / "run"), *TINY_TRAIN,
                 "--checkpoint", str(path)]) == 2
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.pt"))


def test_train_refuses_an_existing_plain_file_before_training(main, tmp_path: Path, em6: Path) -> None:
    """train --instance_decoder --export_merged PATH: an existing <stem>_sam.pt is refused before any work."""
    (tmp_path / "model_sam.pt").write_bytes(b"mine")
    assert main(["train", "--data_dir", str(em6), "--output_dir", str(tmp_path / "run"), *TINY_TRAIN,
                 "--instance_decoder", "--export_merged", str(tmp_path / "model.pt")]) == 2
    assert (tmp_path / "model_sam.pt").read_bytes() == b"mine" and not (tmp_path / "run").exists()


def test_export_merged_refuses_an_existing_plain_file(tmp_path: Path) -> None:
    from samlora.training import crossval

    out = tmp_path / "model.pt"
    assert checkpoints.plain_sam_path(out) == tmp_path / "model_sam.pt"
    (tmp_path / "model_sam.pt").write_bytes(b"mine")
    with pytest.raises(UserError, match="model_sam.pt exists"):
        crossval.export_merged(None, {}, [], out)  # refused before anything is read
    assert (tmp_path / "model_sam.pt").read_bytes() == b"mine" and not out.exists()


@pytest.mark.slow
def test_export_merged_with_a_decoder_writes_both_layouts(main, em6: Path, tmp_path: Path) -> None:
    """A model carrying an AIS decoder (from a combined --checkpoint), trained and exported: the
    combined file (micro-sam's keys) and the plain SAM file; the merged weights give the
    unmerged model's embeddings, and the decoder is the adapter's."""
    from samlora.models import adapters

    base = tmp_path / "base.pt"
    torch.save(checkpoints.combined_state(vit_t_state(1024), small_decoder().state_dict()), base)
    out, export = tmp_path / "run", tmp_path / "model.pt"
    assert main(["train", "--data_dir", str(em6), "--output_dir", str(out), *TINY_TRAIN, "--checkpoint", str(base),
                 "--epochs", "1", "--lora_blocks", "last2", "--export_merged", str(export)]) == 0
    combined = torch.load(export, weights_only=True)
    plain = torch.load(checkpoints.plain_sam_path(export), weights_only=True)
    assert set(combined) == {"model_state", "decoder_state"}
    assert not any(k.startswith(("instance_decoder.", "sam.")) for k in combined["model_state"])
    assert combined["model_state"].keys() == plain.keys()
    assert all(torch.equal(combined["model_state"][k], v) for k, v in plain.items())
    # ours, unmerged: the base (with its decoder) and the final adapter
    ours = adapters.load_finetuned(adapters.BaseModels("vit_t", base, 1024), out / "final" / "best.pt", 0,
                                   merge=False)
    ours_decoder = instance_decoder.decoder_state(ours)
    assert combined["decoder_state"].keys() == ours_decoder.keys()
    assert all(torch.equal(combined["decoder_state"][k], v) for k, v in ours_decoder.items())
    merged, _ = build_model("vit_t", export, 1024)
    assert instance_decoder.attached(merged) is not None
    image = torch.rand(1, 3, 1024, 1024)
    with torch.no_grad():
        assert torch.allclose(merged.image_encoder(image), ours.image_encoder(image), atol=1e-4)


# --- download of micro-sam's models --------------------------------------------------------------
@pytest.fixture
def file_server(tmp_path: Path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_microsam_model_checks_and_combines(main, file_server, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    import download_weights

    served, url = file_server
    sam_state, decoder = tiny_sam("vit", depth=12).state_dict(), small_decoder().state_dict()
    torch.save(sam_state, served / "vit_b.pt")
    torch.save(decoder, served / "vit_b_decoder.pt")
    real = checkpoints.MICROSAM_MODELS["vit_b_lm"]
    model = dataclasses.replace(
        real, encoder=dataclasses.replace(real.encoder, url=url + "vit_b.pt",
                                          xxh128=checkpoints.xxh128_file(served / "vit_b.pt")),
        decoder=dataclasses.replace(real.decoder, url=url + "vit_b_decoder.pt",
                                    xxh128=checkpoints.xxh128_file(served / "vit_b_decoder.pt")))
    monkeypatch.setitem(download_weights.MICROSAM_MODELS, "vit_b_lm", model)
    weights = tmp_path / "weights"
    assert main(["download", "--model_type", "vit_b_lm", "--output_dir", str(weights)]) == 0
    target = weights / "vit_b_lm.pt"
    state, read_decoder = checkpoints.read_checkpoint(target)
    assert set(torch.load(target, weights_only=True)) == {"model_state", "decoder_state"}
    assert all(torch.equal(state[k], v) for k, v in sam_state.items())
    assert read_decoder is not None and all(torch.equal(read_decoder[k], v) for k, v in decoder.items())
    sam = tiny_sam("vit", depth=12)
    assert checkpoints.load_checkpoint(sam, target, "vit_b").decoder_state is not None
    # a file that fails its checksum: nothing is kept
    target.unlink()
    for f in (weights / "micro_sam").iterdir():
        f.unlink()
    (served / "vit_b_decoder.pt").write_bytes(b"corrupted")
    assert main(["download", "--model_type", "vit_b_lm", "--output_dir", str(weights)]) == 2
    assert not target.exists() and not (weights / "micro_sam" / "vit_b_lm_decoder.pt").exists()
