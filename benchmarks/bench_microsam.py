"""Seconds per training iteration of micro-sam's own ``train_sam``, for the side-by-side row of
bench.py (issue 12). Not part of our package and not importable from it: run it with the separate
micro-sam environment that ``benchmarks/microsam_env.sh`` builds (micro-sam is no dependency of ours)::

    MICROSAM_ENV/bin/python benchmarks/bench_microsam.py --n_sub_iteration 1
    MICROSAM_ENV/bin/python benchmarks/bench_microsam.py --n_sub_iteration 8
    MICROSAM_ENV/bin/python benchmarks/bench_microsam.py --n_sub_iteration 1 --model_type vit_b --lora_rank 4

The last runs micro-sam's LoRA (issue 13's row): ``train_sam(..., peft_kwargs={"rank": 4})`` on
vit_b, which wraps every encoder block's attention with micro-sam's ``LoRASurgery`` (q and v) and
freezes the rest of the encoder; the prompt encoder and mask decoder train (``freeze=None``:
micro-sam refuses PEFT together with a frozen image encoder, and does not offer PEFT for vit_t).

The work (by default): vit_t (MobileSAM) with random weights (a random state dict written to a temporary
checkpoint, so nothing is downloaded), ``freeze=["image_encoder"]``, no segmentation decoder
(prompt-based training only, as ours), 512 px patches of the EM sections (``images/NN.png``;
``masks/NN.png`` turned into instance labels by connected components) drawn by micro-sam's own
``default_sam_loader``, ``n_objects_per_batch=25`` (a cap: a 512 px patch of these sections holds
about 3-12 mitochondria, all of which are used; the JSON lists the counts), batch size 1, on the
CPU. ``train_sam`` always builds its trainer with ``mixed_precision=True``; torch_em's
DefaultTrainer then picks ``torch.autocast`` with bfloat16 on a CPU device (float16 only on CUDA)
and a disabled GradScaler, so bf16 needs no setting of ours. The script records, inside each
forward, whether autocast is on and its dtype, and the dtype of the decoder's masks, so the JSON
shows that bf16 was really active.

Timing: ``train_sam`` is called unchanged, but the ``SamTrainer`` class it instantiates is
swapped for a subclass that wraps the ``forward_context`` and ``backprop`` callables passed to
``_train_epoch_impl``. One iteration's time (``times_s``) runs from entering the forward context
(prompt sampling, encoder forward, every sub-iteration's decoder pass, loss and new prompts) to
the end of ``backprop`` (backward and optimizer step). ``iteration_wall_s`` is the time from one
forward to the next, which adds fetching the (pre-drawn) patch, ``zero_grad`` and micro-sam's
tensorboard logging. The first ``--warmup`` iterations are excluded from both. micro-sam
alternates prompts: even iterations a single point (3 masks in the first sub-iteration), odd
ones a box; with an even ``--iterations`` both kinds are measured equally often.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import imageio.v3 as imageio
import micro_sam
import micro_sam.util as sam_util
import numpy as np
import torch
import torch_em
from micro_sam.training import default_sam_loader, sam_trainer, train_sam
from scipy import ndimage
from torch.utils.data import DataLoader

log = logging.getLogger("bench_microsam")
DEFAULT_DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "em_vnc"


@dataclass
class Record:
    """What the timed trainer saw in each training iteration (validation is not recorded)."""

    starts: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    objects: list[int] = field(default_factory=list)
    instances: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    sub_iterations: list[int] = field(default_factory=list)
    autocast: set[str] = field(default_factory=set)
    mask_dtypes: set[str] = field(default_factory=set)
    _loss_calls: int = 0


def timed_trainer_class(base: type, record: Record) -> type:
    """A subclass of micro-sam's ``SamTrainer`` that fills ``record`` and changes nothing else."""

    class TimedSamTrainer(base):
        def _train_epoch_impl(self, progress, forward_context: Callable, backprop: Callable):
            device_type = self._device_type

            @contextlib.contextmanager
            def timed_context() -> Iterator[None]:
                record.starts.append(time.perf_counter())
                record._loss_calls = 0
                record.prompts.append("point" if self._iteration % 2 == 0 else "box")
                with forward_context():
                    enabled = torch.is_autocast_enabled(device_type)
                    dtype = torch.get_autocast_dtype(device_type) if enabled else "off"
                    record.autocast.add(f"{device_type}:{dtype}")
                    yield

            def timed_backprop(loss: torch.Tensor) -> None:
                backprop(loss)
                record.step_times.append(time.perf_counter() - record.starts[-1])
                record.sub_iterations.append(record._loss_calls)

            return super()._train_epoch_impl(progress, timed_context, timed_backprop)

        def _preprocess_batch(self, batched_inputs, y, sampled_ids):
            batched_inputs, y_one_hot = super()._preprocess_batch(batched_inputs, y, sampled_ids)
            if self.model.training:
                record.objects.append(int(y_one_hot.shape[1]))
                record.instances.append(int(len(torch.unique(y[0])) - 1))
            return batched_inputs, y_one_hot

        def _compute_loss(self, batched_outputs, y_one_hot):
            if self.model.training:
                record._loss_calls += 1
                record.mask_dtypes.update(str(out["masks"].dtype) for out in batched_outputs)
            return super()._compute_loss(batched_outputs, y_one_hot)

    return TimedSamTrainer


