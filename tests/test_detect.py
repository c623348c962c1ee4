"""detect.py: ``detect train`` offline on real EM data (the YOLO dataset export, the split),
``detect predict`` on an image, a TIFF stack and a folder (AMG), the output formats, adapters.

The training run happens in a subprocess whose sockets are blocked and recorded (the
``detector_run`` fixture of conftest.py), so the test proves that ultralytics (imported fresh
there, with a fresh config dir) touched no network; the in-process predict tests block sockets
too. Expected values come from the raw files and from independent code (coco.rle_decode, cv2),
not from the module. Bad input: test_bad_inputs.py; the library functions: test_detector.py,
test_tiles.py, test_inference.py, test_coco.py, test_instances.py, test_figures.py.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from conftest import SMALL
from test_automatic import ADAPTER_WATERSHED, save_decoder_adapter

from samlora.data.coco import rle_decode
from samlora.models.sam import build_model


# ---------------------------------------------------------------------------------------------
# fixtures (detector_run, best_pt, em_whole4, no_network: conftest.py)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack3(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 real slices of the EM test volume, 512x512 (tiled by 384 px tiles)."""
    volume = tifffile.imread(shared_data / "em_vnc_stack" / "testing.tif")
    path = tmp_path_factory.mktemp("stack") / "stack3.tif"
    tifffile.imwrite(path, volume[:3, :512, :512], photometric="minisblack")
    return path


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["detect", "--help"], ["detect", "train", "--help"],
                                  ["detect", "predict", "--help"]])
def test_help(main, argv: list[str]) -> None:
    assert main(argv) == 0


# ---------------------------------------------------------------------------------------------
# detect train: real EM data, offline
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_offline_on_real_em_data(detector_run: dict) -> None:
    assert detector_run["returncode"] == 0, detector_run["output"][-3000:]
    assert detector_run["attempts"] == [], f"ultralytics touched the network: {detector_run['attempts']}"
    run = detector_run["run"]
    data_yaml = run / "yolo_dataset" / "data.yaml"
    assert "train: images/train" in data_yaml.read_text() and "0: object" in data_yaml.read_text()
    assert not (run / "yolo_dataset" / "masks").exists()
    train_images = sorted((run / "yolo_dataset" / "images" / "train").glob("*.png"))
    val_images = sorted((run / "yolo_dataset" / "images" / "val").glob("*.png"))
    assert (len(train_images), len(val_images)) == (12, 4)  # 3 + 1 images of 4 patches each
    assert len(list((run / "yolo_dataset" / "labels" / "val").glob("*.txt"))) == 4
    assert (run / "yolo" / "weights" / "best.pt").is_file()
    assert (detector_run["config"] / "Arial.ttf").is_file()  # the local font, not a download
    for name in ("folds.json", "detect_train.log", "detect_train_config.json"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "val_metrics.json").read_text())
    assert {"precision", "recall", "f1", "tp", "fp", "fn", "by_conf"} <= set(metrics)
    assert metrics["tp"] + metrics["fn"] == sum(
        len(p.read_text().splitlines()) for p in (run / "yolo_dataset" / "labels" / "val").glob("*.txt"))
    assert "validation boxes at IoU 0.5" in detector_run["output"]


