"""bench.py's rows beside micro-sam's own training (issues 12 and 13): ours and micro-sam's
``train_sam`` (bench_microsam.py, in a separate environment) on the very same patches, one run."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_timing import interleaved_medians
from benchmarks.training_setup import Report, Setup, make_config
from samlora.data import dataset as data
from samlora.data.sample import Sample

SETTLE_S = 90


def bench_microsam(data_dir: Path, reps: int, report: Report, microsam_python: Path | None, iterations: int = 6) -> None:
    """Seconds per training iteration on micro-sam's work, micro-sam's own ``train_sam`` (with
    ``microsam_python``, the interpreter of a separate micro-sam environment built by
    bench_microsam_env.sh; measured by bench_microsam.py) and ours, in the same run: vit_t, frozen
    encoder, 512 px patches of the EM sections (the very patches micro-sam's loader drew; without
    micro-sam, the first patches with objects), up to 25 objects, bf16, batch 1, box prompts, 1
    and 8 sub-iterations.

    Ours caches the frozen encoder's embeddings (the first epoch fills the cache and is not
    counted); micro-sam runs its encoder every iteration. Ours is a whole epoch per step (data and
    ``zero_grad`` included, micro-sam's ``times_s`` leaves them out); the two round counts are
    measured interleaved.
    """
    runs = {nsub: (nsub, ()) for nsub in (1, 8)}
    samples, theirs = microsam_work(data_dir, iterations, microsam_python, runs)
    config = make_config("vit_t", 1024, "bf16", freeze_encoder=True, train_decoder=True, lora_rank=0,
                         max_objects=25, patch_size=512, augment=False)
    ours = Setup(config, samples)
    ours.epoch()  # fills the cache
    objects = sum(len(ours.dataset[i].prompts) for i in range(len(samples))) / len(samples)

    def epoch_with(rounds: int) -> float:
        ours.ctx.rounds = rounds
        return ours.epoch()

    epochs = interleaved_medians({nsub: (lambda n=nsub: epoch_with(n)) for nsub in (1, 8)}, reps)
    steps = {nsub: seconds / len(ours.dataset) for nsub, seconds in epochs.items()}  # an iteration is a step
    for nsub, step in steps.items():
        report(f"ours, micro-sam's work ({objects:.1f} objects a patch), sub_iterations {nsub} (s/iteration)", step)
        if nsub in theirs:
            report(f"micro-sam train_sam, same patches, n_sub_iteration {nsub} (s/iteration)", theirs[nsub])
            report(f"ours / micro-sam, sub_iterations {nsub}", step / theirs[nsub], "[<= 0.3]" if nsub == 1 else "[<= 0.5]")
    report("vit_t sub_iterations 8 step / sub_iterations 1 step, cached embedding", steps[8] / steps[1], "[<= 8.5]")


def microsam_work(data_dir: Path, iterations: int, microsam_python: Path | None,
                  runs: dict[object, tuple[int, tuple[str, ...]]]) -> tuple[list[Sample], dict[object, float]]:
    """The patches of micro-sam's work and its seconds per iteration for each of ``runs`` (name ->
    (n_sub_iteration, more options)): with ``microsam_python``, the patches its loader drew;
    without it, the first ``iterations`` 512 px patches with objects and no figures of its own."""
    if microsam_python is None:
        return data.load_dataset(data_dir, patch_size=512, drop_empty_patches=True)[:iterations], {}
    with tempfile.TemporaryDirectory() as tmp:
        patches = Path(tmp) / "patches"
        theirs = {name: run_microsam(microsam_python, data_dir, nsub, iterations, patches, *extra)
                  for name, (nsub, extra) in runs.items()}
        return data.load_dataset(patches, mask_type="instance"), theirs


def run_microsam(python: Path, data_dir: Path, nsub: int, iterations: int, patches: Path, *extra: str) -> float:
    """Median seconds per iteration of micro-sam's training (bench_microsam.py in its own
    environment); its patches are written to ``patches``. ``extra``: more of its options, e.g.
    ``--model_type vit_b --lora_rank 4``."""
    import json
    import subprocess

    script = Path(__file__).resolve().parent / "bench_microsam.py"
    cmd = [str(python), str(script), "--n_sub_iteration", str(nsub), "--data", str(data_dir),
           "--iterations", str(iterations), "--threads", str(torch.get_num_threads()), "--save_patches", str(patches),
           *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    # Measured here: for about a minute after the micro-sam process (a 7 GiB environment) exits,
    # the next process's steps run up to 10x slower (the kernel reclaiming its memory); let it settle.
    time.sleep(SETTLE_S)
    return float(json.loads(result.stdout.strip().splitlines()[-1])["median_s_per_iteration"])


def bench_microsam_late(data_dir: Path, reps: int, report: Report, microsam_python: Path | None,
                        iterations: int = 6) -> None:
    """Our vit_b late LoRA (last 3 blocks, cached) against micro-sam's vit_b LoRA (every block) on
    micro-sam's work, as :func:`bench_microsam` (the patches micro-sam's loader drew, else the first
    with objects): rank 4 on q and v (micro-sam's LoRA) and the mask decoder trained (micro-sam's
    default), 1024 px, bf16, up to 25 objects, box prompts, 1 sub-iteration. micro-sam's figure
    comes from bench_microsam.py ``--model_type vit_b --lora_rank 4`` in its own environment, only
    with ``microsam_python``."""
    samples, theirs = microsam_work(data_dir, iterations, microsam_python,
                                    {"late": (1, ("--model_type", "vit_b", "--lora_rank", "4"))})
    config = make_config("vit_b", 1024, "bf16", lora_rank=4, lora_alpha=4, lora_targets="qv", lora_blocks="last3",
                         train_decoder=True, max_objects=25, patch_size=512, augment=False)
    ours = Setup(config, samples)
    ours.epoch()  # fills the cache
    step = statistics.median(ours.epoch() for _ in range(reps))
    report("ours vit_b late LoRA (last 3 blocks) rank 4, micro-sam's work, sub_iterations 1 (s/iteration)", step)
    if theirs:
        report("micro-sam train_sam vit_b LoRA rank 4, same patches, n_sub_iteration 1 (s/iteration)", theirs["late"])
        report("vit_b late LoRA cached step / micro-sam vit_b LoRA iteration", step / theirs["late"], "[<= 0.35]")


