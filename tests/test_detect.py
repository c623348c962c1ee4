"""detect.py / yolo_sam.py: YOLO dataset export, offline YOLOv8 training on real EM data, predict
on an image and a TIFF stack, AMG, the output formats, and bad input.

The training run happens in a subprocess whose sockets are blocked and recorded, so the test
proves that ultralytics (imported fresh there, with a fresh config dir) touched no network; the
in-process predict tests block sockets too. Expected values come from the raw files and from
independent code (dataset.rle_decode, metrics.instance_metrics, cv2), not from the module.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch

import main as main_module
import inference
from coco import polygons, rle_decode, rle_encode
from detector import box_iou, load_yolo, match_boxes, yolo_boxes, yolo_label_lines
from figures import label_edges
from inference import Segmenter, SegmentOptions
from instances import Instance, box_baseline, instance_from_mask, paint_instances
from metrics import instance_metrics
from model import build_model
from prompts import box_prompts, label_boxes
from tiles import merge_tiles, tile_starts, tile_windows

REPO = Path(__file__).resolve().parents[1]
EM_IMAGES = ("00.png", "05.png", "10.png", "15.png")  # 4 of the 20 sections: 3 train, 1 val image
TRAIN_ARGS = ["--data_format", "folders", "--patch_size", "256", "--val_fraction", "0.25",
              "--epochs", "2", "--imgsz", "256", "--batch_size", "8", "--num_workers", "0",
              "--device", "cpu", "--no_plots", "--seed", "0"]
SAM_ARGS = ["--checkpoint", "none", "--image_size", "256", "--model_type", "vit_t", "--device", "cpu"]

# Runs `main.py detect ...` with every socket blocked; the attempts go to $NET_LOG as JSON.
GUARDED_RUNNER = '''
import json, os, socket, sys
attempts = []
def blocked(name, original=None):
    def call(*args, **kwargs):
        if original is not None and isinstance(args[0], socket.socket) and args[0].family == socket.AF_UNIX:
            return original(*args, **kwargs)
        attempts.append([name, repr(args[1:2])])
        raise OSError("network blocked by the test: " + name)
    return call
socket.socket.connect = blocked("connect", socket.socket.connect)
socket.socket.connect_ex = blocked("connect_ex", socket.socket.connect_ex)
socket.create_connection = blocked("create_connection")
socket.getaddrinfo = blocked("getaddrinfo")
sys.path.insert(0, os.environ["REPO"])
import main
try:
    code = main.main(sys.argv[1:])
finally:
    with open(os.environ["NET_LOG"], "w") as fh:
        json.dump(attempts, fh)
sys.exit(code)
'''


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def yolo_config_dir(tmp_path_factory: pytest.TempPathFactory):
    """ultralytics' settings and font go to a temporary folder, not the user's config."""
    path = tmp_path_factory.mktemp("ultralytics_config")
    old = os.environ.get("YOLO_CONFIG_DIR")
    os.environ["YOLO_CONFIG_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("YOLO_CONFIG_DIR", None)
    else:
        os.environ["YOLO_CONFIG_DIR"] = old


@pytest.fixture
def detect_main(monkeypatch: pytest.MonkeyPatch):
    """``main.main`` with the detect command registered (main.py lists it once merged)."""
    return main_module.main


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch):
    """Block and record every network call made in this process during the test."""
    attempts: list[str] = []

    def blocked(name: str):
        def call(*args, **kwargs):
            attempts.append(name)
            raise OSError(f"network blocked by the test: {name}")
        return call

    original_connect = socket.socket.connect

    def connect(sock: socket.socket, address):
        if sock.family == socket.AF_UNIX:
            return original_connect(sock, address)
        return blocked("connect")(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", blocked("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", blocked("getaddrinfo"))
    yield attempts
    assert attempts == [], f"network was touched: {attempts}"


@pytest.fixture(scope="module")
def em_subset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 real EM sections with their mitochondria masks, images/ + masks/."""
    root = tmp_path_factory.mktemp("em_subset")
    for sub in ("images", "masks"):
        (root / sub).mkdir()
        for name in EM_IMAGES:
            shutil.copy(shared_data / "em_vnc" / sub / name, root / sub / name)
    return root


