"""samlora/inference/automatic.py: the instance decoder's maps (tiles with a halo, stitched before
the watershed), AIS and APG, and the Segmenter's modes ais / apg.

A tiny SAM (conftest.tiny_sam) carries a randomly initialised InstanceDecoder. Where the test
needs maps that do not depend on the tile's context, a stand-in decoder reads them off the image
itself (one pixel -> one pixel), so a tiled run must give exactly the untiled maps, and the
objects of instance_targets drawn across tile seams must come out whole. The command runs
(``detect predict --mode ais / apg``) are in test_detect.py and test_stacks.py.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_sam

from samlora.core.errors import UserError
from samlora.inference import automatic
from samlora.inference.instance_watershed import WatershedOptions, maps_to_instances
from samlora.inference.segmenter import Segmenter, SegmentOptions, decode_instances, encode_image, stability_scores
from samlora.models.instance_decoder import InstanceDecoder, attach
from samlora.training.instance_targets import instance_targets


@pytest.fixture(scope="module")
def ais_sam() -> torch.nn.Module:
    """A 256 px tiny SAM carrying a random InstanceDecoder (finest width 8). Read only."""
    sam = tiny_sam("vit", image_size=256)
    width = encode_image(sam, np.zeros((8, 8, 3), np.uint8)).shape[1]
    torch.manual_seed(0)
    attach(sam, InstanceDecoder(width, 8, 256).eval())
    return sam


ADAPTER_WATERSHED = {"center_distance_threshold": 0.6, "boundary_distance_threshold": 0.55,
                     "foreground_threshold": 0.45, "foreground_smoothing": 0.5, "distance_smoothing": 1.0,
                     "min_size": 3}


def save_decoder_adapter(folder: Path) -> Path:
    """``folder/adapter.pt``: an adapter holding only a random InstanceDecoder (finest width 8)
    for the real vit_t at 256 px, with watershed thresholds in its config (as training records
    them); the command tests (test_detect.py, test_stacks.py) load it through --model_path."""
    from samlora.models.adapters import save_adapter
    from samlora.models.sam import build_model

    sam = build_model("vit_t", None, 256).sam
    sam.requires_grad_(False)
    torch.manual_seed(0)
    attach(sam, InstanceDecoder(256, 8, 256))
    return save_adapter(folder / "adapter.pt", sam,
                        {"model_type": "vit_t", "image_size": 256, "watershed": ADAPTER_WATERSHED})


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A 200x300 RGB image of real EM texture (tests/data, section 19)."""
    import cv2
    from conftest import TEST_DATA

    grey = cv2.imread(str(TEST_DATA / "em_vnc" / "images" / "19.png"), cv2.IMREAD_GRAYSCALE)
    return np.repeat(grey[:200, :300, None], 3, axis=2)


def disks(shape: tuple[int, int], centres: list[tuple[int, int]], radius: int) -> np.ndarray:
    """HxW int32 labels: disk i+1 at ``centres[i]`` (y, x)."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    labels = np.zeros(shape, np.int32)
    for value, (y, x) in enumerate(centres, start=1):
        labels[(yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2] = value
    return labels


def pixel_maps(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Make the decoder a stand-in that reads each pixel's maps off the image (RGB / 255); returns
    the sizes of the images it is given (the tiles)."""
    seen = []

    def fake(sam, image, embedding=None):
        seen.append(image.shape[:2])
        return np.moveaxis(image.astype(np.float32) / 255.0, 2, 0), torch.zeros(1, 1, 1, 1)

    monkeypatch.setattr(automatic, "image_maps", fake)
    return seen


def test_maps_shape_dtype_range(ais_sam, image) -> None:
    maps = automatic.instance_maps(ais_sam, image)
    assert maps.shape == (3, 200, 300) and maps.dtype == np.float32
    assert 0.0 <= maps.min() and maps.max() <= 1.0 and maps.std() > 0


def test_a_model_without_decoder_is_refused(image) -> None:
    with pytest.raises(UserError, match="--instance_decoder"):
        automatic.instance_maps(tiny_sam("vit", image_size=64), image)
    with pytest.raises(UserError, match="decoder_state"):
        automatic.build_segmenter(tiny_sam("vit", image_size=64), SegmentOptions(mode="ais"))
    with pytest.raises(ValueError, match="build_segmenter"):
        Segmenter(tiny_sam("vit", image_size=64), SegmentOptions(mode="apg"))