@pytest.mark.slow
def test_train_split_has_no_leakage_and_labels_match(detector_run: dict, em_whole4: Path) -> None:
    index = json.loads((detector_run["run"] / "yolo_dataset" / "samples.json").read_text())
    groups = {split: {v["group"] for k, v in index.items() if k.startswith(split)} for split in ("train", "val")}
    assert groups["train"] and groups["val"] and not groups["train"] & groups["val"]
    assert len(groups["val"]) == 1  # one whole section: its 4 patches never sit in training
    # one patch's label file against boxes computed here from the raw mask
    name, entry = next((k, v) for k, v in index.items() if v["objects"] > 0)
    source, _, where = entry["key"].partition("@")
    y, x = (int(v) for v in where.split(":")[0].split(","))
    mask = cv2.imread(str(em_whole4 / "masks" / Path(source).name), cv2.IMREAD_GRAYSCALE)[y:y + 256, x:x + 256]
    _, comps = cv2.connectedComponents((mask > 0).astype(np.uint8), connectivity=8)
    expected = sorted((round((xs.min() + xs.max() + 1) / 512, 4), round((ys.min() + ys.max() + 1) / 512, 4))
                      for v in range(1, comps.max() + 1) for ys, xs in [np.nonzero(comps == v)])
    lines = (detector_run["run"] / "yolo_dataset" / "labels" / f"{name}.txt").read_text().splitlines()
    found = sorted((round(float(line.split()[1]), 4), round(float(line.split()[2]), 4)) for line in lines)
    assert found == expected


# ---------------------------------------------------------------------------------------------
# detect predict
# ---------------------------------------------------------------------------------------------
def check_coco(coco: dict, labels: np.ndarray) -> None:
    """Every annotation decodes to exactly its object in the label map (2-D or ZYX)."""
    stack = labels if labels.ndim == 3 else labels[None]
    assert len(coco["annotations"]) == len(np.unique(stack[stack > 0]))
    frames = {img["id"]: img.get("frame_index", 0) for img in coco["images"]}
    for ann in coco["annotations"]:
        mask = rle_decode(ann["segmentation"])
        expected = stack[frames[ann["image_id"]]] == ann["label"]
        np.testing.assert_array_equal(mask, expected)
        assert ann["area"] == expected.sum()


@pytest.mark.slow
def test_predict_image(best_pt: Path, main, shared_data: Path, tmp_path: Path,
                       no_network: list, caplog: pytest.LogCaptureFixture) -> None:
    image_path = shared_data / "em_vnc" / "images" / "19.png"
    out = tmp_path / "pred"
    argv = ["detect", "predict", "--input", str(image_path), "--output_dir", str(out),
            "--yolo_model", str(best_pt), "--conf", "0.001", *SMALL]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    labels = tifffile.imread(out / "19_labels.tif")
    assert labels.shape == (512, 512) and labels.dtype == np.uint16
    coco = json.loads((out / "coco.json").read_text())
    assert [img["file_name"] for img in coco["images"]] == ["19.png"]
    check_coco(coco, labels)
    if labels.max() == 0:  # a 2-epoch detector may find nothing even at conf 0.001
        assert "no objects found" in caplog.text
    overlay = cv2.imread(str(out / "19_overlay.png"))
    assert overlay.shape == (512, 512, 3)
    assert "19.png" in (out / "detect_predict.log").read_text()
    config = json.loads((out / "detect_predict_config.json").read_text())
    assert config["options"]["imgsz"] == 256  # the detector's training size

    # the same outputs again: refused without --overwrite, replaced with it
    assert main(argv) == 2
    assert main([*argv, "--overwrite", "--coco_segmentation", "polygon"]) == 0
    polygon_coco = json.loads((out / "coco.json").read_text())
    assert all(isinstance(a["segmentation"], list) for a in polygon_coco["annotations"])


@pytest.mark.slow
def test_predict_stack_slice_by_slice(best_pt: Path, main, stack3: Path, tmp_path: Path,
                                      no_network: list) -> None:
    out = tmp_path / "pred"
    argv = ["detect", "predict", "--input", str(stack3), "--output_dir", str(out), "--tile_size", "384",
            "--tile_overlap", "64", "--yolo_model", str(best_pt),
            "--conf", "0.01", "--no_overlay", "--no_link", *SMALL]  # linking: test_stacks.py
    assert main(argv) == 0
    labels = tifffile.imread(out / "stack3_labels.tif")
    assert labels.shape == (3, 512, 512) and labels.dtype == np.uint32  # a stack's ids are known only at its end
    with tifffile.TiffFile(out / "stack3_labels.tif") as tif:
        assert tif.series[0].shape == (3, 512, 512)
    coco = json.loads((out / "coco.json").read_text())
    assert [img["frame_index"] for img in coco["images"]] == [0, 1, 2]
    check_coco(coco, labels)
    # labels are unique across the stack: no value appears in two slices
    per_slice = [set(np.unique(s[s > 0]).tolist()) for s in labels]
    assert sum(len(s) for s in per_slice) == len(set().union(*per_slice))
    assert not (out / "stack3_overlay.png").exists()