@pytest.fixture(scope="module")
def trained(em_subset: Path, yolo_config_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``detect train`` for 2 epochs on 256 px patches, in a subprocess without network."""
    out = tmp_path_factory.mktemp("detect_train")
    config = tmp_path_factory.mktemp("fresh_ultralytics_config")  # nothing cached from this process
    runner, net_log = out.parent / "guarded_runner.py", out.parent / "net_attempts.json"
    runner.write_text(GUARDED_RUNNER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "ULTRALYTICS_"))}
    env.update(REPO=str(REPO), NET_LOG=str(net_log), YOLO_CONFIG_DIR=str(config))
    cmd = [sys.executable, str(runner), "detect", "train", "--data_dir", str(em_subset),
           "--output_dir", str(out / "run"), *TRAIN_ARGS]
    proc = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=600)
    return {"returncode": proc.returncode, "output": proc.stdout + proc.stderr, "run": out / "run",
            "attempts": json.loads(net_log.read_text()) if net_log.exists() else None,
            "config": config / "Ultralytics"}


@pytest.fixture(scope="module")
def best_pt(trained: dict) -> Path:
    """The trained detector's weights (fails, with the run's output, when training failed)."""
    if trained["returncode"] != 0:
        pytest.fail(f"detect train failed:\n{trained['output'][-3000:]}")
    return trained["run"] / "yolo" / "weights" / "best.pt"


@pytest.fixture(scope="module")
def stack3(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 real slices of the EM test volume, cropped to 640x640 (tiled by 512 px tiles)."""
    volume = tifffile.imread(shared_data / "em_vnc_stack" / "testing.tif")
    path = tmp_path_factory.mktemp("stack") / "stack3.tif"
    tifffile.imwrite(path, volume[:3, :640, :640], photometric="minisblack")
    return path


@pytest.fixture(scope="module")
def tiny_sam() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("vit_t", None, 256)


def em_labels(shared_data: Path, name: str = "19.png") -> tuple[np.ndarray, np.ndarray]:
    image = cv2.cvtColor(cv2.imread(str(shared_data / "em_vnc" / "images" / name)), cv2.COLOR_BGR2RGB)
    mask = cv2.imread(str(shared_data / "em_vnc" / "masks" / name), cv2.IMREAD_GRAYSCALE)
    _, labels = cv2.connectedComponents((mask > 0).astype(np.uint8), connectivity=8)
    return image, labels.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["detect", "--help"], ["detect", "train", "--help"],
                                  ["detect", "predict", "--help"]])
def test_help(detect_main, argv: list[str]) -> None:
    assert detect_main(argv) == 0


# ---------------------------------------------------------------------------------------------
# boxes, matching, tiles, painting (pure numpy)
# ---------------------------------------------------------------------------------------------
def test_label_boxes_and_yolo_lines() -> None:
    labels = np.zeros((10, 20), np.int32)
    labels[2:4, 5:9] = 1  # x 5..8, y 2..3 -> box [5, 2, 8, 3] with inclusive corners
    labels[9, 19] = 3  # a 1-pixel object in the corner; label 2 is absent
    ids, boxes = label_boxes(labels)
    assert ids.tolist() == [1, 3]
    np.testing.assert_array_equal(boxes, [[5, 2, 8, 3], [19, 9, 19, 9]])
    assert yolo_label_lines(labels) == ["0 0.350000 0.300000 0.200000 0.200000",
                                        "0 0.975000 0.950000 0.050000 0.100000"]
    assert yolo_label_lines(np.zeros((5, 5), np.int32)) == []


