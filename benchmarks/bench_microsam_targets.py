"""Our AIS targets, watershed and mSA against torch_em's / elf's, on real labels, in micro-sam's env.

Run with the separate micro-sam environment (``benchmarks/microsam_env.sh``; micro-sam, torch_em and
elf are no dependencies of ours)::

    MICROSAM_ENV/bin/python benchmarks/bench_microsam_targets.py --data_dir tests/data

On the real labels (EM mitochondria sections ``em_vnc/masks/*.png`` as 8-connected components,
the H&E nuclei label images ``nuclei_cpm15/*/label masks/*.tif``) it prints as JSON, per data set:

* ``targets``: the largest absolute difference of :func:`instance_targets.instance_targets`
  (``min_size`` 25, micro-sam's) from torch_em's ``PerObjectDistanceTransform`` with micro-sam's
  settings, per channel, and whether the label channels agree;
* ``watershed``: :func:`instance_watershed.maps_to_instances` against micro-sam's
  post-processing (its foreground smoothing, then torch_em's
  ``watershed_from_center_and_boundary_distances``) on the targets blurred and with noise (maps a
  decoder might give): the share of pixels whose objects differ, and elf's mSA of ours against theirs;
* ``msa``: :func:`accuracy.mean_segmentation_accuracy` against elf's
  ``mean_segmentation_accuracy`` on the labels against eroded / shifted / partly dropped copies
  of them (largest absolute difference over all pairs).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import imageio.v3 as imageio
import numpy as np
from scipy import ndimage

log = logging.getLogger("bench_microsam_targets")


def load_labels(data_dir: Path, limit: int) -> dict[str, list[np.ndarray]]:
    """{data set: [HxW int labels]} of the real EM and nuclei labels."""
    em = [ndimage.label(imageio.imread(p) > 0, structure=np.ones((3, 3)))[0]
          for p in sorted((data_dir / "em_vnc" / "masks").glob("*.png"))[:limit]]
    nuclei = [np.asarray(imageio.imread(p)).astype(np.int64)
              for p in sorted(data_dir.glob("nuclei_cpm15/*/label masks/*.tif"))[:limit]]
    return {"em_vnc": em, "nuclei_cpm15": nuclei}


def compare_targets(labels: list[np.ndarray]) -> dict:
    """Max abs differences of our targets from torch_em's, per channel."""
    from torch_em.transform.label import PerObjectDistanceTransform

    from samlora.training import instance_targets

    theirs_fn = PerObjectDistanceTransform(distances=True, boundary_distances=True, directed_distances=False,
                                           foreground=True, instances=True, min_size=25)
    diffs, same_labels = np.zeros(3), True
    for lab in labels:
        theirs = theirs_fn(lab)
        ours = instance_targets.instance_targets(lab, min_size=25)
        diffs = np.maximum(diffs, np.abs(ours - theirs[1:]).reshape(3, -1).max(axis=1))
        same_labels &= bool(np.array_equal(instance_targets.prepare_labels(lab, 25), theirs[0]))
    return {"max_abs_diff": dict(zip(instance_targets.TARGET_NAMES, diffs.tolist())), "labels_equal": same_labels}