@contextlib.contextmanager
def patched_trainer(record: Record) -> Iterator[None]:
    """Make ``train_sam`` build the timed trainer, and restore micro-sam's class afterwards."""
    original = sam_trainer.SamTrainer
    sam_trainer.SamTrainer = timed_trainer_class(original, record)
    try:
        yield
    finally:
        sam_trainer.SamTrainer = original


def load_sections(data_dir: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The EM sections and their instance labels (connected components of the binary masks)."""
    image_paths = sorted((data_dir / "images").glob("*.png"))
    if not image_paths:
        raise FileNotFoundError(f"no images/*.png under {data_dir}")
    images, labels = [], []
    for path in image_paths:
        images.append(imageio.imread(path))
        mask = imageio.imread(data_dir / "masks" / path.name) > 0
        labels.append(ndimage.label(mask)[0].astype(np.uint32))
    return images, labels


def sample_patches(images: list[np.ndarray], labels: list[np.ndarray], patch_size: int,
                   n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches drawn once from micro-sam's own loader (random patches with at least 2 objects
    of >= 25 px, batch 1). Drawn up front because micro-sam's prompt sampling uses the same numpy
    RNG as its patch sampling: drawn lazily, runs with another n_sub_iteration would get other
    patches after the first."""
    loader = default_sam_loader(
        raw_paths=images, raw_key=None, label_paths=labels, label_key=None,
        patch_shape=(patch_size, patch_size), with_segmentation_decoder=False,
        n_samples=n, batch_size=1, shuffle=True, num_workers=0, pin_memory=False,
    )
    return [(x, y) for x, y in loader]


def fixed_loader(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> DataLoader:
    """A loader that yields the pre-drawn batches as they are, in order."""
    return DataLoader(batches, batch_size=None, shuffle=False)


def save_patches(batches: list[tuple[torch.Tensor, torch.Tensor]], out: Path) -> None:
    """The drawn patches as ``out/images/NNN.png`` (uint8) and ``out/masks/NNN.tif`` (instance
    labels), so that bench.py trains ours on exactly the same patches."""
    import tifffile

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for i, (x, y) in enumerate(batches):
        image = np.clip(x[0, 0].numpy(), 0, 255).astype(np.uint8)
        imageio.imwrite(out / "images" / f"{i:03d}.png", image)
        tifffile.imwrite(out / "masks" / f"{i:03d}.tif", y[0, 0].numpy().astype(np.uint16))


def write_random_checkpoint(path: Path, seed: int, model_type: str = "vit_t") -> None:
    """A state dict of ``model_type`` with the architecture's own random initialisation."""
    torch.manual_seed(seed)
    sam = sam_util.sam_model_registry[model_type]()
    torch.save(sam.state_dict(), path)


def run_training(args: argparse.Namespace, record: Record) -> None:
    """One ``train_sam`` call over warm-up + measured iterations, its output sent to stderr."""
    images, labels = load_sections(args.data)
    total = args.warmup + args.iterations
    batches = sample_patches(images, labels, args.patch_size, total)
    if args.save_patches is not None:
        save_patches(batches[args.warmup:], args.save_patches)
    train_loader = fixed_loader(batches)
    val_loader = fixed_loader(sample_patches(images, labels, args.patch_size, 1))
    with tempfile.TemporaryDirectory() as tmp, patched_trainer(record), \
            contextlib.redirect_stdout(sys.stderr):
        checkpoint = Path(tmp) / f"{args.model_type}_random.pt"
        write_random_checkpoint(checkpoint, args.seed, args.model_type)
        train_sam(
            name="bench", model_type=args.model_type, train_loader=train_loader, val_loader=val_loader,
            n_iterations=total, early_stopping=None, n_objects_per_batch=25,
            checkpoint_path=str(checkpoint), with_segmentation_decoder=False,
            freeze=frozen_parts(args), peft_kwargs=peft_kwargs(args), device="cpu",
            n_sub_iteration=args.n_sub_iteration, save_root=tmp, verify_n_labels_in_loader=1,
        )


def peft_kwargs(args: argparse.Namespace) -> dict | None:
    """micro-sam's LoRA (``--lora_rank`` > 0: every encoder block, q and v), else None."""
    return {"rank": args.lora_rank} if args.lora_rank > 0 else None


def frozen_parts(args: argparse.Namespace) -> list[str] | None:
    """What ``train_sam`` freezes: the image encoder without LoRA; nothing with it (micro-sam's PEFT
    freezes the encoder's own weights itself and refuses ``freeze=["image_encoder"]``)."""
    return None if args.lora_rank > 0 else ["image_encoder"]


def summary(args: argparse.Namespace, record: Record) -> dict:
    """The JSON line: measured iterations only, warm-up dropped."""
    w = args.warmup
    times = record.step_times[w:]
    wall = [b - a for a, b in zip(record.starts[w:], record.starts[w + 1:])]
    return {
        "n_sub_iteration": args.n_sub_iteration,
        "iterations": len(times),
        "warmup": w,
        "median_s_per_iteration": round(statistics.median(times), 4),
        "times_s": [round(t, 4) for t in times],
        "iteration_wall_s": [round(t, 4) for t in wall],
        "prompts": record.prompts[w:len(record.step_times)],
        "objects_per_iteration": record.objects[w:],
        "instances_per_patch": record.instances[w:],
        "sub_iterations_run": record.sub_iterations[w:],
        "autocast": sorted(record.autocast),
        "decoder_mask_dtypes": sorted(record.mask_dtypes),
        "model_type": args.model_type, "weights": "random", "freeze": frozen_parts(args),
        "peft_kwargs": peft_kwargs(args),
        "n_objects_per_batch": 25, "patch_size": args.patch_size, "batch_size": 1,
        "threads": torch.get_num_threads(), "device": "cpu",
        "microsam_version": micro_sam.__version__, "torch_em_version": torch_em.__version__,
        "torch_version": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_sub_iteration", type=int, default=8,
                        help="micro-sam's iterative-prompting rounds per iteration (compare 1 and 8)")
    parser.add_argument("--iterations", type=int, default=6, help="measured training iterations")
    parser.add_argument("--warmup", type=int, default=1, help="first iterations run but not measured")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder with images/NN.png and binary masks/NN.png (EM sections)")
    parser.add_argument("--patch_size", type=int, default=512, help="square patch side in pixels")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, patches and prompts")
    parser.add_argument("--model_type", choices=("vit_t", "vit_b"), default="vit_t", help="SAM model to train")
    parser.add_argument("--lora_rank", type=int, default=0,
                        help="0: frozen image encoder (the vit_t rows); > 0: micro-sam's LoRA of this rank on every "
                             "encoder block (peft_kwargs={'rank': r}), vit_b only")
    parser.add_argument("--save_patches", type=Path, default=None,
                        help="write the measured iterations' patches here (images/*.png, masks/*.tif)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    if args.iterations < 1 or args.warmup < 0 or args.n_sub_iteration < 1 or args.lora_rank < 0:
        parser.error("--iterations and --n_sub_iteration must be >= 1, --warmup and --lora_rank >= 0")
    if args.lora_rank > 0 and args.model_type == "vit_t":
        parser.error("micro-sam offers no PEFT for vit_t: use --model_type vit_b with --lora_rank")
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    record = Record()
    log.info("micro-sam %s, %s, LoRA rank %d: %d + %d iterations, n_sub_iteration %d", micro_sam.__version__,
             args.model_type, args.lora_rank, args.warmup, args.iterations, args.n_sub_iteration)
    run_training(args, record)
    if len(record.step_times) != args.warmup + args.iterations:
        log.error("expected %d timed iterations, got %d", args.warmup + args.iterations, len(record.step_times))
        return 1
    sys.stdout.write(json.dumps(summary(args, record)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
