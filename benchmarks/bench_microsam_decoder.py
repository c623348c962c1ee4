"""Checks that our AIS decoder (instance_decoder.py) is micro-sam's, in micro-sam's own code.

Two steps in two environments (micro-sam is no dependency of ours; ``benchmarks/microsam_env.sh``
builds its environment)::

    python benchmarks/bench_microsam_decoder.py export decoder_check.pt          # our environment
    MICROSAM_ENV/bin/python benchmarks/bench_microsam_decoder.py check decoder_check.pt

``export`` builds our :class:`instance_decoder.InstanceDecoder` with random weights (and random
BatchNorm running statistics, so that every tensor matters), runs it on a random 1x256x64x64
embedding and writes its ``decoder_state``, the embedding and our maps (raw 1024 px, and
resized to an image of ``--original_size`` the way micro-sam resizes them) to one file.

``check`` builds micro-sam's decoder the way ``get_predictor_and_decoder`` does
(``instance_segmentation.get_decoder`` on a SAM image encoder: vit_t from ``mobile_sam``, random
weights, nothing downloaded), which loads our ``decoder_state`` strictly, and also loads the
UNETR's whole state dict (encoder + ours) with ``strict=True``; it runs micro-sam's
``DecoderAdapter`` on the same embedding as micro-sam's ``InstanceSegmentationWithDecoder`` does
(the adapter as built, i.e. in training mode: BatchNorm normalises with the image's own
statistics) and, for our running-statistics variant, after ``eval()``; and prints the largest
absolute differences as JSON.

The combined checkpoint (``train --export_merged`` of a model carrying the decoder), in four steps::

    python benchmarks/bench_microsam_decoder.py base base.pt                     # random vit_t + decoder
    python main.py train --checkpoint base.pt --model_type vit_t ... --export_merged merged.pt
    python benchmarks/bench_microsam_decoder.py ours merged.pt ours.pt           # our maps on a real image
    MICROSAM_ENV/bin/python benchmarks/bench_microsam_decoder.py theirs merged.pt ours.pt --microsam_file ms.pt
    python benchmarks/bench_microsam_decoder.py read ms.pt ours.pt               # our --checkpoint reads theirs

``base`` writes a random MobileSAM (seeded) with a random decoder in the combined layout (a
``--checkpoint`` for a tiny training run, so that the exported model carries the decoder).
``ours`` loads the exported file with our ``--checkpoint`` reader, embeds ``--image`` (a section
of tests/data/em_vnc) and runs our decoder at the image's size. ``theirs`` loads the same file
with micro-sam's ``get_predictor_and_decoder`` and ``get_sam_model``, runs micro-sam's decoder on
our embedding (and on micro-sam's own embedding of the image) and prints the max abs
differences; it also re-writes the file with micro-sam's ``export_custom_sam_model(...,
with_segmentation_decoder=True)``, which ``read`` loads with our reader and compares.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger("bench_microsam_decoder")


def random_decoder():
    """A random AIS decoder of micro-sam's widths with random BatchNorm statistics too (seed first)."""
    from samlora.models import instance_decoder

    decoder = instance_decoder.InstanceDecoder()
    with torch.no_grad():
        for name, buffer in decoder.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return decoder


def export(path: Path, original_size: tuple[int, int], seed: int) -> dict:
    """Our decoder, an embedding and our maps -> ``path`` (torch.save)."""
    from samlora.models import sam as model

    torch.manual_seed(seed)
    decoder = random_decoder()
    decoder.eval()
    embedding = torch.randn(1, 256, 64, 64)
    input_size = model.preprocess_shape(original_size, 1024)
    out: dict = {"decoder_state": decoder.state_dict(), "embedding": embedding,
                 "input_size": input_size, "original_size": original_size}
    with torch.no_grad():
        for per_image, key in ((True, "maps"), (False, "maps_running_stats")):
            decoder.set_per_image_statistics(per_image)
            raw = decoder(embedding)
            out[key + "_raw"] = raw
            out[key] = decoder.postprocess(raw, input_size, original_size)
    torch.save(out, path)
    return {"wrote": str(path), "input_size": list(input_size), "original_size": list(original_size),
            "maps_shape": list(out["maps"].shape)}


