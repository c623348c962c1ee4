"""Speed and memory of volumes, for bench.py (or alone: ``python bench_volumes.py [--tiny]``).

Rows (targets in brackets):
- link_slices per section / SAM per section                                           [<< 0.05]
- peak RSS of detect predict on a 64-section volume / on a 16-section volume of the same sections
                                                                                       [<= 1.1]
- sections per second with 2 dask workers / with 1 process, start-up excluded (and whether they
  wrote the same labels)
- SAM per section without oneDNN (thread-count-invariant, as detect predict computes a volume's
  sections) / with oneDNN: what the same labels on any number of workers cost

The volumes are the 20 real EM sections of tests/data/em_vnc (512x512 crops; ``--sections`` reads
another folder of numbered ``images/NN.png`` + ``masks/NN.png``, e.g. the full 1024 px sections),
repeated to make the deeper ones; SAM is MobileSAM (vit_t, random weights) at 1024 px with the automatic mask
generator on a 2x2 point grid, so each section costs one encoder pass and a few decoder calls.
``detect predict`` runs as a user runs it, in a fresh process, whose peak RSS (VmHWM) it prints.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import tifffile
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SECTIONS = REPO / "tests" / "data" / "em_vnc"
# Runs `main.py ARGS` in this process, then prints its peak resident memory (kB).
CHILD = ("import sys; sys.argv = ['main.py', *sys.argv[1:]]; import main; code = main.main(sys.argv[1:]); "
         "from benchmarks import bench_timing; print('PEAK_MIB', bench_timing.peak_rss_mib()); sys.exit(code)")
Row = tuple[str, float, str]


def real_volume(sections: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The numbered EM sections of ``sections`` (images/NN.png, masks/NN.png; top-left ``size`` px,
    ZxHxW uint8) and their 2-D mitochondria components (int32)."""
    paths = sorted((sections / "images").glob("*.png"))
    images = np.stack([cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths])
    masks = np.stack([cv2.imread(str(sections / "masks" / p.name), cv2.IMREAD_GRAYSCALE) for p in paths])
    labels = np.stack([ndimage.label(m > 0, structure=np.ones((3, 3)))[0] for m in masks[:, :size, :size]])
    return images[:, :size, :size].copy(), labels.astype(np.int32)


def detect_args(image_size: int) -> list[str]:
    return ["--mode", "amg", "--points_per_side", "2", "--pred_iou_thresh", "0", "--stability_score_thresh", "0",
            "--checkpoint", "none", "--model_type", "vit_t", "--image_size", str(image_size), "--device", "cpu",
            "--no_overlay"]