def test_box_iou_and_matching() -> None:
    # inclusive max corners: [0, 0, 9, 9] covers 10 x 10 pixels
    gt = np.array([[0, 0, 9, 9], [20, 20, 29, 29], [50, 50, 59, 59]], np.float32)
    pred = np.array([[0, 0, 9, 4],       # IoU 0.5 with gt 0: not a match (strict, as metrics.py)
                     [0, 0, 9, 5],       # IoU 0.6 with gt 0
                     [21, 21, 29, 29],   # IoU 0.81 with gt 1
                     [20, 20, 29, 30],   # IoU 100/110 with gt 1, a duplicate: only one may match
                     [100, 100, 109, 109]], np.float32)
    iou = box_iou(gt, pred)
    assert iou.shape == (3, 5)
    assert iou[0, 0] == pytest.approx(0.5) and iou[0, 1] == pytest.approx(0.6)
    assert iou[1, 2] == pytest.approx(81 / 100)
    counts = match_boxes(gt, pred)
    assert (counts.tp, counts.fp, counts.fn) == (2, 3, 1)
    scores = counts.scores()
    assert scores["precision"] == pytest.approx(2 / 5) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["mean_matched_iou"] == pytest.approx((0.6 + 100 / 110) / 2)  # the better duplicate
    assert match_boxes(np.zeros((0, 4)), np.zeros((0, 4))).scores()["recall"] == 1.0
    none_found = match_boxes(gt, np.zeros((0, 4))).scores()
    assert none_found["recall"] == 0.0 and none_found["precision"] == 0.0 and none_found["fn"] == 3


@pytest.mark.parametrize("length,tile,overlap", [(1024, 1024, 128), (1100, 1024, 128), (2000, 512, 64),
                                                 (640, 512, 64), (300, 256, 0), (100, 0, 0)])
def test_tiles_cover_with_overlap(length: int, tile: int, overlap: int) -> None:
    starts = tile_starts(length, tile, overlap)
    size = tile if 0 < tile < length else length
    covered = np.zeros(length, bool)
    for s in starts:
        assert 0 <= s and s + size <= length
        covered[s:s + size] = True
    assert covered.all()
    assert all(a + size - b >= overlap for a, b in zip(starts, starts[1:]))
    assert len(tile_windows(length, length, tile, overlap)) == len(starts) ** 2


def test_paint_resolves_overlaps_by_score() -> None:
    a = Instance((0, 0, 4, 4), np.ones((4, 4), bool), score=0.5, confidence=0.9)
    b = Instance((2, 2, 6, 6), np.ones((4, 4), bool), score=0.8, confidence=0.1)
    hidden = Instance((3, 3, 5, 5), np.ones((2, 2), bool), score=0.1, confidence=0.1)  # fully under b
    tiny = Instance((7, 7, 8, 8), np.ones((1, 1), bool), score=0.9, confidence=0.9)
    labels, kept = paint_instances([a, b, hidden, tiny], (8, 8), min_area=2)
    assert kept == [b, a]  # label 1 = highest score; hidden and tiny (1 px < min_area) dropped
    assert labels[3, 3] == 1 and labels[0, 0] == 2 and labels[7, 7] == 0
    assert (labels == 1).sum() == 16 and (labels == 2).sum() == 12


def tile_crops(gt: np.ndarray, windows: list) -> tuple[list[Instance], list[int]]:
    """Each tile's view of the ground truth: every object it sees, cut at the tile edges."""
    instances, tiles = [], []
    for index, (y0, x0, y1, x1) in enumerate(windows):
        crop = gt[y0:y1, x0:x1]
        for value in np.unique(crop[crop > 0]):
            ys, xs = np.nonzero(crop == value)
            box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            instances.append(Instance(box, crop[box[1]:box[3], box[0]:box[2]] == value, 1.0, 1.0).shifted(y0, x0))
            tiles.append(index)
    return instances, tiles


