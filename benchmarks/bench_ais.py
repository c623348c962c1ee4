"""The rows of ``bench.py --only ais``: automatic instance segmentation from the learned decoder (AIS)
and its point prompts (APG) against SAM's automatic mask generator (AMG), per image, and the cost
the decoder adds to a frozen-encoder training epoch.

Rows (exactly these names in ``--json``; targets in brackets):
- ``ais per image / amg per image``                                   [<= 0.1]  vit_t, 1024 px
- ``ais per image / encoder forward``                                 [<= 3 on a CPU] (report)
- ``apg per image / amg per image``                                   (report)
- ``frozen-encoder epoch with --instance_decoder / without``          [<= 1.3]

and, reported beside them: ``ais per image, bf16 / fp32, ...`` (``--precision bf16``) and, outside
``--quick``, ``ais per image / encoder forward, vit_b 1024 px`` (the decoder's cost against a
larger encoder).

Random weights (vit_t, micro-sam's decoder widths), one real EM section, ``threads`` intra-op
threads; every per-image figure is the whole Segmenter pipeline (automatic.build_segmenter) as ``detect
predict --mode ais|apg|amg`` runs it on an image (SAM's preprocessing, the encoder, the mode's own
work, painting), measured interleaved (one of each per repetition, medians) so that load from other
processes hits all alike. With random weights AMG keeps few masks after its filters and APG's
number of clicks depends on the random maps: the ratios time the machinery, not a trained model's
output (a trained model's AMG keeps more masks, which only makes AMG slower).
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from benchmarks.bench_timing import interleaved_medians
from benchmarks.training_setup import Report, Setup, make_config
from samlora.data.sample import Sample
from samlora.inference import automatic, segmenter
from samlora.models import instance_decoder
from samlora.models import sam as sam_model
from samlora.training.config import TrainConfig


AIS_VS_AMG = "ais per image / amg per image"
AIS_VS_ENCODER = "ais per image / encoder forward"
APG_VS_AMG = "apg per image / amg per image"
FROZEN_EPOCH = "frozen-encoder epoch with --instance_decoder / without"


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op threads (None: leave torch's setting), restored afterwards."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ais_model(model_type: str, image_size: int, initial_features: int = instance_decoder.INITIAL_FEATURES
              ) -> torch.nn.Module:
    """A random-weight SAM of ``model_type`` at ``image_size`` px carrying a random instance decoder
    (micro-sam's widths by default), in eval mode on the CPU."""
    torch.manual_seed(0)
    sam = sam_model.build_model(model_type, None, image_size).sam
    decoder = instance_decoder.InstanceDecoder(instance_decoder.EMBED_DIM, initial_features, image_size)
    instance_decoder.attach(sam, decoder.eval())
    return sam.eval()


def per_image(image: np.ndarray, model_type: str = "vit_t", image_size: int = 1024, reps: int = 3,
              points_per_side: int = 32, modes: tuple[str, ...] = ("ais", "apg", "amg")) -> dict[str, float]:
    """Median seconds per image of the ``modes``' pipelines (``ais_bf16``: ais under bf16
    autocast, ``--precision bf16``) and of the bare fp32 encoder forward on the prepared input,
    measured interleaved (:func:`interleaved_medians`)."""
    sam = ais_model(model_type, image_size)
    pipelines = {mode: automatic.build_segmenter(sam, segmenter.SegmentOptions(
        mode=mode.removesuffix("_bf16"), points_per_side=points_per_side,
        precision="bf16" if mode.endswith("_bf16") else "fp32")) for mode in modes}
    prepared = sam_model.prepare_image(image, image_size).tensor[None]
    encoder = torch.no_grad()(lambda: sam.image_encoder(prepared))
    measured = {mode: (lambda p=pipeline: p.segment(image)) for mode, pipeline in pipelines.items()}
    return interleaved_medians({**measured, "encoder": encoder}, reps)


def frozen_epochs(model_type: str, samples: list[Sample], image_size: int, reps: int) -> dict[str, float]:
    """Median seconds per step of a frozen-encoder training epoch (cached embeddings, LoRA on the
    mask decoder, train's default objects per step and prompting rounds) with and without
    ``--instance_decoder``, interleaved after a first epoch of each that fills the cache."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    # train's own prompt settings (objects a step, prompting rounds), as `train --freeze_encoder
    # --lora_targets decoder` runs with and without the flag; no augmentation, so the cache is filled once
    common = dict(freeze_encoder=True, lora_targets="decoder", lora_rank=8, augment=False,
                  max_objects=defaults["max_objects"], sub_iterations=defaults["sub_iterations"])
    setups = {with_decoder: Setup(make_config(model_type, image_size, **common, instance_decoder=with_decoder),
                                  samples) for with_decoder in (True, False)}
    for setup in setups.values():
        setup.epoch()  # fills the embedding cache
    t = interleaved_medians({str(k): setup.epoch for k, setup in setups.items()}, reps)  # whole epochs
    return {"with": t["True"] / len(setups[True].dataset), "without": t["False"] / len(setups[False].dataset)}


def bench_ais(samples: list[Sample], reps: int, report: Report, image_size: int = 1024, points_per_side: int = 32,
              threads: int | None = 2, model_type: str = "vit_t", larger: tuple[str, ...] = ()) -> None:
    """The four rows of the module docstring, measured in one run on the first of ``samples``
    (and the first three for the epochs), and two reported beside them: ais under bf16 against
    fp32, and ais against the encoder of each ``larger`` backbone (e.g. vit_b, whose encoder
    costs more than vit_t's while the decoder's cost stays)."""
    with torch_threads(threads):
        t = per_image(samples[0].image, model_type, image_size, reps, points_per_side,
                      ("ais", "apg", "amg", "ais_bf16"))
        size = f"{model_type} {image_size} px, {torch.get_num_threads()} threads"
        report(f"ais per image, {size} (s)", t["ais"])
        report(f"apg per image, {size} (s)", t["apg"])
        report(f"amg per image, {points_per_side}x{points_per_side} points, {size} (s)", t["amg"])
        report(f"encoder forward, {size} (s)", t["encoder"])
        report(AIS_VS_AMG, t["ais"] / t["amg"], "[<= 0.1]")
        report(AIS_VS_ENCODER, t["ais"] / t["encoder"], "[<= 3 on a CPU]")
        report(APG_VS_AMG, t["apg"] / t["amg"])
        report(f"ais per image, bf16 / fp32, {size}", t["ais_bf16"] / t["ais"])
        for other in larger:
            big = per_image(samples[0].image, other, image_size, reps, points_per_side, ("ais",))
            other_size = f"{other} {image_size} px, {torch.get_num_threads()} threads"
            report(f"ais per image, {other_size} (s)", big["ais"])
            report(f"encoder forward, {other_size} (s)", big["encoder"])
            report(f"{AIS_VS_ENCODER}, {other} {image_size} px", big["ais"] / big["encoder"])
        epochs = frozen_epochs(model_type, samples[:3], image_size, reps)
        report(f"frozen-encoder step with --instance_decoder, {size} (s)", epochs["with"])
        report(f"frozen-encoder step without, {size} (s)", epochs["without"])
        report(FROZEN_EPOCH, epochs["with"] / epochs["without"], "[<= 1.3]")