def run_detect(stack: Path, out: Path, image_size: int, *extra: str) -> tuple[float, float]:
    """``detect predict`` on ``stack`` in a fresh process: (wall seconds, peak RSS MiB)."""
    argv = ["detect", "predict", "--input", str(stack), "--output_dir", str(out), *detect_args(image_size), *extra]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"detect predict failed:\n{proc.stderr[-3000:]}")
    return seconds, float(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_MIB")))


def bench_linking(images: np.ndarray, labels: np.ndarray, image_size: int, reps: int) -> list[Row]:
    """Linking the real per-section objects against SAM on one section (the Segmenter of detect
    predict with the options above)."""
    import torch

    from benchmarks.bench_timing import interleaved_medians, timed
    from samlora.inference import segmenter as inference
    from samlora.inference.linking import link_slices
    from samlora.inference.sections import thread_count_invariant
    from samlora.models import sam as sam_model

    torch.manual_seed(0)
    sam = sam_model.build_model("vit_t", None, image_size).sam
    segmenter = inference.Segmenter(sam, inference.SegmentOptions(mode="amg", points_per_side=2, pred_iou_thresh=0,
                                                                  stability_score_thresh=0, tile_size=0))
    rgb = np.repeat(images[0][..., None], 3, axis=2)

    def invariant() -> None:  # as detect predict computes a section of a volume
        with thread_count_invariant():
            segmenter(rgb)

    sam = interleaved_medians({"oneDNN": lambda: segmenter(rgb), "invariant": invariant}, reps)
    link_seconds = timed(lambda: link_slices(labels), reps, warmup=0) / len(labels)
    return [("link_slices per section (s)", link_seconds, ""), ("SAM per section (s)", sam["invariant"], ""),
            ("link_slices per section / SAM per section", link_seconds / sam["invariant"], "[<< 0.05]"),
            ("SAM per section with oneDNN (thread-dependent bits) (s)", sam["oneDNN"], ""),
            ("SAM per section without oneDNN / with oneDNN (the cost of thread-count-invariant sections)",
             sam["invariant"] / sam["oneDNN"], "")]


def bench_streaming(images: np.ndarray, work: Path, image_size: int, small: int, big: int) -> list[Row]:
    """Peak RSS of detect predict on ``big`` sections against ``small`` of the same sections."""
    peaks = {}
    for depth in (small, big):
        stack = work / f"stack{depth}.tif"
        tifffile.imwrite(stack, np.concatenate([images[:small]] * (depth // small)), photometric="minisblack")
        peaks[depth] = run_detect(stack, work / f"out{depth}", image_size)[1]
    return [(f"detect predict peak RSS, {small} sections (MiB)", peaks[small], ""),
            (f"detect predict peak RSS, {big} sections (MiB)", peaks[big], ""),
            (f"peak RSS of detect predict on a {big}-section volume / on a {small}-section volume of the same "
             "sections", peaks[big] / peaks[small], "[<= 1.1]"),
            (f"peak RSS, {big} sections - {small} sections (MiB; their inputs differ by "
             f"{(big - small) * images[0].nbytes / 2**20:.0f} MiB)", peaks[big] - peaks[small], "")]


def bench_dask(images: np.ndarray, work: Path, image_size: int, depth: int) -> list[Row]:
    """Sections per second of detect predict with 2 dask worker processes and with 1 process, from
    whole commands on ``depth`` and ``2 * depth`` sections: the difference of the two times is the
    segmenting of ``depth`` sections, without start-up (imports, model loading, the cluster)."""
    seconds = {}
    for n in (depth, 2 * depth):
        stack = work / f"dask{n}.tif"
        tifffile.imwrite(stack, np.concatenate([images] * (2 * depth // len(images) + 1))[:n], photometric="minisblack")
        seconds["one", n] = run_detect(stack, work / f"one{n}", image_size)[0]
        seconds["two", n] = run_detect(stack, work / f"two{n}", image_size, "--workers", "2")[0]
    one, two = (depth / (seconds[k, 2 * depth] - seconds[k, depth]) for k in ("one", "two"))
    n = 2 * depth
    same = np.array_equal(tifffile.imread(work / f"one{n}" / f"dask{n}_labels.tif"),
                          tifffile.imread(work / f"two{n}" / f"dask{n}_labels.tif"))
    return [(f"sections per second, 1 process (the last {depth} of {n} sections)", one, ""),
            (f"sections per second, 2 dask workers (the last {depth} of {n} sections)", two, ""),
            ("sections per second with 2 dask workers / with 1 process", two / one, ""),
            (f"2 dask workers wrote the labels of 1 process (1 = yes; {n} sections)", float(same), "[= 1]")]


def rows(quick: bool = False, sections: Path = DEFAULT_SECTIONS, tiny: bool = False) -> list[Row]:
    """Every row, measured in this order; ``tiny`` only checks that the code runs (small crops and
    depths: its figures mean nothing)."""
    size, image_size, small, big = (128, 256, 2, 4) if tiny else (1024, 1024, 16, 64)
    images, labels = real_volume(sections, size)
    out = bench_linking(images, labels, image_size, 1 if tiny else 5)
    with tempfile.TemporaryDirectory() as tmp:
        out += bench_streaming(images, Path(tmp), image_size, small, big)
        out += bench_dask(images, Path(tmp), image_size, 3 if tiny else (8 if quick else 16))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sections for the dask row")
    parser.add_argument("--tiny", action="store_true", help="check that the code runs (figures mean nothing)")
    parser.add_argument("--sections", type=Path, default=DEFAULT_SECTIONS,
                        help="folder of numbered EM sections: images/NN.png + masks/NN.png")
    args = parser.parse_args(argv)
    for name, value, target in rows(args.quick, args.sections, tiny=args.tiny):
        print(f"{name:<100} {value:9.4f} {target}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