def noisy_maps(targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Targets blurred (sigma 2) with Gaussian noise (std 0.05), clipped to [0, 1]: decoder-like maps."""
    blurred = np.stack([ndimage.gaussian_filter(t, 2.0) for t in targets])
    return np.clip(blurred + rng.normal(0, 0.05, blurred.shape), 0, 1).astype(np.float32)


def micro_sam_postprocessing(maps: np.ndarray) -> np.ndarray:
    """micro-sam's ``InstanceSegmentationWithDecoder.generate`` with its defaults, on given maps."""
    from micro_sam.instance_segmentation import _apply_smoothing
    from torch_em.util.segmentation import watershed_from_center_and_boundary_distances

    foreground = _apply_smoothing(maps[0], 1.0, None, None)
    return watershed_from_center_and_boundary_distances(maps[1], maps[2], foreground)


def compare_watershed(labels: list[np.ndarray], seed: int) -> dict:
    """Our watershed against micro-sam's on decoder-like maps of real labels."""
    from elf.evaluation import mean_segmentation_accuracy as elf_msa

    from samlora.inference import instance_watershed
    from samlora.metrics.overlaps import max_iou_matching, overlap_table
    from samlora.training import instance_targets

    rng = np.random.default_rng(seed)
    differing, msas, gt_msa = [], [], []
    for lab in labels:
        maps = noisy_maps(instance_targets.instance_targets(lab, min_size=25), rng)
        ours = instance_watershed.maps_to_instances(maps)
        theirs = micro_sam_postprocessing(maps).astype(np.int64)
        table = overlap_table(theirs, ours)
        chosen = max_iou_matching(table.pair_a, table.pair_b, table.iou, len(table.area_a), len(table.area_b))
        agreeing = int(table.inter[chosen].sum()) + int(np.count_nonzero((ours == 0) & (theirs == 0)))
        differing.append(1.0 - agreeing / lab.size)
        msas.append(float(elf_msa(ours, theirs)))
        gt_msa.append((float(elf_msa(ours, lab)), float(elf_msa(theirs, lab))))
    return {"share_of_pixels_differing_max": max(differing),
            "share_of_pixels_differing_mean": float(np.mean(differing)),
            "msa_ours_vs_theirs_min": min(msas), "msa_vs_gt_ours_theirs_mean": np.mean(gt_msa, axis=0).tolist()}


def perturbed(lab: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Predictions of varying quality made from labels: eroded, shifted, some objects dropped."""
    eroded = np.where(ndimage.grey_erosion(lab, size=(5, 5)) == lab, lab, 0)
    shifted = np.roll(lab, (3, -2), axis=(0, 1))
    ids = np.unique(lab[lab > 0])
    dropped = np.where(np.isin(lab, rng.choice(ids, len(ids) // 3, replace=False)), 0, lab) if len(ids) else lab
    dilated = ndimage.grey_dilation(lab, size=(7, 7))
    return [lab, eroded, shifted, dropped, dilated, np.zeros_like(lab)]


def compare_msa(labels: list[np.ndarray], seed: int) -> dict:
    """Max abs difference of our mSA from elf's."""
    from elf.evaluation import mean_segmentation_accuracy as elf_msa

    from samlora.metrics import accuracy

    rng = np.random.default_rng(seed)
    worst, pairs = 0.0, 0
    for lab in labels:
        for pred in perturbed(lab, rng):
            worst = max(worst, abs(accuracy.mean_segmentation_accuracy(lab, pred) - float(elf_msa(pred, lab))))
            pairs += 1
    both_empty = (accuracy.mean_segmentation_accuracy(np.zeros((8, 8), int), np.zeros((8, 8), int)),
                  float(elf_msa(np.zeros((8, 8), int), np.zeros((8, 8), int))))
    return {"max_abs_diff": worst, "pairs": pairs, "both_empty_ours_elf": both_empty}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_dir", type=Path, required=True, help="the shared data folder (README there)")
    parser.add_argument("--limit", type=int, default=20, help="label images per data set")
    parser.add_argument("--only", nargs="+", default=["targets", "watershed", "msa"],
                        choices=["targets", "watershed", "msa"], help="which comparisons")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and the dropped objects")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.simplefilter("ignore")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: samlora
    result: dict = {}
    for name, labels in load_labels(args.data_dir, args.limit).items():
        result[name] = {"images": len(labels)}
        if "targets" in args.only:
            result[name]["targets"] = compare_targets(labels)
        if "watershed" in args.only:
            result[name]["watershed"] = compare_watershed(labels, args.seed)
        if "msa" in args.only:
            result[name]["msa"] = compare_msa(labels, args.seed)
    log.info(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
