"""propagation.py: annotated objects carried up and down a real EM volume.

The control flow (which prompt reaches which section, when an object stops, which sweep a section
keeps) is checked with a TEST DOUBLE in place of SAM: ``TruthPrompter`` returns, for each box, the
ground-truth object (3-D connected components of the real mitochondria masks) with most pixels
under that box, with the predicted IoU it is told to give. The expected result is written here as
a plain loop over sections. The real model runs in the slow test at the end (random weights): it
must complete and write consistent files.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import SMALL
from scipy import ndimage

from samlora.core import runfiles
from samlora.data.instances import Instance, instance_from_mask
from samlora.data.prompts import Prompts
from samlora.data.volume_io import open_volume
from samlora.inference.linking import IN_PLANE_AND_FACE
from samlora.inference.propagation import PropagationOptions, carry_prompts, propagate
from samlora.inference.sections import SectionStore


@pytest.fixture(scope="module")
def em_stack_file(em_crop, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The 20 real EM sections (256x256 crops, conftest.py) as a TIFF stack, and their
    ground-truth 3-D objects (connected components of the mitochondria)."""
    images, labels = em_crop
    path = tmp_path_factory.mktemp("volume") / "em.tif"
    tifffile.imwrite(path, images, photometric="minisblack")
    return path, ndimage.label(labels > 0, IN_PLANE_AND_FACE, output=np.int32)[0]


class TruthPrompter:
    """TEST DOUBLE for SAM: per box, the ground-truth object with most pixels under the box (its
    whole mask in that section), labelled with the prompt's id; ``scores[(z, id)]`` overrides the
    predicted IoU (default 1). Records every prompt: (section, id, box, mask input given)."""

    def __init__(self, path: Path, objects: np.ndarray, scores: dict[tuple[int, int], float] | None = None) -> None:
        with open_volume(path) as volume:
            self.section_of = {volume.section(z).tobytes(): z for z in range(volume.shape[0])}
        self.objects, self.scores, self.calls = objects, scores or {}, []

    def __call__(self, image: np.ndarray, prompts: Prompts) -> list[Instance]:
        z = self.section_of[image.tobytes()]
        found = []
        for object_id, box, mask_input in zip(prompts.object_ids, prompts.boxes, prompts.mask_inputs):
            self.calls.append((z, int(object_id), tuple(int(v) for v in box), mask_input.shape))
            x0, y0, x1, y1 = (int(v) for v in box)
            under = self.objects[z, y0:y1 + 1, x0:x1 + 1]
            if under.any():
                truth = int(np.bincount(under[under > 0]).argmax())
                score = self.scores.get((z, int(object_id)), 1.0)
                found.append(instance_from_mask(self.objects[z] == truth, score, score, int(object_id)))
        return found


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def expected_carry(objects: np.ndarray, seed: int, z0: int, step: int, stop_iou: float,
                   low: dict[tuple[int, int], float] = {}) -> dict[int, np.ndarray]:
    """Where the double takes object ``seed`` annotated at ``z0`` going ``step`` (+1 / -1): a
    plain loop over sections, with the rule of the module docstring."""
    masks, previous, z = {z0: objects[z0] == seed}, objects[z0] == seed, z0 + step
    while 0 <= z < len(objects):
        x0, y0, x1, y1 = box_of(previous)
        under = objects[z, y0:y1 + 1, x0:x1 + 1]
        if not under.any():
            break
        mask = objects[z] == np.bincount(under[under > 0]).argmax()
        if low.get((z, seed), 1.0) < 0.5 or (mask & previous).sum() / (mask | previous).sum() < stop_iou:
            break
        masks[z], previous, z = mask, mask, z + step
    return masks


def run(path: Path, seeds: dict[int, np.ndarray], prompter, tmp_path: Path,
        options: PropagationOptions = PropagationOptions()) -> tuple[np.ndarray, SectionStore]:
    out = runfiles.OutputDir(tmp_path / "out", "detect predict").claim(False)
    store = SectionStore(tmp_path / "out" / "store", {"input": str(path)})
    store.open(False, out)
    with open_volume(path) as volume:
        propagate(volume, seeds, prompter, options, store, image_size=256)
        return np.stack([store.load(z).labels for z in range(volume.shape[0])]), store