@pytest.mark.slow
def test_predict_no_objects_gives_empty_map_and_warning(best_pt: Path, main, stack3: Path,
                                                        tmp_path: Path, no_network: list,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "pred"
    argv = ["detect", "predict", "--input", str(stack3), "--output_dir", str(out), "--conf", "1.0",
            "--yolo_model", str(best_pt), *SMALL]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert "no objects found in stack3.tif" in caplog.text
    labels = tifffile.imread(out / "stack3_labels.tif")
    assert labels.shape == (3, 512, 512) and labels.max() == 0
    assert json.loads((out / "coco.json").read_text())["annotations"] == []


@pytest.mark.slow
def test_predict_amg_on_a_folder(main, em_section_19, tmp_path: Path, no_network: list) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    image = em_section_19[0]
    cv2.imwrite(str(folder / "a.png"), image[:256, :256])
    cv2.imwrite(str(folder / "b.png"), image[256:512, :320])
    out = tmp_path / "amg"
    argv = ["detect", "predict", "--mode", "amg", "--input", str(folder), "--output_dir", str(out),
            "--points_per_side", "4", "--pred_iou_thresh", "0", "--stability_score_thresh", "0", *SMALL]
    assert main(argv) == 0
    assert tifffile.imread(out / "a_labels.tif").shape == (256, 256)
    assert tifffile.imread(out / "b_labels.tif").shape == (256, 320)
    coco = json.loads((out / "coco.json").read_text())
    assert [img["file_name"] for img in coco["images"]] == ["a.png", "b.png"]


@pytest.mark.slow
def test_predict_with_lora_adapter(main, em_section_19, tmp_path: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    """--model_path: the adapter is injected and loaded; an adapter of another type is refused.

    The real vit_t at 256 px: without mark_only_lora_as_trainable every parameter is trainable, so
    the adapter file carries the whole model besides the LoRA tensors and must fit the CLI's."""
    from samlora.models.adapters import save_adapter
    from samlora.models.lora import inject_lora

    sam = build_model("vit_t", None, 256).sam
    inject_lora(sam, 4, 4, "qkv")
    for name, param in sam.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)  # a non-trivial adapter
    adapter = save_adapter(tmp_path / "adapter.pt", sam, {"model_type": "vit_t", "image_size": 256})
    image = tmp_path / "crop.png"
    cv2.imwrite(str(image), em_section_19[0][:256, :256])
    base = ["detect", "predict", "--mode", "amg", "--input", str(image), "--points_per_side", "2",
            "--pred_iou_thresh", "0", "--stability_score_thresh", "0", "--checkpoint", "none", "--device", "cpu"]
    with caplog.at_level(logging.INFO):
        assert main([*base, "--output_dir", str(tmp_path / "a"), "--model_path", str(adapter),
                     "--model_type", "vit_t"]) == 0  # --image_size comes from the adapter
    assert "loaded adapter" in caplog.text
    assert json.loads((tmp_path / "a" / "detect_predict_config.json").read_text())["image_size"] == 256
    caplog.clear()
    assert main([*base, "--output_dir", str(tmp_path / "b"), "--model_path", str(adapter),
                 "--model_type", "vit_b"]) == 2
    assert "an adapter for model_type vit_t" in caplog.text


@pytest.mark.slow
def test_predict_tiles_at_the_training_scale(main, shared_data: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """An adapter trained on 256 px patches: a 512 px image is segmented in 256 px tiles (objects
    at the training scale); a tile size far from it is warned about."""
    from samlora.models.adapters import save_adapter
    from samlora.models.lora import inject_lora

    sam = build_model("vit_t", None, 256).sam
    inject_lora(sam, 2, 2, "qkv")
    adapter = save_adapter(tmp_path / "adapter.pt", sam, {"model_type": "vit_t", "image_size": 256, "patch_size": 256})
    image = tmp_path / "crop.png"
    cv2.imwrite(str(image), cv2.imread(str(shared_data / "em_vnc" / "images" / "19.png"))[:512, :512])
    base = ["detect", "predict", "--mode", "amg", "--input", str(image), "--points_per_side", "2",
            "--checkpoint", "none", "--device", "cpu", "--model_path", str(adapter)]
    with caplog.at_level(logging.INFO):
        assert main([*base, "--output_dir", str(tmp_path / "a")]) == 0
    config = json.loads((tmp_path / "a" / "detect_predict_config.json").read_text())
    assert config["options"]["tile_size"] == 256 and config["training_scale"]["sam_patch"] == 256
    assert "tiles of 256 px" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main([*base, "--output_dir", str(tmp_path / "b"), "--tile_size", "1024"]) == 0
    assert "--tile_size 1024 is 4.0x the 256 px patches" in caplog.text


# ---------------------------------------------------------------------------------------------
# detect predict on a volume: --link_merge (the linker itself: test_volumes.py)
# ---------------------------------------------------------------------------------------------
AMG = ["--mode", "amg", "--points_per_side", "2", "--pred_iou_thresh", "0", "--stability_score_thresh", "0", *SMALL]


@pytest.mark.slow
def test_predict_link_merge_joins_the_pieces_of_split_objects(main, em_crop, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """4 real EM sections, a TEST DOUBLE in place of SAM returning each section's ground-truth 2-D
    components: with --link_merge the labels are those components linked with merge (fewer
    objects: a mitochondrion shown as two pieces stays one), without it the one-to-one linking;
    COCO keeps one annotation per piece, under its 3-D object's label."""
    from samlora.inference import segmenter
    from samlora.inference.linking import link_slices
    from samlora.inference.sections import Scored

    images, truth = em_crop[0][:4], em_crop[1][:4]
    by_pixels = {image.tobytes(): labels for image, labels in zip(images, truth)}

    def ground_truth(self, image: np.ndarray):
        labels = by_pixels[np.ascontiguousarray(image[..., 0]).tobytes()]
        return labels, [Scored(1.0, 1.0)] * int(labels.max())

    monkeypatch.setattr(segmenter.Segmenter, "__call__", ground_truth)
    stack = tmp_path / "s.tif"
    tifffile.imwrite(stack, images, photometric="minisblack")
    for name, extra in (("plain", []), ("merged", ["--link_merge"])):
        assert main(["detect", "predict", "--input", str(stack), "--output_dir", str(tmp_path / name),
                     "--no_overlay", *AMG, *extra]) == 0
    plain, merged = (tifffile.imread(tmp_path / name / "s_labels.tif") for name in ("plain", "merged"))
    np.testing.assert_array_equal(plain, link_slices(truth))
    np.testing.assert_array_equal(merged, link_slices(truth, merge=True))
    assert merged.max() < plain.max()
    coco = json.loads((tmp_path / "merged" / "coco.json").read_text())
    frames = {img["id"]: img["frame_index"] for img in coco["images"]}
    union = np.zeros(merged.shape, bool)
    for ann in coco["annotations"]:
        mask = rle_decode(ann["segmentation"])
        assert (merged[frames[ann["image_id"]]][mask] == ann["label"]).all()
        union[frames[ann["image_id"]]] |= mask
    np.testing.assert_array_equal(union, merged > 0)
    assert len(coco["annotations"]) == sum(int(s.max()) for s in truth)  # one per piece


@pytest.mark.parametrize("other", [["--no_link"], ["--seed_labels", "seeds.tif"]])
def test_predict_link_merge_where_nothing_is_linked_is_refused(main, tmp_path: Path, other: list[str],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    stack = tmp_path / "s.tif"
    tifffile.imwrite(stack, np.zeros((2, 32, 32), np.uint8), photometric="minisblack")
    argv = ["detect", "predict", "--input", str(stack), "--output_dir", str(tmp_path / "out"), "--link_merge",
            *AMG, *other]
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    assert f"--link_merge joins pieces while linking sections, and {other[0]} links none" in caplog.text
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# --mode ais / apg: the instance decoder carried by an adapter
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decoder_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter holding a random instance decoder (test_automatic.save_decoder_adapter)."""
    return save_decoder_adapter(tmp_path_factory.mktemp("ais"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ais", "apg"])
def test_predict_ais_apg_on_an_image_with_maps(mode: str, main, decoder_adapter: Path, em_section_19,
                                               tmp_path: Path, no_network: list) -> None:
    """A 300x400 crop in 256 px tiles: labels and maps at the image's size; the thresholds are
    the adapter's, a flag overrides one."""
    image = tmp_path / "crop.png"
    cv2.imwrite(str(image), em_section_19[0][:300, :400])
    out = tmp_path / mode
    argv = ["detect", "predict", "--mode", mode, "--input", str(image), "--output_dir", str(out),
            "--model_path", str(decoder_adapter), "--write_maps", "--tile_size", "256", "--tile_overlap", "64",
            "--foreground_threshold", "0.4", *SMALL]
    assert main(argv) == 0
    labels = tifffile.imread(out / "crop_labels.tif")
    maps = tifffile.imread(out / "crop_maps.tif")
    assert labels.shape == (300, 400)
    assert maps.shape == (3, 300, 400) and maps.dtype == np.float32 and 0 <= maps.min() and maps.max() <= 1
    coco = json.loads((out / "coco.json").read_text())
    assert len(coco["annotations"]) == len(np.unique(labels[labels > 0]))
    record = json.loads((out / "detect_predict_config.json").read_text())
    assert record["options"]["watershed"] == {**ADAPTER_WATERSHED, "foreground_threshold": 0.4}
    assert record["options"]["mode"] == mode


@pytest.mark.slow
def test_predict_ais_on_a_stack_with_maps(main, decoder_adapter: Path, stack3: Path, tmp_path: Path) -> None:
    """A 3-section stack, section by section: ZxYxX labels and Zx3xHxW maps (axes ZCYX), a
    section's maps those of the same section segmented as a 2-D image (--resume and --workers:
    test_stacks.py)."""
    out = tmp_path / "stack"
    argv = ["detect", "predict", "--mode", "ais", "--input", str(stack3), "--output_dir", str(out),
            "--model_path", str(decoder_adapter), "--write_maps", "--no_overlay", "--tile_size", "0", *SMALL]
    assert main(argv) == 0
    labels = tifffile.imread(out / "stack3_labels.tif")
    maps = tifffile.imread(out / "stack3_maps.tif")
    assert labels.shape == (3, 512, 512) and maps.shape == (3, 3, 512, 512) and maps.dtype == np.float32
    with tifffile.TiffFile(out / "stack3_maps.tif") as tif:
        assert tif.series[0].axes == "ZCYX"
    single = tmp_path / "one.png"
    cv2.imwrite(str(single), tifffile.imread(stack3)[1])
    assert main(["detect", "predict", "--mode", "ais", "--input", str(single), "--output_dir", str(tmp_path / "one"),
                 "--model_path", str(decoder_adapter), "--write_maps", "--tile_size", "0", *SMALL]) == 0
    np.testing.assert_allclose(tifffile.imread(tmp_path / "one" / "one_maps.tif"), maps[1], atol=1e-5)
