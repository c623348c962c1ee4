"""Shared fixtures and helpers: the real sample data and crops of it, one tiny-SAM builder, the
repository root on sys.path.

* Data: the repository's own real samples, ``tests/data`` (its README gives provenance and
  licences), seen through ``test_data`` (alias ``shared_data``) with the EPFL-layout TIFF stacks
  built from its PNGs; loaded once (``cpm15``, ``em_folders``, ``em_stack``) and cropped
  once per session (``em_crops`` and its thin variants ``em4``, ``em6``, ``em3``, ``em_split``,
  ``em_whole4``; ``em_section_19``; ``em_volume``, ``em_crop``: the 20 EM sections as arrays). Session data is shared: a test that changes files copies
  them first.
* Models: :func:`tiny_sam` is the one builder of small random models (the fixtures
  ``tiny_vit_base`` / ``tiny_vit`` and ``tiny_sam_256`` are built from it; ``tiny_inputs`` and
  :func:`tiny_forward` drive the 64 px one). The real
  architectures are built only where a test needs them on purpose (``vit_t`` below for LoRA
  parameter counts and the official registry; the predictor-equivalence tests; ``--checkpoint
  none`` command runs, which build the real model through the CLI).
* Detectors: ``untrained_yolo`` (nothing downloaded) and ``best_pt`` (``detect train`` on real
  EM data in a subprocess without network, made once).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TEST_DATA = REPO / "tests" / "data"


def pytest_configure(config: pytest.Config) -> None:
    """The suite's settings (here, not in a root ini file: the root holds only the design card's files)."""
    config.addinivalue_line("markers", "slow: tests that train, run whole commands on real data or take over ~3 s; "
                                       "`-m \"not slow\"` is the quick loop, CI runs them too")
    for rule in ("ignore::FutureWarning:timm", "ignore::UserWarning:timm", "ignore:Overwriting tiny_vit:UserWarning"):
        config.addinivalue_line("filterwarnings", rule)
# The EM stacks built at test time (write_em_stacks): sections 00-14 train, 16-19 test; section 15
# is left out, so no test section borders a training section of the same volume.
EM_STACK_PARTS = {"training": range(0, 15), "testing": range(16, 20)}

# Command-line settings of the command tests: the real MobileSAM with random weights at 256 px
# (built through the CLI, as a user's run builds it), on the CPU.
SMALL = ["--checkpoint", "none", "--image_size", "256", "--model_type", "vit_t", "--device", "cpu"]
# ... and a small LoRA training (test_train, test_parameter_search).
TINY_TRAIN = ["--checkpoint", "none", "--model_type", "vit_t", "--image_size", "256", "--max_objects", "4",
              "--lora_rank", "4", "--lora_alpha", "4"]


def write_em_stacks(em_vnc: Path, out: Path) -> Path:
    """``out`` in the EPFL/Lucchi layout (``training.tif``, ``training_groundtruth.tif``,
    ``testing.tif``, ``testing_groundtruth.tif``: ZxHxW uint8 multi-page TIFFs, masks 0/255) built
    from the numbered section PNGs of ``em_vnc/images`` and ``em_vnc/masks``, split as
    :data:`EM_STACK_PARTS` (one section left out between training and testing)."""
    import cv2
    import tifffile

    out.mkdir(parents=True, exist_ok=True)
    for part, sections in EM_STACK_PARTS.items():
        for sub, suffix in (("images", ""), ("masks", "_groundtruth")):
            volume = np.stack([cv2.imread(str(em_vnc / sub / f"{z:02d}.png"), cv2.IMREAD_GRAYSCALE) for z in sections])
            tifffile.imwrite(out / f"{part}{suffix}.tif", volume, photometric="minisblack", compression="zlib")
    return out


@pytest.fixture(scope="session")
def test_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's real microscopy samples (tests/data, see its README: crops of published
    data made by others) in one session folder that no test changes: each folder of tests/data
    linked, plus ``em_vnc_stack/`` built from ``em_vnc``'s PNGs (:func:`write_em_stacks`)."""
    if not (TEST_DATA / "em_vnc" / "images").is_dir():
        pytest.fail(f"test data not found at {TEST_DATA}")
    root = tmp_path_factory.mktemp("test_data")
    for folder in sorted(p for p in TEST_DATA.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        (root / folder.name).symlink_to(folder, target_is_directory=True)
    write_em_stacks(TEST_DATA / "em_vnc", root / "em_vnc_stack")
    return root


@pytest.fixture(scope="session")
def shared_data(test_data: Path) -> Path:
    """Alias of ``test_data`` (the name earlier tests use)."""
    return test_data


@pytest.fixture(scope="module")
def one_thread():
    """Tiny inputs: intra-op threads only slow a busy 2-core machine down (two spinning threads
    made each 256 px encoder pass 10-30x slower than one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def main():
    """``main.main``; afterwards its console handler never keeps a closed capture stream.

    Error lines are read from ``caplog`` (log records): main's console handler keeps the stream
    it was given, and a per-test capture stream is closed when its test ends.
    """
    import main as main_module

    yield main_module.main
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_samlora", False) and getattr(handler.stream, "closed", False):
            handler.stream = sys.stderr


@pytest.fixture(scope="session", autouse=True)
def yolo_config_dir(tmp_path_factory: pytest.TempPathFactory):
    """ultralytics' settings and font go to a temporary folder, never the user's config (set for
    the whole session: ultralytics reads it once, when first imported)."""
    path = tmp_path_factory.mktemp("ultralytics_config")
    old = os.environ.get("YOLO_CONFIG_DIR")
    os.environ["YOLO_CONFIG_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("YOLO_CONFIG_DIR", None)
    else:
        os.environ["YOLO_CONFIG_DIR"] = old


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


# --------------------------------------------------------------------------------------------
# Real data, loaded or cropped once per session
# --------------------------------------------------------------------------------------------
# Loaded once for the data tests (test_readers, test_folds, test_prompts, test_dataset); no test
# changes the samples, so one load serves them all.
@pytest.fixture(scope="session")
def cpm15(shared_data):
    """NuInsSeg-style H&E nuclei: 15 tiles from two organs."""
    from samlora.data.dataset import load_dataset

    return load_dataset(shared_data / "nuclei_cpm15")


@pytest.fixture(scope="session")
def em_folders(shared_data):
    """20 EM slices read as unrelated images (``--data_format folders``)."""
    from samlora.data.dataset import load_dataset

    return load_dataset(shared_data / "em_vnc", "folders")


@pytest.fixture(scope="session")
def em_stack(shared_data):
    """EPFL-style TIFF volumes (built by ``test_data``): 15 training and 4 testing slices."""
    from samlora.data.dataset import load_dataset

    return load_dataset(shared_data / "em_vnc_stack")


@pytest.fixture
def pair_dir(shared_data, tmp_path):
    """images/ + masks/ with two real nuclei tiles (PNG image, uint16 TIFF labels)."""
    src = shared_data / "nuclei_cpm15" / "cpm15 20x"
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("image02", "image04"):
        shutil.copy(src / "tissue images" / f"{name}.png", tmp_path / "images")
        shutil.copy(src / "label masks" / f"{name}.tif", tmp_path / "masks")
    return tmp_path


def crop_em_sections(shared_data: Path, out: Path, sections: Mapping[str, str], size: int = 256) -> Path:
    """``out/images`` + ``out/masks``: for each ``name: section`` of the real EM data
    (``shared_data / "em_vnc"``: 512x512 sections), the ``size`` px window (on a 128 px grid)
    holding the most mitochondria pixels, saved as ``name.png`` (``size`` 512: the whole section)."""
    import cv2

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for name, section in sections.items():
        image = cv2.imread(str(shared_data / "em_vnc" / "images" / f"{section}.png"), cv2.IMREAD_GRAYSCALE)
        mask = cv2.imread(str(shared_data / "em_vnc" / "masks" / f"{section}.png"), cv2.IMREAD_GRAYSCALE)
        starts = range(0, image.shape[0] - size + 1, 128)
        y, x = max(((y, x) for y in starts for x in starts),
                   key=lambda yx: int(mask[yx[0]:yx[0] + size, yx[1]:yx[1] + size].sum()))
        cv2.imwrite(str(out / "images" / f"{name}.png"), image[y:y + size, x:x + size])
        cv2.imwrite(str(out / "masks" / f"{name}.png"), mask[y:y + size, x:x + size])
    return out


EM_SECTION_SIZE = 512  # tests/data/em_vnc: rows 512-1023, columns 320-831 of the 1024 px sections
EM4 = {"a": "00", "b": "05", "c": "10", "d": "15"}  # four sections far apart: four groups
EM6 = dict(zip("abcdef", ("00", "03", "06", "09", "12", "15")))
EM3 = {"00": "00", "01": "01", "02": "02"}  # consecutive sections, numbered as in em_vnc


@pytest.fixture(scope="session")
def em_crops(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``em_crops({name: section}, size=256)`` -> an images/ + masks/ folder of real EM crops
    (:func:`crop_em_sections`), made once per session for each (sections, size)."""
    made: dict[tuple, Path] = {}

    def make(sections: Mapping[str, str], size: int = 256) -> Path:
        key = (tuple(sections.items()), size)
        if key not in made:
            made[key] = crop_em_sections(shared_data, tmp_path_factory.mktemp(f"em{len(sections)}_{size}px"),
                                         sections, size)
        return made[key]

    return make


@pytest.fixture(scope="session")
def em4(em_crops) -> Path:
    """Four 128x128 crops (a..d) of real EM sections 00, 05, 10, 15, each with mitochondria."""
    return em_crops(EM4, 128)


@pytest.fixture(scope="session")
def em6(em_crops) -> Path:
    """Six 256x256 crops (a..f) of real EM sections 00, 03, ..., 15: six groups."""
    return em_crops(EM6, 256)


@pytest.fixture(scope="session")
def em3(em_crops) -> Path:
    """Three 256x256 crops of consecutive sections, named 00, 01, 02 (numbered slices)."""
    return em_crops(EM3, 256)


@pytest.fixture(scope="session")
def em_split(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ (sections 00, 01) and test/ (02) folders, each images/ + masks/ of 256 px crops:
    a fixed test split."""
    root = tmp_path_factory.mktemp("em_split")
    crop_em_sections(shared_data, root / "train", {"00": "00", "01": "01"})
    crop_em_sections(shared_data, root / "test", {"02": "02"})
    return root


@pytest.fixture(scope="session")
def em_whole4(em_crops) -> Path:
    """Real EM sections 00, 05, 10, 15 whole (512x512), named 00..15, with their masks."""
    return em_crops({s: s for s in EM4.values()}, EM_SECTION_SIZE)


@pytest.fixture(scope="session")
def em_section_19(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Real EM section 19 (512x512): the RGB image and its mitochondria as 8-connected
    instance labels (int32)."""
    import cv2

    image = cv2.cvtColor(cv2.imread(str(shared_data / "em_vnc" / "images" / "19.png")), cv2.COLOR_BGR2RGB)
    mask = cv2.imread(str(shared_data / "em_vnc" / "masks" / "19.png"), cv2.IMREAD_GRAYSCALE)
    _, labels = cv2.connectedComponents((mask > 0).astype(np.uint8), connectivity=8)
    labels = labels.astype(np.int32)
    image.flags.writeable = labels.flags.writeable = False  # shared by many tests: nobody changes it
    return image, labels


@pytest.fixture(scope="session")
def em_volume(shared_data) -> tuple[np.ndarray, np.ndarray]:
    """The 20 consecutive real EM sections of ``shared_data / "em_vnc"`` as arrays: the images
    (20x512x512 uint8) and the mitochondria masks (bool). Read only."""
    import cv2

    folder = shared_data / "em_vnc"
    images = np.stack([cv2.imread(str(folder / "images" / f"{z:02d}.png"), cv2.IMREAD_GRAYSCALE) for z in range(20)])
    masks = np.stack([cv2.imread(str(folder / "masks" / f"{z:02d}.png"), cv2.IMREAD_GRAYSCALE) for z in range(20)]) > 0
    images.flags.writeable = masks.flags.writeable = False
    return images, masks


@pytest.fixture(scope="session")
def em_crop(em_volume) -> tuple[np.ndarray, np.ndarray]:
    """``em_volume`` cropped to a 256x256 window with many mitochondria: the images and each
    section's mitochondria as 8-connected components (int32)."""
    from scipy import ndimage

    images, masks = em_volume
    window = (slice(None), slice(128, 384), slice(128, 384))  # rows 640-895, columns 448-703 of the full section
    labels = np.stack([ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks[window]])
    return images[window].copy(), labels.astype(np.int32)


# --------------------------------------------------------------------------------------------
# Models: one tiny-SAM builder
# --------------------------------------------------------------------------------------------
def tiny_decoder(embed_dim: int):
    """SAM's prompt encoder and mask decoder shrunk: 1 two-way block, MLP 64, 2 heads (16 and,
    in the halved cross attention, 8 channels each at width 32), IoU head 32."""
    from samlora.models import sam as model

    return model.DecoderSizes(embed_dim=embed_dim, depth=1, mlp_dim=64, num_heads=2, iou_head_hidden_dim=32)


def tiny_sam(kind: str = "vit", image_size: int = 256, seed: int = 0, depth: int = 2) -> nn.Module:
    """A small random SAM for tests, in eval mode, built by model.py's own builders.

    ``kind="vit"``: SAM's ViT encoder at embed_dim 32, ``depth`` blocks (default 2; 12 gives a
    state dict with ViT-B's tensor names), 2 heads, global attention in block 1, window 4, and a
    32-channel decoder; ``kind="vit_t"``: MobileSAM's real TinyViT encoder (its neck fixes the
    decoder's width at 256) with the same shrunken decoder depth and widths. Decoder: 1 two-way
    block, MLP 64, 2 heads, IoU head 32. Every parameter gets a little noise (0.02 std) after
    the seeded init, so that outputs depend on every layer (SAM inits position embeddings at 0).
    Its :class:`ModelInfo` is ``ModelInfo("vit_b" or "vit_t", image_size)`` (random weights).
    """
    from samlora.models import sam as model

    torch.manual_seed(seed)
    if kind == "vit":
        sam = model.build_sam_vit(image_size, embed_dim=32, depth=depth, num_heads=2, global_attn_indexes=(1,),
                                  window_size=4, decoder=tiny_decoder(32))
    elif kind == "vit_t":
        sam = model.build_mobile_sam(image_size, decoder=tiny_decoder(256))
    else:
        raise ValueError(f"tiny_sam: kind must be 'vit' or 'vit_t', got {kind!r}")
    with torch.no_grad():
        for p in sam.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return sam.eval()


@pytest.fixture(scope="session")
def tiny_vit_base() -> nn.Module:
    """A 64 px tiny ViT SAM (4x4 tokens, one window) that no test changes: copy it first."""
    return tiny_sam("vit", image_size=64)


@pytest.fixture
def tiny_vit(tiny_vit_base) -> nn.Module:
    """A fresh copy of ``tiny_vit_base`` that the test may change (inject LoRA, train)."""
    return copy.deepcopy(tiny_vit_base)


@pytest.fixture(scope="session")
def tiny_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 64x64 inputs for :func:`tiny_forward` and a box each."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=g)
    boxes = torch.tensor([[8.0, 10.0, 40.0, 50.0], [20.0, 4.0, 60.0, 30.0]])
    return images, boxes


@pytest.fixture(scope="session")
def tiny_sam_256() -> nn.Module:
    """A 256 px tiny ViT SAM for inference tests (read only)."""
    return tiny_sam("vit", image_size=256)


def tiny_forward(sam: nn.Module, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Images Bx3xSxS, boxes Bx4 -> low-res logits Bx1x(S/4)x(S/4) and IoU Bx1, concatenated flat."""
    embeddings = sam.image_encoder(images)
    outs = []
    for i in range(images.shape[0]):
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes[i:i + 1], masks=None)
        masks, iou = sam.mask_decoder(
            image_embeddings=embeddings[i:i + 1], image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        outs.append(torch.cat([masks.flatten(), iou.flatten()]))
    return torch.stack(outs)


def perturb_lora(model: nn.Module, seed: int = 3, scale: float = 0.05) -> None:
    """Give every lora_B a non-zero value, as training would."""
    from samlora.models import lora

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(scale * torch.randn(layer.lora_B.shape, generator=g))


@pytest.fixture(scope="session")
def vit_t_base() -> nn.Module:
    """The real MobileSAM from the official registry (random weights, 1024 px): for LoRA layer
    names, parameter counts, adapter sizes and strict loading into the official model."""
    from mobile_sam import sam_model_registry

    torch.manual_seed(0)
    return sam_model_registry["vit_t"]().eval()


@pytest.fixture
def vit_t(vit_t_base) -> nn.Module:
    return copy.deepcopy(vit_t_base)


# --------------------------------------------------------------------------------------------
# Detectors
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def untrained_yolo(tmp_path_factory: pytest.TempPathFactory, yolo_config_dir: Path) -> Path:
    """An untrained YOLOv8n (from ultralytics' yolov8n.yaml, nothing downloaded) saved as a .pt
    that says it was trained at 128 px. Its confidences are tiny (~1e-4), so the tests use a
    --conf below them to get boxes."""
    from samlora.inference import yolo as detector

    torch.manual_seed(0)
    yolo = detector.import_ultralytics().YOLO("yolov8n.yaml", task="detect")
    yolo.ckpt = {"train_args": {"imgsz": 128, "task": "detect"}}
    path = tmp_path_factory.mktemp("yolo") / "untrained_yolov8n.pt"
    yolo.save(path)
    return path


DETECT_TRAIN_ARGS = ["--data_format", "folders", "--patch_size", "256", "--val_fraction", "0.25",
                     "--epochs", "2", "--imgsz", "256", "--batch_size", "8", "--num_workers", "0",
                     "--device", "cpu", "--no_plots", "--seed", "0"]

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


@pytest.fixture(scope="session")
def detector_run(em_whole4: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``detect train`` for 2 epochs on 256 px patches of 4 whole EM sections, in a subprocess
    whose sockets are blocked and recorded, with a fresh ultralytics config dir (nothing cached
    from this process)."""
    out = tmp_path_factory.mktemp("detect_train")
    config = tmp_path_factory.mktemp("fresh_ultralytics_config")
    runner, net_log = out.parent / "guarded_runner.py", out.parent / "net_attempts.json"
    runner.write_text(GUARDED_RUNNER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "ULTRALYTICS_"))}
    env.update(REPO=str(REPO), NET_LOG=str(net_log), YOLO_CONFIG_DIR=str(config))
    cmd = [sys.executable, str(runner), "detect", "train", "--data_dir", str(em_whole4),
           "--output_dir", str(out / "run"), *DETECT_TRAIN_ARGS]
    proc = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=600)
    return {"returncode": proc.returncode, "output": proc.stdout + proc.stderr, "run": out / "run",
            "attempts": json.loads(net_log.read_text()) if net_log.exists() else None,
            "config": config / "Ultralytics"}


@pytest.fixture(scope="session")
def best_pt(detector_run: dict) -> Path:
    """The trained detector's weights (fails, with the run's output, when training failed)."""
    if detector_run["returncode"] != 0:
        pytest.fail(f"detect train failed:\n{detector_run['output'][-3000:]}")
    return detector_run["run"] / "yolo" / "weights" / "best.pt"


def count_encoder_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch ``model.encode_images`` to record the images of every encoder pass; returns the record."""
    from samlora.models import sam as model

    calls: list[int] = []
    original = model.encode_images

    def counting(sam, images):
        calls.append(images.shape[0])
        return original(sam, images)

    monkeypatch.setattr(model, "encode_images", counting)
    return calls