def test_annotated_objects_are_carried_up_and_down(em_stack_file, tmp_path: Path) -> None:
    path, objects = em_stack_file
    seeds = {10: objects[10].copy()}
    double = TruthPrompter(path, objects)
    labels, _ = run(path, seeds, double, tmp_path)
    annotated = [int(v) for v in np.unique(objects[10]) if v]
    assert len(annotated) >= 4
    expected = np.zeros_like(labels)
    for seed in annotated:
        for step in (1, -1):
            for z, mask in expected_carry(objects, seed, 10, step, 0.25).items():
                expected[z][mask] = seed
    np.testing.assert_array_equal(labels, expected)
    # each annotated object comes back as its 3-D object, over the run of sections around the
    # annotation in which consecutive sections of it overlap with IoU >= 0.25 (--stop_iou)
    for seed in annotated:
        mine = objects == seed
        run_of = {10}
        for step in (1, -1):
            z = 10
            while 0 <= z + step < len(objects) and (mine[z] & mine[z + step]).sum() >= 0.25 * (mine[z] | mine[z + step]).sum():
                z += step
                run_of.add(z)
        np.testing.assert_array_equal(labels == seed, mine & np.isin(np.arange(len(objects)), sorted(run_of))[:, None, None])
    assert sum(np.array_equal(labels == s, objects == s) for s in annotated) >= 2  # whole, from first to last section
    # every prompt is the box of the object's mask in the section before (up) or after (down) it
    for z, seed, box, mask_shape in double.calls:
        assert mask_shape == (64, 64)
        neighbours = [box_of(labels[n] == seed) for n in (z - 1, z + 1) if 0 <= n < len(labels) and (labels[n] == seed).any()]
        assert box in neighbours, (z, seed)
    # no object is prompted two sections past the end of its trail
    for seed in annotated:
        reached = np.flatnonzero((labels == seed).any(axis=(1, 2)))
        prompted = {z for z, s, _, _ in double.calls if s == seed}
        assert prompted <= set(range(reached.min() - 1, reached.max() + 2))


def test_a_low_predicted_iou_stops_an_object(em_stack_file, tmp_path: Path) -> None:
    path, objects = em_stack_file
    seed = int(np.bincount(objects[10][objects[10] > 0]).argmax())  # the largest object in section 10
    reached = expected_carry(objects, seed, 10, 1, 0.25)
    assert max(reached) >= 12
    low = {(12, seed): 0.3}
    labels, _ = run(path, {10: np.where(objects[10] == seed, seed, 0)}, TruthPrompter(path, objects, low), tmp_path)
    assert (labels[11] == seed).any() and not (labels[12:] == seed).any()
    assert sorted(np.flatnonzero((labels == seed).any(axis=(1, 2)))) == \
        sorted(set(expected_carry(objects, seed, 10, -1, 0.25)) | {11})


def test_between_two_annotations_the_nearer_one_wins(em_stack_file, tmp_path: Path) -> None:
    path, objects = em_stack_file
    seed = next(s for s in np.unique(objects[objects > 0]).tolist()
                if len(np.flatnonzero((objects == s).any(axis=(1, 2)))) >= 8)
    zs = np.flatnonzero((objects == seed).any(axis=(1, 2)))
    first, last = int(zs[0]), int(zs[-1])
    seeds = {first: np.where(objects[first] == seed, seed, 0), last: np.where(objects[last] == seed, seed, 0)}
    labels, store = run(path, seeds, TruthPrompter(path, objects), tmp_path, PropagationOptions(stop_iou=0.0))
    for z in range(first, last + 1):
        result = store.load(z)
        assert result.values.tolist() == [seed]
        assert result.distances.tolist() == [min(z - first, last - z)]  # from the nearer annotation
    np.testing.assert_array_equal(labels[first:last + 1] == seed, objects[first:last + 1] == seed)