def test_halo_tiles_partition_the_image_and_keep_a_halo() -> None:
    tiles = automatic.halo_tiles(300, 700, 256, 32)
    cover = np.zeros((300, 700), int)
    for t in tiles:
        (y0, x0, y1, x1), (iy0, ix0, iy1, ix1) = t.window, t.inner
        cover[iy0:iy1, ix0:ix1] += 1
        assert y1 - y0 <= 256 and x1 - x0 <= 256
        for inner, outer, edge in ((iy0, y0, 0), (ix0, x0, 0)):  # a halo wherever a neighbour is
            assert inner == edge or inner - outer >= 32
        for inner, outer, edge in ((iy1, y1, 300), (ix1, x1, 700)):
            assert inner == edge or outer - inner >= 32
    assert (cover == 1).all()
    assert len(automatic.halo_tiles(256, 200, 256, 32)) == 1 and len(automatic.halo_tiles(999, 999, 0, 32)) == 1


def test_tiled_maps_are_each_tiles_own_maps_on_its_inner_part(ais_sam, image) -> None:
    """The stitched maps hold, on each tile's inner part, the maps of that tile (its own SAM
    embedding) to within 1e-4; the tiles reach past the inner parts by the halo."""
    maps, tiles = automatic.tiled_maps(ais_sam, image, tile=128, halo=16)
    assert len(tiles) == 6 and maps.shape == (3, 200, 300)
    for t in tiles:
        (y0, x0, y1, x1), (iy0, ix0, iy1, ix1) = t.window, t.inner
        own, _ = automatic.image_maps(ais_sam, np.ascontiguousarray(image[y0:y1, x0:x1]))
        np.testing.assert_allclose(maps[:, iy0:iy1, ix0:ix1], own[:, iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0], atol=1e-4)


def test_tiles_equal_untiled_and_keep_objects_on_seams_whole(ais_sam, monkeypatch: pytest.MonkeyPatch) -> None:
    """Maps that depend only on their pixel: tiled == untiled exactly, and disks drawn across the
    seams of 128 px tiles are one object each, as in the untiled watershed."""
    seen = pixel_maps(monkeypatch)
    labels = disks((300, 300), [(150, 150), (40, 150), (150, 40), (260, 260), (100, 220)], 22)
    targets = instance_targets(labels, 0)
    picture = np.ascontiguousarray((np.moveaxis(targets, 0, 2) * 255).round().astype(np.uint8))
    untiled = automatic.instance_maps(ais_sam, picture)
    tiled = automatic.instance_maps(ais_sam, picture, tile=128, halo=24)
    assert len(seen) == 1 + len(automatic.halo_tiles(300, 300, 128, 24)) == 1 + 16
    np.testing.assert_allclose(tiled, untiled, atol=1e-6)
    whole = maps_to_instances(untiled, WatershedOptions())
    found = maps_to_instances(tiled, WatershedOptions())
    assert np.array_equal(found, whole) and found.max() == 5
    ids = set()
    for value in range(1, 6):  # each disk is one object (its smoothed rim aside)
        inside = found[labels == value]
        assert len(np.unique(inside[inside > 0])) == 1 and np.mean(inside > 0) > 0.8
        ids.add(int(inside.max()))
    assert len(ids) == 5


def test_ais_instances_number_objects_by_score(ais_sam, monkeypatch: pytest.MonkeyPatch) -> None:
    pixel_maps(monkeypatch)
    labels = disks((160, 160), [(40, 40), (110, 110)], 20)
    picture = np.ascontiguousarray((np.moveaxis(instance_targets(labels, 0), 0, 2) * 255).round().astype(np.uint8))
    picture[..., 0][labels == 2] = 200  # the second disk: lower foreground probability
    out, kept, maps = automatic.ais_instances(ais_sam, picture, tile=96, halo=16)
    assert out.max() == 2 and len(kept) == 2 and kept[0].score > kept[1].score
    assert out[40, 40] == 1 and out[110, 110] == 2
    assert maps.shape == (3, 160, 160)