def check(path: Path) -> dict:
    """micro-sam's decoder with our state on the exported embedding -> max abs differences."""
    import warnings

    warnings.simplefilter("ignore")
    from micro_sam.instance_segmentation import get_decoder
    from mobile_sam import sam_model_registry

    saved = torch.load(path, map_location="cpu", weights_only=False)
    encoder = sam_model_registry["vit_t"]().image_encoder
    adapter = get_decoder(encoder, saved["decoder_state"], device="cpu")  # micro-sam's own loading path
    unetr_state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()} | dict(saved["decoder_state"])
    from micro_sam.instance_segmentation import get_unetr

    unetr = get_unetr(encoder, device="cpu")
    unetr.load_state_dict(unetr_state, strict=True)  # raises on any missing / unexpected key or shape
    result = {"adapter_training_mode_as_built": adapter.training,
              "decoder_state_tensors": len(saved["decoder_state"])}
    input_size, original_size = tuple(saved["input_size"]), tuple(saved["original_size"])
    with torch.no_grad():
        # Eval first: a forward in training mode moves BatchNorm's running averages.
        for train_mode, key in ((False, "maps_running_stats"), (True, "maps")):
            adapter.train(train_mode)
            raw = adapter._forward_impl(saved["embedding"])
            theirs = adapter.postprocess_masks(raw, input_size, original_size)
            result[f"max_abs_diff_{key}_raw_1024"] = float((raw - saved[key + "_raw"]).abs().max())
            result[f"max_abs_diff_{key}"] = float((theirs - saved[key]).abs().max())
            result[f"{key}_shape"] = list(theirs.shape)
    return result


def _read_rgb(path: Path):
    import numpy as np

    from samlora.data.images import read_image_file

    image = read_image_file(path)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def base(path: Path, seed: int) -> dict:
    """A random MobileSAM and a random decoder (random BatchNorm statistics too) -> combined ``path``."""
    from samlora.models import checkpoints
    from samlora.models import sam as model

    torch.manual_seed(seed)
    sam = model.build_model("vit_t", None, 1024).sam
    decoder = random_decoder()
    torch.save(checkpoints.combined_state(sam.state_dict(), decoder.state_dict()), path)
    return {"wrote": str(path)}


def ours(path: Path, out: Path, image_path: Path) -> dict:
    """Our reader, encoder and decoder on a real image -> ``out`` (image, embedding, maps)."""
    from samlora.models import combined, instance_decoder
    from samlora.models import sam as model

    sam = combined.build_model("vit_t", path, 1024).sam
    decoder = instance_decoder.attached(sam)
    if decoder is None:
        raise SystemExit(f"{path} carries no decoder_state")
    image = _read_rgb(image_path)
    prepared = model.prepare_image(image, 1024)
    with torch.no_grad():
        embedding = model.encode_images(sam, prepared.tensor[None])
        maps = decoder.predict(embedding, prepared.input_size, prepared.original_size)
    torch.save({"image": torch.from_numpy(image), "embedding": embedding, "maps": maps,
                "input_size": prepared.input_size, "original_size": prepared.original_size,
                "sam_state": {k: v for k, v in sam.state_dict().items() if not k.startswith("instance_decoder.")},
                "decoder_state": instance_decoder.decoder_state(sam)}, out)
    return {"wrote": str(out), "image": str(image_path), "maps_shape": list(maps.shape)}