def test_tile_merge_rebuilds_objects_cut_by_tiles(shared_data: Path) -> None:
    """Ground-truth objects cut into tiles, merged back: the label map equals the ground truth."""
    _, gt = em_labels(shared_data)
    windows = tile_windows(*gt.shape, 384, 64)
    assert len(windows) == 9
    instances, tiles = tile_crops(gt, windows)
    assert len(instances) > gt.max()  # some objects were cut
    merged = merge_tiles(instances, tiles, windows, 0.5)
    labels, _ = paint_instances(merged, gt.shape)
    scores = instance_metrics(gt, labels)
    assert scores["f1"] == 1.0 and scores["aji"] == pytest.approx(1.0)


def test_tile_merge_joins_long_objects_and_keeps_neighbours_apart() -> None:
    """A bar much longer than the tile overlap is one object; two touching objects stay two."""
    gt = np.zeros((100, 300), np.int32)
    gt[40:60, 10:290] = 1  # crosses two tile seams, 4x the overlap on each side
    gt[70:90, 100:140] = 2
    gt[70:90, 140:180] = 3  # 2 and 3 touch at column 140; both lie in tile overlaps
    windows = tile_windows(*gt.shape, 128, 32)
    instances, tiles = tile_crops(gt, windows)
    labels, kept = paint_instances(merge_tiles(instances, tiles, windows, 0.5), gt.shape)
    assert len(kept) == 3
    assert instance_metrics(gt, labels)["aji"] == pytest.approx(1.0)


def test_box_baseline_fills_detector_boxes() -> None:
    labels = box_baseline(np.array([[1, 1, 2.5, 3], [0, 0, 1, 1]]), (6, 6))  # the smaller box on top
    assert labels[0, 0] == 1 and labels[3, 3] == 2 and labels[1, 1] == 1
    assert (labels == 2).sum() == 3 * 3 - 1  # x 1..3 (3.5 rounds out), y 1..3, less the shared pixel


# ---------------------------------------------------------------------------------------------
# output formats
# ---------------------------------------------------------------------------------------------
def test_rle_round_trip_through_the_dataset_reader(shared_data: Path) -> None:
    _, gt = em_labels(shared_data)
    rng = np.random.default_rng(0)
    cases = [(gt == v) for v in range(1, gt.max() + 1)]
    cases += [np.ones((7, 5), bool), rng.random((9, 11)) > 0.5]
    corner = np.zeros((6, 4), bool)
    corner[0, 0] = corner[-1, -1] = True
    cases.append(corner)
    for mask in cases:
        ys, xs = np.nonzero(mask)
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        rle = rle_encode(mask[box[1]:box[3], box[0]:box[2]], box, mask.shape)
        assert rle["size"] == list(mask.shape) and isinstance(rle["counts"], str)
        np.testing.assert_array_equal(rle_decode(rle), mask)


def test_label_edges_match_3x3_filters() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 6), (6, 1), (7, 9), (40, 33)]:
        labels = rng.integers(0, 4, shape).astype(np.int32)
        expected = (labels != ndimage.maximum_filter(labels, 3)) | (labels != ndimage.minimum_filter(labels, 3))
        np.testing.assert_array_equal(label_edges(labels), expected)


def test_polygons_outline_the_mask(shared_data: Path) -> None:
    _, gt = em_labels(shared_data)
    value = np.bincount(gt.ravel())[1:].argmax() + 1  # the largest object
    ys, xs = np.nonzero(gt == value)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    polys = polygons(gt[box[1]:box[3], box[0]:box[2]] == value, box)
    filled = np.zeros(gt.shape, np.uint8)
    for poly in polys:
        cv2.fillPoly(filled, [np.round(np.array(poly).reshape(-1, 2)).astype(np.int32)], 1)
    inter, union = (filled & (gt == value)).sum(), (filled | (gt == value)).sum()
    assert inter / union > 0.95


