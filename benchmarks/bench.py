"""Speed and memory figures, measured in one run and printed as ratios against the model's own
compute (the limit a training loop can reach). Not a test: run ``python -m benchmarks.bench [--quick]``.

Rows (targets in brackets):
- LoRA training step / bare encoder+decoder forward+backward on the same input   [<= 1.15]
- bf16 training step / fp32 training step (CPU)                                    [<= 0.55]
- frozen-encoder epoch with cached embeddings / the decoder's own fwd+bwd          [<= 1.10]
  and / the same epoch without the cache (vit_t, vit_b)
- 512 px step / 1024 px step                                                       [<= 0.33]
- peak RSS of one LoRA training step (vit_t, vit_b; 1024 and 512 px)
- sub_iterations 8 step / sub_iterations 1 step, cached embedding                 [<= 8.5]
- where the mask decoder spends its time, per number of prompts
- step with loss at input resolution / at decoder resolution (vit_t; also frozen-encoder steps)
- side by side with micro-sam's train_sam (--microsam_python): s per iteration    [<= 0.3x, 0.5x]
- late LoRA (--lora_blocks; the first adapted block's input cached) step / full-depth LoRA step,
  vit_b last 3 blocks and vit_t last stage, 1024 px, bf16                          [<= 0.35, 0.5]
  and vit_b late LoRA step / micro-sam's vit_b LoRA iteration (--microsam_python)  [<= 0.35]
- detect predict per image / (YOLO forward + encoder + decoder alone), bf16 / fp32 [<= 1.15]
- instance metrics on a 512x512 map with 500 objects on both sides                  [<< 1 s]
- volumes: linking / SAM per section, peak RSS 64 / 16 sections, 2 dask workers / 1 process and their
  labels, sections without / with oneDNN (bench_volumes.py)
- ais per image / amg per image (vit_t, 1024 px, 2 threads)                       [<= 0.1]
  ais per image / encoder forward [<= 3 on a CPU], apg per image / amg per image, and
  frozen-encoder epoch with --instance_decoder / without                           [<= 1.3] (bench_ais.py)

``--only ROW`` runs one family (microsam, late, loss, ais); ``--quick`` runs vit_t only, the loss rows
at 512 px and the ais rows at 256 px with an 8x8 AMG grid and one-image epochs (a smoke run: the
targets are for 1024 px, 32x32 points and three-image epochs); ``--reps`` sets the repetitions
(default 3).
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import statistics
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from benchmarks import bench_ais, bench_sidebyside, bench_volumes
from benchmarks.bench_timing import interleaved_medians, peak_rss_mib, timed
from benchmarks.training_setup import Report, Setup, make_config
from samlora.core import runfiles
from samlora.data import dataset as data
from samlora.data.sample import Sample
from samlora.metrics import scores as metrics
from samlora.models import sam as sam_model

log = logging.getLogger("bench")
DEFAULT_DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "em_vnc"


def peak_rss_child(model_type: str, image_size: int, samples: list[Sample], queue: mp.Queue) -> None:
    setup = Setup(make_config(model_type, image_size), samples[:1])
    setup.epoch()
    queue.put(peak_rss_mib())


def peak_rss(model_type: str, image_size: int, samples: list[Sample]) -> float:
    """Peak resident memory (MiB) of a fresh process doing one LoRA training step."""
    ctx = mp.get_context("spawn")  # fork after torch started its threads can deadlock
    queue = ctx.Queue()
    proc = ctx.Process(target=peak_rss_child, args=(model_type, image_size, samples, queue))
    proc.start()
    value = queue.get(timeout=1800)
    proc.join()
    return value


def decoder_profile(setup: Setup, counts: list[int], reps: int) -> list[tuple[int, float, float, float]]:
    """Decoder fwd+bwd seconds for N box prompts, and the shares of its forward spent in the
    two-way transformer and in the output upscaling (both run once per prompt: SAM repeats the
    image embedding for every prompt)."""
    sam, emb, dec = setup.sam, setup._embedding(), setup.sam.mask_decoder
    pe = sam.prompt_encoder.get_dense_pe()
    rows = []
    for n in counts:
        boxes = setup.item.tensors.boxes[:1].repeat(n, 1)
        with torch.no_grad():
            sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)

        def forward() -> tuple[torch.Tensor, torch.Tensor]:
            return dec(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                       dense_prompt_embeddings=dense, multimask_output=False)

        def forward_backward() -> None:
            low, iou = forward()
            (low.float().mean() + iou.mean()).backward()
            sam.zero_grad(set_to_none=True)

        total = timed(forward_backward, reps)
        with torch.no_grad():
            fwd = timed(forward, reps)
            src = emb.repeat(n, 1, 1, 1) + dense
            pos = pe.repeat(n, 1, 1, 1)
            tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight]).expand(n, -1, -1)
            tokens = torch.cat([tokens, sparse], dim=1)
            transformer = timed(lambda: dec.transformer(src, pos, tokens), reps)
            upscaling = timed(lambda: dec.output_upscaling(src), reps)
        rows.append((n, total, transformer / fwd, upscaling / fwd))
    return rows


def decoder_chunking(setup: Setup, reps: int) -> list[tuple[str, float, str]]:
    """Seconds per prompt of the mask decoder as the tool runs it (prompts in chunks of the
    device's default, inference.default_chunk), for many prompts against one: forward+backward
    (training) and forward (inference)."""
    from samlora.inference import segmenter as inference

    sam, emb = setup.sam, setup._embedding()
    box, chunk = setup.item.tensors.boxes[:1], inference.default_chunk(torch.device("cpu"))

    def run(n: int, backward: bool) -> None:
        tensors = sam_model.PromptTensors(boxes=box.repeat(n, 1))
        for start in range(0, n, chunk):
            with torch.set_grad_enabled(backward):
                low, iou = sam_model.decode(sam, emb[0].detach(), tensors.select(slice(start, start + chunk)))
            if backward:
                (low.float().mean() + iou.float().mean()).backward()
        sam.zero_grad(set_to_none=True)

    one_bwd, one_fwd = timed(lambda: run(1, True), reps), timed(lambda: run(1, False), reps)
    many_bwd, many_fwd = timed(lambda: run(32, True), reps) / 32, timed(lambda: run(64, False), reps) / 64
    return [("decoder fwd+bwd per prompt, 32 prompts / 1 prompt", many_bwd / one_bwd, "[<= 1.15]"),
            ("decoder fwd per prompt, 64 prompts / 1 prompt", many_fwd / one_fwd, "[<= 1.15]")]


def bench_metrics(reps: int) -> float:
    """Seconds for instance_metrics on 512x512 maps with 500 objects each (discs)."""
    rng = np.random.default_rng(0)
    gt = np.zeros((512, 512), np.int32)
    pred = np.zeros_like(gt)
    yy, xx = np.mgrid[:512, :512]
    for i in range(500):
        cy, cx = rng.integers(0, 512, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 64
        gt[disc] = i + 1
        pred[(yy - cy - 2) ** 2 + (xx - cx) ** 2 < 64] = i + 1
    return timed(lambda: metrics.instance_metrics(gt, pred), reps)


def untrained_detector(yolo_size: int, max_det: int):
    """An untrained YOLOv8n (ultralytics' yolov8n.yaml, nothing downloaded), saved and loaded as
    ``detect predict`` loads best.pt, proposing boxes down to a very low confidence."""
    import tempfile

    from samlora.inference import yolo as detector

    ultralytics = detector.import_ultralytics()
    with tempfile.TemporaryDirectory() as tmp:
        untrained = ultralytics.YOLO("yolov8n.yaml", task="detect")
        untrained.ckpt = {"train_args": {"imgsz": yolo_size, "task": "detect"}}
        untrained.save(Path(tmp) / "yolov8n_untrained.pt")
        yolo = detector.load_yolo(Path(tmp) / "yolov8n_untrained.pt")
    return detector.Detector(yolo, Path("yolov8n_untrained.pt"),
                             detector.DetectorOptions(conf=1e-5, max_det=max_det, imgsz=yolo_size))


def model_parts(sam: torch.nn.Module, proposer, image: np.ndarray, boxes: np.ndarray,
                yolo_size: int) -> dict[str, Callable[[], object]]:
    """The bare model calls behind one ``detect predict`` image, on prepared inputs: the YOLO
    network forward on the letterboxed input, SAM's encoder, and the decoder over the boxes in the
    chunks the tool decodes them in (inference.default_chunk)."""
    from samlora.inference import segmenter as inference

    letterboxed = torch.zeros(1, 3, yolo_size, yolo_size)  # a square image letterboxes to a square
    prepared = sam_model.prepare_image(image, 1024).tensor[None]
    with torch.no_grad():
        embedding = sam.image_encoder(prepared)
    prompts = sam_model.make_prompts(image.shape[:2], 1024, boxes)
    chunk = inference.default_chunk(torch.device("cpu"))

    @torch.no_grad()
    def decoder() -> None:
        for start in range(0, len(boxes), chunk):
            sam_model.decode(sam, embedding[0], prompts.select(slice(start, start + chunk)))

    return {"yolo": torch.no_grad()(lambda: proposer.yolo.predictor.model(letterboxed)),
            "encoder": torch.no_grad()(lambda: sam.image_encoder(prepared)), "decoder": decoder}


def bench_detect(samples: list[Sample], quick: bool) -> list[tuple[str, float, str]]:
    """``detect predict``'s per-image time against its model parts measured alone.

    On the first real 1024x1024 section of ``samples``: MobileSAM (vit_t, random weights) at
    1024 px and an untrained YOLOv8n (ultralytics' yolov8n.yaml, nothing downloaded) at 640 px
    whose very low confidence threshold makes it propose boxes, capped at 16 so that every
    measurement decodes the same boxes. Per image, ``detect predict`` runs
    :func:`label_files.segment_file` (read the file; :class:`inference.Segmenter`: YOLO predict with
    its pre- and post-processing and NMS, SAM's input preparation, one encoder pass, the boxes
    decoded, masks at full size, cropped and painted; then the label TIFF, overlay PNG and COCO
    RLE); the Segmenter alone is timed too. The parts are the bare model calls on prepared
    inputs: the YOLO network forward on the letterboxed 640 px input, the image encoder, and
    prompt encoder + mask decoder over the 16 boxes. Measurements are interleaved (one of each
    per repetition, medians) so that load from other processes hits both sides alike. Also
    bf16 / fp32 of the Segmenter.

    Returns ``(name, value, target)`` rows for :func:`main`'s table.
    """
    import tempfile

    from samlora.data.coco import CocoWriter
    from samlora.inference import label_files
    from samlora.inference import segmenter as inference

    reps, n_boxes, yolo_size = (2 if quick else 3), 16, 640
    sample = next(s for s in samples if s.image.shape[:2] == (1024, 1024))
    image = sample.image
    torch.manual_seed(0)
    sam = sam_model.build_model("vit_t", None, 1024).sam
    proposer = untrained_detector(yolo_size, n_boxes)
    pipelines = {p: inference.Segmenter(sam, inference.SegmentOptions(precision=p), proposer)
                 for p in ("fp32", "bf16")}
    boxes, _ = proposer(image)
    if len(boxes) != n_boxes:
        raise RuntimeError(f"the untrained YOLO proposed {len(boxes)} boxes, not {n_boxes}: lower conf")

    with tempfile.TemporaryDirectory() as out:
        outputs = label_files.output_paths(Path(out), sample.path, with_overlay=True)
        coco = CocoWriter("rle")
        measured = {
            "file": lambda: label_files.segment_file(sample.path, sample.path.name, pipelines["fp32"], coco, outputs),
            "pipeline": lambda: pipelines["fp32"](image), "bf16": lambda: pipelines["bf16"](image),
            **model_parts(sam, proposer, image, boxes, yolo_size)}
        t = interleaved_medians(measured, reps)
    parts = t["yolo"] + t["encoder"] + t["decoder"]
    return [
        (f"detect predict per image, vit_t 1024px + YOLOv8n {yolo_size}px, {n_boxes} boxes (s)", t["file"], ""),
        ("detect Segmenter per image, in memory (s)", t["pipeline"], ""),
        ("detect YOLOv8n forward alone (s)", t["yolo"], ""),
        ("detect vit_t encoder alone (s)", t["encoder"], ""),
        (f"detect decoder over the {n_boxes} boxes alone (s)", t["decoder"], ""),
        ("detect predict per image / sum of model parts", t["file"] / parts, "[<= 1.15]"),
        ("detect Segmenter per image / sum of model parts", t["pipeline"] / parts, ""),
        ("detect bf16 / fp32 per image (Segmenter)", t["bf16"] / t["pipeline"], ""),
    ]




def bench_training(model_type: str, samples: list[Sample], reps: int, report: Report) -> None:
    """LoRA training steps against the bare model compute, at 1024 and 512 px, fp32 and bf16."""
    steps = {}
    for size in (1024, 512):
        setup = Setup(make_config(model_type, size), samples)
        setup.epoch()  # warm-up: first-call allocations and kernel selection
        steps[size] = statistics.median(setup.epoch() for _ in range(reps))
        bare = timed(setup.bare, reps)
        report(f"{model_type} {size}px LoRA step (s)", steps[size])
        report(f"{model_type} {size}px bare encoder+decoder fwd+bwd (s)", bare)
        report(f"{model_type} {size}px LoRA step / bare fwd+bwd", steps[size] / bare, "[<= 1.15]")
    bf16 = Setup(make_config(model_type, 1024, "bf16"), samples)
    bf16.epoch()
    step_bf16 = statistics.median(bf16.epoch() for _ in range(reps))
    report(f"{model_type} 1024px bf16 step / fp32 step", step_bf16 / steps[1024], "[<= 0.55]")
    report(f"{model_type} 512px step / 1024px step", steps[512] / steps[1024], "[<= 0.33]")


def bench_frozen(model_type: str, samples: list[Sample], reps: int, report: Report) -> None:
    """A frozen encoder: cached epochs (with and without augmentation) against the decoder's own
    compute, and where the decoder spends its time."""
    frozen_cfg = make_config(model_type, 1024, freeze_encoder=True, lora_targets="decoder", lora_rank=8)
    frozen = Setup(frozen_cfg, samples)
    frozen.epoch()  # fills the cache
    cached = statistics.median(frozen.epoch() for _ in range(reps))
    decoder_only = timed(lambda: frozen.bare(encoder=False), reps)
    frozen.ctx.cache.memory.clear()
    frozen.ctx.cache.bytes = 0
    uncached = frozen.epoch()
    report(f"{model_type} frozen encoder, cached epoch step / decoder fwd+bwd", cached / decoder_only, "[<= 1.10]")
    report(f"{model_type} frozen encoder, cached / uncached epoch", cached / uncached)
    augmented = Setup(frozen_cfg, samples)  # flips / rotations on: each image has 2 cached views
    for epoch in range(3):
        augmented.dataset.epoch = epoch
        third = augmented.epoch()
    report(f"{model_type} frozen encoder with augmentation, epoch 3 / decoder fwd+bwd", third / decoder_only,
           "[<= 1.15]")
    for n, total, tr, up in decoder_profile(frozen, [1, 4, 16], reps):
        report(f"{model_type} decoder fwd+bwd, {n} prompts (s) [fwd: {tr:.0%} transformer, {up:.0%} upscaling]", total)
    for name, value, target in decoder_chunking(frozen, reps):
        report(f"{model_type} {name}", value, target)


LATE_BLOCKS = {"vit_b": ("last3", "last 3 blocks"), "vit_t": ("last2", "last stage")}  # --lora_blocks, row words


def bench_late(model_types: list[str], samples: list[Sample], reps: int, report: Report,
               image_size: int = 1024) -> None:
    """Late LoRA against full-depth LoRA: seconds per step of a real training epoch (rank 4, qkv,
    bf16, 4 box prompts, 1 round), measured interleaved; late LoRA's first epoch (the warm-up
    round) fills the cache of its first adapted block's input, so its steps run only the adapted
    blocks, the neck and the decoder."""
    for model_type in model_types:
        spec, words = LATE_BLOCKS[model_type]
        setups = {blocks: Setup(make_config(model_type, image_size, "bf16", lora_rank=4, lora_alpha=4,
                                            lora_blocks=blocks), samples) for blocks in ("all", spec)}
        epochs = interleaved_medians({blocks: setup.epoch for blocks, setup in setups.items()}, reps)
        t = {blocks: seconds / len(setups[blocks].dataset) for blocks, seconds in epochs.items()}  # per step
        report(f"{model_type} full-depth LoRA step, {image_size} px, bf16 (s)", t["all"])
        report(f"{model_type} late LoRA ({words}) cached step, {image_size} px, bf16 (s)", t[spec])
        report(f"{model_type} late LoRA ({words}) cached step / full-depth LoRA step, {image_size} px",
               t[spec] / t["all"], "[<= 0.35]" if model_type == "vit_b" else "[<= 0.5]")


def bench_loss_resolution(model_type: str, samples: list[Sample], reps: int, report: Report,
                          image_size: int = 1024) -> None:
    """The cost of the loss at the input resolution (the logits upsampled, micro-sam's) against the
    loss at the decoder's 1/4 grid (``--loss_resolution decoder``): seconds per step of real
    training epochs (LoRA qkv rank 8, 4 box prompts, the device's rounds), measured interleaved;
    and the same for a frozen encoder's cached steps, where the decoder and the loss are all that
    runs."""
    for frozen, words in ((False, ""), (True, "frozen-encoder ")):
        extra = dict(freeze_encoder=True, lora_targets="decoder", augment=False) if frozen else {}
        setups = {where: Setup(make_config(model_type, image_size, loss_resolution=where, **extra), samples)
                  for where in ("input", "decoder")}
        t = interleaved_medians({where: setup.epoch for where, setup in setups.items()}, reps)
        if not frozen:
            report(f"{model_type} {image_size}px LoRA step, loss at input resolution (s)", t["input"] / len(samples))
            report(f"{model_type} {image_size}px LoRA step, loss at decoder resolution (s)", t["decoder"] / len(samples))
        report(f"{words}step with loss at input resolution / at decoder resolution", t["input"] / t["decoder"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="vit_t only, fewer repetitions")
    parser.add_argument("--data_dir", type=Path, default=DEFAULT_DATA, help="real images to train on")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--microsam_python", type=Path, default=None,
                        help="python of a separate micro-sam environment (benchmarks/microsam_env.sh): adds micro-sam's "
                             "own training, measured in the same run, beside ours")
    parser.add_argument("--only", choices=("all", "microsam", "late", "loss", "ais"), default="all",
                        help="run only some rows: micro-sam's side by side, late LoRA's, the loss resolution's, or "
                             "the instance decoder's (AIS / APG against AMG, bench_ais.py)")
    parser.add_argument("--reps", type=int, default=None,
                        help="repetitions of each measurement (default 3; fewer for a smoke run)")
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")

    logging.basicConfig(level=logging.WARNING)
    reps = args.reps or 3
    samples = data.load_dataset(args.data_dir)[:3]
    models = ["vit_t"] if args.quick else ["vit_t", "vit_b"]
    rows: list[tuple[str, float, str]] = []
    figures: dict[str, float] = {}

    def report(name: str, value: float, target: str = "") -> None:
        rows.append((name, value, target))
        figures[name] = value
        print(f"{name:<68} {value:8.3f} {target}", flush=True)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, 4 box prompts per image, "
          f"random weights, real EM sections ({args.data_dir.name})\n")
    if args.only in ("all", "microsam"):
        bench_sidebyside.bench_microsam(args.data_dir, reps, report, args.microsam_python)
    if args.only in ("all", "late"):
        bench_late(models, samples, reps, report)
        if not args.quick:
            bench_sidebyside.bench_microsam_late(args.data_dir, reps, report, args.microsam_python)
    if args.only in ("all", "loss"):
        bench_loss_resolution(models[0], samples, reps, report, 512 if args.quick else 1024)
    if args.only in ("all", "ais"):
        bench_ais.bench_ais(samples[:1] if args.quick else samples, reps, report,
                            *((256, 8) if args.quick else (1024, 32)), larger=() if args.quick else ("vit_b",))
    if args.only == "all":
        bench_rest(models, samples, reps, args.quick, report)
    if args.json:
        runfiles.write_json(args.json, figures)
    return 0


def bench_rest(models: list[str], samples: list[Sample], reps: int, quick: bool, report: Report) -> None:
    """The training, frozen-encoder, memory, detect, metrics and volume rows."""
    for model_type in models:
        bench_training(model_type, samples, reps, report)
        bench_frozen(model_type, samples, reps, report)
    for model_type in models:
        for size in (1024, 512):
            report(f"{model_type} {size}px LoRA step peak RSS (MiB)", peak_rss(model_type, size, samples))
    for name, value, target in bench_detect(samples, quick):
        report(name, value, target)
    report("instance_metrics 512x512, 500 vs 500 objects (s)", bench_metrics(reps * 3), "[<< 1 s]")
    for name, value, target in bench_volumes.rows(quick):
        report(name, value, target)


if __name__ == "__main__":
    sys.exit(main())
