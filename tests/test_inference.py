"""inference.py: segmenting with box prompts, decoding against predict, the tiled Segmenter
(the tiny SAM of conftest.py at 256 px, real EM section 19)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from samlora.data.instances import Instance, instance_from_mask
from samlora.data.prompts import box_prompts, label_boxes
from samlora.inference import segmenter as inference
from samlora.inference.segmenter import Segmenter, SegmentOptions
from samlora.inference.tiles import tile_windows
from samlora.metrics.scores import instance_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def test_segment_with_ground_truth_boxes(em_section_19, tiny_sam_256: torch.nn.Module) -> None:
    image, gt = em_section_19
    boxes = label_boxes(gt)[1]
    labels = inference.segment(tiny_sam_256, image, box_prompts(boxes), 4, keep_ids=False,
                               confidences=np.ones(len(boxes)))
    assert labels.shape == gt.shape and labels.dtype == np.int32
    values = np.unique(labels[labels > 0])
    assert 0 < values.size <= len(boxes)
    np.testing.assert_array_equal(values, np.arange(1, values.size + 1))  # consecutive
    assert inference.segment(tiny_sam_256, image, box_prompts(np.zeros((0, 4)))).max() == 0


@pytest.mark.parametrize("shape", [(256, 256), (200, 256), (300, 180)])
def test_decode_boxes_gives_the_masks_of_predict(tiny_sam_256: torch.nn.Module, shape: tuple) -> None:
    """decode_instances post-processes the decoder's logits itself (skipping an identity resize):
    masks and scores must be those of predict, whatever the image's size."""
    from samlora.inference.segmenter import predict

    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    boxes = np.array([[10, 10, 100, 120], [50, 20, 150, 90], [0, 0, shape[1], shape[0]]], np.float32)
    embedding = inference.encode_image(tiny_sam_256, image)
    found = inference.decode_instances(tiny_sam_256, embedding, box_prompts(boxes), image.shape[:2], 32,
                                       np.array([0.9, 0.5, 0.2]), keep_ids=False)
    masks, scores, _ = predict(tiny_sam_256, image, boxes=boxes, image_embedding=embedding)
    expected = [instance_from_mask(m, s, c) for m, s, c in zip(masks, scores, [0.9, 0.5, 0.2])]
    expected = [e for e in expected if e is not None]
    assert len(found) == len(expected)
    for a, b in zip(found, expected):
        assert (a.window, a.score, a.confidence) == (b.window, b.score, b.confidence)
        np.testing.assert_array_equal(a.mask, b.mask)


def test_segmenter_tiles_and_merges(em_section_19, tiny_sam_256: torch.nn.Module,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiled pipeline with a stand-in per-tile segmenter that returns ground-truth crops."""
    image, gt = em_section_19

    def gt_tile(self, tile):  # find the tile in the image: windows are unique here
        (y0, x0) = next((y, x) for y, x, y1, x1 in tile_windows(*gt.shape, 512, 128)
                        if np.array_equal(image[y:y1, x:x1], tile))
        crop = gt[y0:y0 + tile.shape[0], x0:x0 + tile.shape[1]]
        out = []
        for value in np.unique(crop[crop > 0]):
            ys, xs = np.nonzero(crop == value)
            box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            out.append(Instance(box, crop[box[1]:box[3], box[0]:box[2]] == value, 0.9, 0.9))
        return out

    monkeypatch.setattr(Segmenter, "tile_instances", gt_tile)
    segmenter = Segmenter(tiny_sam_256, SegmentOptions(tile_size=512, tile_overlap=128, min_area=0),
                          propose=object())
    labels, kept = segmenter(image)
    assert len(kept) == labels.max() == gt.max()
    assert instance_metrics(gt, labels)["f1"] == 1.0


def test_training_point_prompts_are_decoded_as_round_one_trains_them(em_section_19, tiny_sam_256: torch.nn.Module,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """--prompt point samples one positive and 0..k negative points per object: a single click
    (no negative) takes the best of three masks in training's first round (iterative.py), so
    inference does too; with a negative point it takes the single mask, in both."""
    from samlora.data.prompts import sample_prompts
    from samlora.models import sam

    image, gt = em_section_19
    asked, decode = [], sam.decode

    def spy(*args, multimask_output: bool = False, **kwargs):
        asked.append(multimask_output)
        return decode(*args, multimask_output=multimask_output, **kwargs)

    monkeypatch.setattr(inference.sam_model, "decode", spy)
    embedding = inference.encode_image(tiny_sam_256, image)
    cases = {}
    for seed in range(10):
        prompts = sample_prompts(gt, np.random.default_rng(seed), "point", num_points=1, max_objects=3)
        cases.setdefault(prompts.point_labels.shape[1], prompts)
    assert cases[1].point_labels.tolist() == [[1]] * 3 and cases[2].point_labels.tolist() == [[1, 0]] * 3
    for width, single in ((1, True), (2, False)):
        asked.clear()
        inference.decode_instances(tiny_sam_256, embedding, cases[width], image.shape[:2])
        tensors = sam.make_prompts(image.shape[:2], 256, points=cases[width].points,
                                     point_labels=cases[width].point_labels)
        assert asked == [single] and tensors.single_click() == single