# ---------------------------------------------------------------------------------------------
# SAM with box prompts (the non-empty path, deterministic)
# ---------------------------------------------------------------------------------------------
def test_segment_with_ground_truth_boxes(shared_data: Path, tiny_sam: torch.nn.Module) -> None:
    image, gt = em_labels(shared_data)
    boxes = label_boxes(gt)[1]
    labels = inference.segment(tiny_sam, image, box_prompts(boxes), 4, keep_ids=False, confidences=np.ones(len(boxes)))
    assert labels.shape == gt.shape and labels.dtype == np.int32
    values = np.unique(labels[labels > 0])
    assert 0 < values.size <= len(boxes)
    np.testing.assert_array_equal(values, np.arange(1, values.size + 1))  # consecutive
    assert inference.segment(tiny_sam, image, box_prompts(np.zeros((0, 4)))).max() == 0


@pytest.mark.parametrize("shape", [(256, 256), (200, 256), (300, 180)])
def test_decode_boxes_gives_the_masks_of_model_predict(tiny_sam: torch.nn.Module, shape: tuple) -> None:
    """decode_instances post-processes the decoder's logits itself (skipping an identity resize):
    masks and scores must be those of model.predict, whatever the image's size."""
    from model import predict

    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    boxes = np.array([[10, 10, 100, 120], [50, 20, 150, 90], [0, 0, shape[1], shape[0]]], np.float32)
    embedding = inference.encode_image(tiny_sam, image)
    found = inference.decode_instances(tiny_sam, embedding, box_prompts(boxes), image.shape[:2], 32,
                                       np.array([0.9, 0.5, 0.2]), keep_ids=False)
    masks, scores, _ = predict(tiny_sam, image, boxes=boxes, image_embedding=embedding)
    expected = [instance_from_mask(m, s, c) for m, s, c in zip(masks, scores, [0.9, 0.5, 0.2])]
    expected = [e for e in expected if e is not None]
    assert len(found) == len(expected)
    for a, b in zip(found, expected):
        assert (a.window, a.score, a.confidence) == (b.window, b.score, b.confidence)
        np.testing.assert_array_equal(a.mask, b.mask)