def theirs(path: Path, ours_path: Path, microsam_file: Path, maps_tif: Path | None = None) -> dict:
    """micro-sam's loaders on our exported file; its decoder's maps against ours (and against the
    ``<stem>_maps.tif`` our ``detect predict --write_maps`` wrote for the same image, ``maps_tif``)."""
    import warnings

    warnings.simplefilter("ignore")
    from micro_sam.instance_segmentation import get_predictor_and_decoder
    from micro_sam.util import export_custom_sam_model, get_sam_model

    saved = torch.load(ours_path, map_location="cpu", weights_only=False)
    predictor, decoder = get_predictor_and_decoder("vit_t", checkpoint_path=str(path), device="cpu")
    input_size, original_size = tuple(saved["input_size"]), tuple(saved["original_size"])
    with torch.no_grad():
        maps_on_ours = decoder(saved["embedding"], input_size, original_size)
        predictor.set_image(saved["image"].numpy())
        their_embedding = predictor.features
        maps_on_theirs = decoder(their_embedding, input_size, original_size)
    sam = get_sam_model("vit_t", checkpoint_path=str(path), device="cpu", return_sam=True)[1]
    state = sam.state_dict()
    export_custom_sam_model(str(path), "vit_t", str(microsam_file), with_segmentation_decoder=True)
    written = {}
    if maps_tif is not None:
        import tifffile

        detect_maps = torch.from_numpy(tifffile.imread(maps_tif)).float()
        written = {"write_maps_file": str(maps_tif), "write_maps_shape": list(detect_maps.shape),
                   "max_abs_diff_maps_their_embedding_vs_write_maps":
                       float((maps_on_theirs[0] - detect_maps).abs().max())}
    return written | {
        "get_predictor_and_decoder_loaded": True,
        "maps_shape": list(maps_on_ours.shape),
        "max_abs_diff_maps_our_embedding": float((maps_on_ours - saved["maps"]).abs().max()),
        "max_abs_diff_embedding": float((their_embedding - saved["embedding"]).abs().max()),
        "max_abs_diff_maps_their_embedding": float((maps_on_theirs - saved["maps"]).abs().max()),
        "get_sam_model_max_abs_diff_tensors": max(float((state[k] - v).abs().max())
                                                   for k, v in saved["sam_state"].items()),
        "get_sam_model_same_keys": set(state) == set(saved["sam_state"]),
        "microsam_export_wrote": str(microsam_file),
    }


def read(microsam_file: Path, ours_path: Path) -> dict:
    """Our ``--checkpoint`` reader on micro-sam's own combined export: the same tensors."""
    from samlora.models import combined, instance_decoder

    saved = torch.load(ours_path, map_location="cpu", weights_only=False)
    sam = combined.build_model("vit_t", microsam_file, 1024).sam
    decoder = instance_decoder.decoder_state(sam)
    state = sam.state_dict()
    return {"decoder_attached": bool(decoder),
            "decoder_tensors_equal": decoder.keys() == saved["decoder_state"].keys()
            and all(torch.equal(v, saved["decoder_state"][k]) for k, v in decoder.items()),
            "sam_tensors_equal": all(torch.equal(state[k], v) for k, v in saved["sam_state"].items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("step", choices=("export", "check", "base", "ours", "theirs", "read"),
                        help="export / base / ours / read: in our environment; check / theirs: in micro-sam's")
    parser.add_argument("path", type=Path, help="the file export writes and check reads; for ours / theirs the "
                        "--export_merged file, for read micro-sam's export")
    parser.add_argument("ours_path", type=Path, nargs="?", default=None,
                        help="ours / theirs / read: the file of our maps and tensors")
    parser.add_argument("--image", type=Path, default=Path("tests/data/em_vnc/images/00.png"),
                        help="ours: the image the maps are computed on")
    parser.add_argument("--microsam_file", type=Path, default=Path("microsam_export.pt"),
                        help="theirs: where micro-sam's export_custom_sam_model writes the file")
    parser.add_argument("--original_size", type=int, nargs=2, default=(600, 800),
                        help="H W of the pretend image the maps are resized to")
    parser.add_argument("--maps_tif", type=Path, default=None,
                        help="theirs: also compare with this <stem>_maps.tif of `detect predict --write_maps`")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and embedding")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    steps = {"export": lambda: export(args.path, tuple(args.original_size), args.seed),
             "check": lambda: check(args.path), "base": lambda: base(args.path, args.seed),
             "ours": lambda: ours(args.path, args.ours_path, args.image),
             "theirs": lambda: theirs(args.path, args.ours_path, args.microsam_file, args.maps_tif),
             "read": lambda: read(args.path, args.ours_path)}
    if args.step in ("ours", "theirs", "read") and args.ours_path is None:
        parser.error(f"{args.step} needs the ours_path argument")
    result = steps[args.step]()
    log.info(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