def test_map_prompts_one_click_per_seed_region() -> None:
    labels = disks((120, 120), [(30, 30), (80, 90)], 15)
    maps = instance_targets(labels, 0)
    prompts = automatic.map_prompts(maps, WatershedOptions())
    assert len(prompts) == 2 and prompts.use_points and not prompts.use_boxes
    assert prompts.points.shape == (2, 1, 2) and (prompts.point_labels == 1).all()
    for (x, y) in prompts.points[:, 0]:
        assert labels[int(y), int(x)] > 0
    assert {labels[int(y), int(x)] for x, y in prompts.points[:, 0]} == {1, 2}
    maps[0] = 0.0  # no foreground: no prompts
    assert len(automatic.map_prompts(maps)) == 0


def test_apg_decodes_the_clicks_and_filters_them(ais_sam, image, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = disks((200, 300), [(50, 50), (150, 250), (100, 140)], 18)
    maps = instance_targets(labels, 0)
    real = automatic.image_maps

    def decoder_maps(sam, tile, embedding=None):  # SAM's embedding, chosen maps
        _, embedding = real(sam, tile, embedding)
        return maps[:, :tile.shape[0], :tile.shape[1]], embedding

    monkeypatch.setattr(automatic, "image_maps", decoder_maps)
    out, kept, got = automatic.apg_instances(ais_sam, image, chunk=2)
    assert out.shape == (200, 300) and out.dtype == np.int32 and got.shape == (3, 200, 300)
    assert 1 <= len(kept) <= 3 and out.max() == len(kept)
    assert [k.score for k in kept] == sorted((k.score for k in kept), reverse=True)
    none, kept_none, _ = automatic.apg_instances(ais_sam, image, min_score=1.01)
    assert kept_none == [] and none.max() == 0


def test_decode_instances_filters_by_score_and_stability(ais_sam, image) -> None:
    from samlora.data.prompts import Prompts

    embedding = encode_image(ais_sam, image)
    points = np.array([[[40, 40]], [[150, 100]], [[250, 160]]], np.float32)
    prompts = Prompts(np.arange(1, 4, dtype=np.int32), np.zeros((3, 4), np.float32), points,
                      np.ones((3, 1), np.int32), use_boxes=False, use_points=True)
    every = decode_instances(ais_sam, embedding, prompts, image.shape[:2], chunk=2)
    assert decode_instances(ais_sam, embedding, prompts, image.shape[:2], min_score=1.01) == []
    assert len(decode_instances(ais_sam, embedding, prompts, image.shape[:2], min_stability=1.01)) == 0
    assert len(decode_instances(ais_sam, embedding, prompts, image.shape[:2], min_stability=1e-9)) <= len(every)
    logits = torch.tensor([[[[2.0, 0.5, -0.5, -2.0]]]])
    assert stability_scores(logits).item() == pytest.approx(1 / 3)  # > 1: one pixel; > -1: three


def test_segmenter_modes_ais_apg_and_maps(ais_sam, image) -> None:
    for mode in ("ais", "apg"):
        options = SegmentOptions(mode=mode, tile_size=128, tile_overlap=32, min_area=0, write_maps=True,
                                 watershed=WatershedOptions(center_distance_threshold=0.6))
        segmenter = automatic.build_segmenter(copy.deepcopy(ais_sam), options)
        assert isinstance(segmenter, automatic.DecoderSegmenter)
        labels, kept, maps = segmenter.segment(image)
        assert labels.shape == (200, 300) and maps.shape == (3, 200, 300)
        assert labels.max() == len(kept)
        again = segmenter(image)
        assert np.array_equal(again[0], labels)
    assert SegmentOptions(mode="apg").pred_iou_thresh == 0.0 and SegmentOptions(mode="amg").pred_iou_thresh == 0.88


@pytest.mark.parametrize("mode", ["yolo", "amg"])
def test_write_maps_needs_a_decoder_mode(mode: str) -> None:
    with pytest.raises(UserError, match="--write_maps"):
        SegmentOptions(mode=mode, write_maps=True)