def test_segmenter_tiles_and_merges(shared_data: Path, tiny_sam: torch.nn.Module,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiled pipeline with a stand-in per-tile segmenter that returns ground-truth crops."""
    image, gt = em_labels(shared_data)

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
    segmenter = Segmenter(tiny_sam, SegmentOptions(tile_size=512, tile_overlap=128, min_area=0), propose=object())
    labels, kept = segmenter(image)
    assert len(kept) == labels.max() == gt.max()
    assert instance_metrics(gt, labels)["f1"] == 1.0


# ---------------------------------------------------------------------------------------------
# detect train: real EM data, offline
# ---------------------------------------------------------------------------------------------
def test_train_offline_on_real_em_data(trained: dict) -> None:
    assert trained["returncode"] == 0, trained["output"][-3000:]
    assert trained["attempts"] == [], f"ultralytics touched the network: {trained['attempts']}"
    run = trained["run"]
    data_yaml = run / "yolo_dataset" / "data.yaml"
    assert "train: images/train" in data_yaml.read_text() and "0: object" in data_yaml.read_text()
    assert not (run / "yolo_dataset" / "masks").exists()
    train_images = sorted((run / "yolo_dataset" / "images" / "train").glob("*.png"))
    val_images = sorted((run / "yolo_dataset" / "images" / "val").glob("*.png"))
    assert (len(train_images), len(val_images)) == (48, 16)  # 3 + 1 images of 16 patches each
    assert len(list((run / "yolo_dataset" / "labels" / "val").glob("*.txt"))) == 16
    assert (run / "yolo" / "weights" / "best.pt").is_file()
    assert (trained["config"] / "Arial.ttf").is_file()  # the local font, not a download
    for name in ("folds.json", "detect_train.log", "detect_train_config.json"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "val_metrics.json").read_text())
    assert {"precision", "recall", "f1", "tp", "fp", "fn", "by_conf"} <= set(metrics)
    assert metrics["tp"] + metrics["fn"] == sum(
        len(p.read_text().splitlines()) for p in (run / "yolo_dataset" / "labels" / "val").glob("*.txt"))
    assert "validation boxes at IoU 0.5" in trained["output"]


def test_train_split_has_no_leakage_and_labels_match(trained: dict, em_subset: Path) -> None:
    index = json.loads((trained["run"] / "yolo_dataset" / "samples.json").read_text())
    groups = {split: {v["group"] for k, v in index.items() if k.startswith(split)} for split in ("train", "val")}
    assert groups["train"] and groups["val"] and not groups["train"] & groups["val"]
    assert len(groups["val"]) == 1  # one whole section: its 16 patches never sit in training
    # one patch's label file against boxes computed here from the raw mask
    name, entry = next((k, v) for k, v in index.items() if v["objects"] > 0)
    source, _, where = entry["key"].partition("@")
    y, x = (int(v) for v in where.split(":")[0].split(","))
    mask = cv2.imread(str(em_subset / "masks" / Path(source).name), cv2.IMREAD_GRAYSCALE)[y:y + 256, x:x + 256]
    _, comps = cv2.connectedComponents((mask > 0).astype(np.uint8), connectivity=8)
    expected = sorted((round((xs.min() + xs.max() + 1) / 512, 4), round((ys.min() + ys.max() + 1) / 512, 4))
                      for v in range(1, comps.max() + 1) for ys, xs in [np.nonzero(comps == v)])
    lines = (trained["run"] / "yolo_dataset" / "labels" / f"{name}.txt").read_text().splitlines()
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


def test_predict_image(best_pt: Path, detect_main, shared_data: Path, tmp_path: Path,
                       no_network: list, caplog: pytest.LogCaptureFixture) -> None:
    image_path = shared_data / "em_vnc" / "images" / "19.png"
    out = tmp_path / "pred"
    argv = ["detect", "predict", "--input", str(image_path), "--output_dir", str(out),
            "--yolo_model", str(best_pt), "--conf", "0.001", *SAM_ARGS]
    with caplog.at_level(logging.INFO):
        assert detect_main(argv) == 0
    labels = tifffile.imread(out / "19_labels.tif")
    assert labels.shape == (1024, 1024) and labels.dtype == np.uint16
    coco = json.loads((out / "coco.json").read_text())
    assert [img["file_name"] for img in coco["images"]] == ["19.png"]
    check_coco(coco, labels)
    if labels.max() == 0:  # a 2-epoch detector may find nothing even at conf 0.001
        assert "no objects found" in caplog.text
    overlay = cv2.imread(str(out / "19_overlay.png"))
    assert overlay.shape == (1024, 1024, 3)
    assert "19.png" in (out / "detect_predict.log").read_text()
    config = json.loads((out / "detect_predict_config.json").read_text())
    assert config["options"]["imgsz"] == 256  # the detector's training size

    # the same outputs again: refused without --overwrite, replaced with it
    assert detect_main(argv) == 2
    assert detect_main([*argv, "--overwrite", "--coco_segmentation", "polygon"]) == 0
    polygon_coco = json.loads((out / "coco.json").read_text())
    assert all(isinstance(a["segmentation"], list) for a in polygon_coco["annotations"])


def test_predict_stack_slice_by_slice(best_pt: Path, detect_main, stack3: Path, tmp_path: Path,
                                      no_network: list) -> None:
    out = tmp_path / "pred"
    argv = ["detect", "predict", "--input", str(stack3), "--output_dir", str(out), "--tile_size", "512",
            "--tile_overlap", "64", "--yolo_model", str(best_pt),
            "--conf", "0.01", "--no_overlay", *SAM_ARGS]
    assert detect_main(argv) == 0
    labels = tifffile.imread(out / "stack3_labels.tif")
    assert labels.shape == (3, 640, 640) and labels.dtype == np.uint16
    with tifffile.TiffFile(out / "stack3_labels.tif") as tif:
        assert tif.series[0].shape == (3, 640, 640)
    coco = json.loads((out / "coco.json").read_text())
    assert [img["frame_index"] for img in coco["images"]] == [0, 1, 2]
    check_coco(coco, labels)
    # labels are unique across the stack: no value appears in two slices
    per_slice = [set(np.unique(s[s > 0]).tolist()) for s in labels]
    assert sum(len(s) for s in per_slice) == len(set().union(*per_slice))
    assert not (out / "stack3_overlay.png").exists()


def test_predict_no_objects_gives_empty_map_and_warning(best_pt: Path, detect_main, stack3: Path,
                                                        tmp_path: Path, no_network: list,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "pred"
    argv = ["detect", "predict", "--input", str(stack3), "--output_dir", str(out), "--conf", "1.0",
            "--yolo_model", str(best_pt), *SAM_ARGS]
    with caplog.at_level(logging.WARNING):
        assert detect_main(argv) == 0
    assert "no objects found in stack3.tif" in caplog.text
    labels = tifffile.imread(out / "stack3_labels.tif")
    assert labels.shape == (3, 640, 640) and labels.max() == 0
    assert json.loads((out / "coco.json").read_text())["annotations"] == []


def test_predict_amg_on_a_folder(detect_main, shared_data: Path, tmp_path: Path, no_network: list) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    image = cv2.imread(str(shared_data / "em_vnc" / "images" / "19.png"))
    cv2.imwrite(str(folder / "a.png"), image[:256, :256])
    cv2.imwrite(str(folder / "b.png"), image[256:512, :320])
    out = tmp_path / "amg"
    argv = ["detect", "predict", "--mode", "amg", "--input", str(folder), "--output_dir", str(out),
            "--points_per_side", "4", "--pred_iou_thresh", "0", "--stability_score_thresh", "0", *SAM_ARGS]
    assert detect_main(argv) == 0
    assert tifffile.imread(out / "a_labels.tif").shape == (256, 256)
    assert tifffile.imread(out / "b_labels.tif").shape == (256, 320)
    coco = json.loads((out / "coco.json").read_text())
    assert [img["file_name"] for img in coco["images"]] == ["a.png", "b.png"]


def test_yolo_boxes_for_evaluate(best_pt: Path, shared_data: Path, no_network: list) -> None:
    yolo = load_yolo(best_pt)
    image, _ = em_labels(shared_data)
    boxes, scores = yolo_boxes(yolo, image[:256, :256], conf=0.001, iou=0.7, imgsz=256)
    assert boxes.dtype == np.float32 and boxes.shape == (len(scores), 4)
    assert np.all(scores >= 0.001) and np.all(boxes[:, 2:] >= boxes[:, :2])


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit code 2
# ---------------------------------------------------------------------------------------------
def test_predict_bad_inputs(detect_main, tmp_path: Path, shared_data: Path,
                            caplog: pytest.LogCaptureFixture) -> None:
    image = str(shared_data / "em_vnc" / "images" / "19.png")
    not_yolo = tmp_path / "not_yolo.pt"
    torch.save({"image_encoder.weight": torch.zeros(2)}, not_yolo)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    four_d = tmp_path / "4d.tif"
    tifffile.imwrite(four_d, np.zeros((2, 2, 8, 8), np.uint8), photometric="minisblack")
    out = str(tmp_path / "out")
    cases = {
        "does not exist": ["--input", str(tmp_path / "missing.png"), "--mode", "amg"],
        "neither an image": ["--input", str(text), "--mode", "amg"],
        "holds no images": ["--input", str(empty), "--mode", "amg"],
        "is not a YOLO model": ["--input", image, "--yolo_model", str(not_yolo)],
        "needs --yolo_model": ["--input", image],
        "YOLO model": ["--input", image, "--yolo_model", str(tmp_path / "none.pt")],
        "only 2-D images and 3-D": ["--input", str(four_d), "--mode", "amg"],
        "--tile_overlap": ["--input", image, "--mode", "amg", "--tile_size", "100", "--tile_overlap", "100"],
    }
    for message, extra in cases.items():
        caplog.clear()
        assert detect_main(["detect", "predict", "--output_dir", out, *extra, *SAM_ARGS]) == 2, message
        assert message in caplog.text, (message, caplog.text)


def test_train_bad_inputs(detect_main, em_subset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = ["detect", "train", "--data_dir", str(em_subset), "--output_dir", str(tmp_path / "run"), *TRAIN_ARGS]
    cases = {
        "not found": ["--yolo_model", "no_such_model.yaml"],
        "neither a model config": ["--yolo_model", "model.onnx"],
        "set by detect itself": ["--yolo_args", "amp=True"],
        "expects key=value": ["--yolo_args", "mosaic"],
        "does not exist": ["--fold", "3"],
    }
    for message, extra in cases.items():
        caplog.clear()
        assert detect_main([*base, *extra]) == 2, message
        assert message in caplog.text, (message, caplog.text)


def test_predict_with_lora_adapter(detect_main, shared_data: Path, tmp_path: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    """--model_path: the adapter is injected and loaded; an adapter of another type is refused."""
    from adapters import save_adapter
    from lora import inject_lora

    sam = build_model("vit_t", None, 256)
    inject_lora(sam, 4, 4, "qkv")
    for name, param in sam.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)  # a non-trivial adapter
    adapter = save_adapter(tmp_path / "adapter.pt", sam, {"model_type": "vit_t", "image_size": 256})
    image = tmp_path / "crop.png"
    cv2.imwrite(str(image), cv2.imread(str(shared_data / "em_vnc" / "images" / "19.png"))[:256, :256])
    base = ["detect", "predict", "--mode", "amg", "--input", str(image), "--points_per_side", "2",
            "--pred_iou_thresh", "0", "--stability_score_thresh", "0", "--checkpoint", "none", "--device", "cpu"]
    with caplog.at_level(logging.INFO):
        assert detect_main([*base, "--output_dir", str(tmp_path / "a"), "--model_path", str(adapter),
                            "--model_type", "vit_t"]) == 0  # --image_size comes from the adapter
    assert "loaded adapter" in caplog.text
    assert json.loads((tmp_path / "a" / "detect_predict_config.json").read_text())["image_size"] == 256
    caplog.clear()
    assert detect_main([*base, "--output_dir", str(tmp_path / "b"), "--model_path", str(adapter),
                        "--model_type", "vit_b"]) == 2
    assert "an adapter for model_type vit_t" in caplog.text


def test_predict_tiles_at_the_training_scale(detect_main, shared_data: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """An adapter trained on 256 px patches: a 512 px image is segmented in 256 px tiles (objects
    at the training scale); a tile size far from it is warned about."""
    from adapters import save_adapter
    from lora import inject_lora

    sam = build_model("vit_t", None, 256)
    inject_lora(sam, 2, 2, "qkv")
    adapter = save_adapter(tmp_path / "adapter.pt", sam, {"model_type": "vit_t", "image_size": 256, "patch_size": 256})
    image = tmp_path / "crop.png"
    cv2.imwrite(str(image), cv2.imread(str(shared_data / "em_vnc" / "images" / "19.png"))[:512, :512])
    base = ["detect", "predict", "--mode", "amg", "--input", str(image), "--points_per_side", "2",
            "--checkpoint", "none", "--device", "cpu", "--model_path", str(adapter)]
    with caplog.at_level(logging.INFO):
        assert detect_main([*base, "--output_dir", str(tmp_path / "a")]) == 0
    config = json.loads((tmp_path / "a" / "detect_predict_config.json").read_text())
    assert config["options"]["tile_size"] == 256 and config["training_scale"]["sam_patch"] == 256
    assert "tiles of 256 px" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert detect_main([*base, "--output_dir", str(tmp_path / "b"), "--tile_size", "1024"]) == 0
    assert "--tile_size 1024 is 4.0x the 256 px patches" in caplog.text
