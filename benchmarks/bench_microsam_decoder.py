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
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger("bench_microsam_decoder")


def export(path: Path, original_size: tuple[int, int], seed: int) -> dict:
    """Our decoder, an embedding and our maps -> ``path`` (torch.save)."""
    from samlora.models import instance_decoder
    from samlora.models import sam as model

    torch.manual_seed(seed)
    decoder = instance_decoder.InstanceDecoder()
    with torch.no_grad():
        for name, buffer in decoder.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("step", choices=("export", "check"), help="export: in our environment; check: in micro-sam's")
    parser.add_argument("path", type=Path, help="the file export writes and check reads")
    parser.add_argument("--original_size", type=int, nargs=2, default=(600, 800),
                        help="H W of the pretend image the maps are resized to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and embedding")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = export(args.path, tuple(args.original_size), args.seed) if args.step == "export" else check(args.path)
    log.info(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