def test_carry_prompts_are_boxes_and_low_resolution_masks() -> None:
    mask = np.zeros((40, 60), bool)
    mask[5:10, 20:31] = True
    prompts = carry_prompts({7: instance_from_mask(mask, 1.0, 1.0, 7)}, mask.shape, image_size=256)
    assert prompts.object_ids.tolist() == [7] and prompts.boxes.tolist() == [[20, 5, 30, 9]]
    assert prompts.mask_inputs.shape == (1, 64, 64)
    logits = prompts.mask_inputs[0]
    assert logits[int(7 * 64 / 60), int(25 * 64 / 60)] > 5 and logits[30, 30] < -5  # inside / outside


def test_seed_files_are_read_section_by_section(em_stack_file, tmp_path: Path) -> None:
    """volume_io.read_seeds: a label stack (TIFF or Zarr) gives its annotated sections, one label
    image the section it is said to annotate."""
    import zarr

    from samlora.data.volume_io import read_seeds

    _, objects = em_stack_file
    stack = np.zeros_like(objects, dtype=np.uint16)
    stack[[3, 12]] = objects[[3, 12]]
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    zarr.create_array(store=str(tmp_path / "stack.zarr"), shape=stack.shape, chunks=(4, 128, 128), dtype="uint16")[:] = stack
    tifffile.imwrite(tmp_path / "one.tif", objects[7].astype(np.uint16), photometric="minisblack")
    for name in ("stack.tif", "stack.zarr"):
        found = read_seeds(tmp_path / name, objects.shape)
        assert sorted(found) == [3, 12], name
        np.testing.assert_array_equal(found[12], objects[12])
    found = read_seeds(tmp_path / "one.tif", objects.shape, section=7)
    assert list(found) == [7] and found[7].dtype == np.int64
    np.testing.assert_array_equal(found[7], objects[7])


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="--stop_iou"):
        PropagationOptions(stop_iou=1.5)


@pytest.mark.slow
def test_seed_labels_with_random_weights(main, em_stack_file, tmp_path: Path) -> None:
    """The real model path: --seed_labels on a 3-section stack completes; the annotated section
    keeps its annotation, every object id is an annotated one, COCO matches the labels."""
    path, objects = em_stack_file
    small = tmp_path / "s.tif"
    tifffile.imwrite(small, tifffile.imread(path)[8:11], photometric="minisblack")
    seeds = np.zeros((3, 256, 256), np.uint16)
    seeds[1] = objects[9]
    tifffile.imwrite(tmp_path / "seeds.tif", seeds, photometric="minisblack")
    out = tmp_path / "out"
    assert main(["detect", "predict", "--input", str(small), "--seed_labels", str(tmp_path / "seeds.tif"),
                 "--output_dir", str(out), "--stop_score", "0", "--stop_iou", "0", *SMALL]) == 0
    labels = tifffile.imread(out / "s_labels.tif")
    assert labels.shape == (3, 256, 256)
    np.testing.assert_array_equal(labels[1], objects[9])
    assert set(np.unique(labels).tolist()) <= set(np.unique(objects[9]).tolist())
    coco = json.loads((out / "coco.json").read_text())
    assert len(coco["annotations"]) == sum(len(np.unique(s[s > 0])) for s in labels)


def test_detected_objects_join_the_seeds(em_stack_file) -> None:
    """add_detected: in an annotated section, the objects a detector finds (here: a TEST DOUBLE
    returning every true object of the section) that no annotation covers become new seeds."""
    from samlora.inference.propagation import add_detected

    path, objects = em_stack_file
    present = [int(v) for v in np.unique(objects[10]) if v]
    annotated = np.where(objects[10] == present[0], 50, 0)  # one object annotated, with id 50

    def detector_and_sam(image: np.ndarray):
        return objects[10], []

    with open_volume(path) as volume:
        seeds = add_detected(volume, {10: annotated}, detector_and_sam)
    assert list(seeds) == [10]
    assert np.array_equal(seeds[10] == 50, objects[10] == present[0])  # the annotation stays as it was
    others = {int(v) for v in np.unique(seeds[10]) if v not in (0, 50)}
    assert others == set(range(51, 51 + len(present) - 1))  # every other object, a new id after the annotated
    for value in others:
        assert len(np.unique(objects[10][seeds[10] == value])) == 1
