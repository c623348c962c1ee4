"""Shared fixtures: paths to the real sample data and the repository root on sys.path."""
from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: real microscopy samples made by others (see its README)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real sample data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """Tiny inputs: intra-op threads only slow a busy 2-core machine down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def main():
    """``main.main``; afterwards its console handler never keeps a closed capture stream."""
    import main as main_module

    yield main_module.main
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_samlora", False) and getattr(handler.stream, "closed", False):
            handler.stream = sys.stderr


# Real data loaded once for the data tests (test_readers, test_folds, test_prompts, test_dataset);
# no test changes the samples, so one load serves them all.
@pytest.fixture(scope="session")
def cpm15(shared_data):
    """NuInsSeg-style H&E nuclei: 15 tiles from two organs."""
    from dataset import load_dataset

    return load_dataset(shared_data / "nuclei_cpm15")


@pytest.fixture(scope="session")
def em_folders(shared_data):
    """20 EM slices read as unrelated images (``--data_format folders``)."""
    from dataset import load_dataset

    return load_dataset(shared_data / "em_vnc", "folders")


@pytest.fixture(scope="session")
def em_stack(shared_data):
    """EPFL-style TIFF volumes: 15 training and 5 testing slices."""
    from dataset import load_dataset

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


def crop_em_sections(shared_data: Path, out: Path, sections: dict[str, str], size: int = 256) -> Path:
    """``out/images`` + ``out/masks``: for each ``name: section`` of the real EM data
    (../shared/data/em_vnc), the ``size`` px window (on a 128 px grid) holding the most
    mitochondria pixels, saved as ``name.png``."""
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
