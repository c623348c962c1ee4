"""How tests/data was cut from the full sample data (run once; kept for provenance).

    python tests/data/build.py SOURCE

``SOURCE`` is the folder of full-size samples described in tests/data/README.md (em_vnc,
nuclei_cpm15, nuclei_monuseg_train, nuclei_dsb_fluo). Pixels are copied unchanged (crops only,
no resampling); PNGs are written with maximum compression, label TIFFs with zlib.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import cv2
import tifffile

OUT = Path(__file__).resolve().parent
EM_WINDOW = (slice(512, 1024), slice(320, 832))  # rows, columns of every EM section
CPM15_WINDOW = (slice(0, 288), slice(0, 320))  # top-left of each H&E tile (non-square)
MONUSEG_WINDOW = (slice(0, 288), slice(0, 288))  # top-left of each 1000x1000 tile
PNG = [cv2.IMWRITE_PNG_COMPRESSION, 9]


def crop_png(src: Path, dst: Path, window: tuple[slice, slice]) -> None:
    """Copy the ``window`` of an image (gray or colour, read unchanged) to ``dst`` as PNG."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(dst), cv2.imread(str(src), cv2.IMREAD_UNCHANGED)[window], PNG)


def crop_tif(src: Path, dst: Path, window: tuple[slice, slice]) -> None:
    """Copy the ``window`` of a label TIFF to ``dst`` (zlib, same dtype)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(dst, tifffile.imread(src)[window], compression="zlib")


def main(source: Path) -> None:
    for sub in ("images", "masks"):
        for path in sorted((source / "em_vnc" / sub).glob("*.png")):
            crop_png(path, OUT / "em_vnc" / sub / path.name, EM_WINDOW)
    for group in sorted((source / "nuclei_cpm15").iterdir()):
        for path in sorted((group / "tissue images").glob("*.png")):
            crop_png(path, OUT / "nuclei_cpm15" / group.name / "tissue images" / path.name, CPM15_WINDOW)
            crop_tif(group / "label masks" / f"{path.stem}.tif",
                     OUT / "nuclei_cpm15" / group.name / "label masks" / f"{path.stem}.tif", CPM15_WINDOW)
    monuseg = source / "nuclei_monuseg_train"
    for path in sorted((monuseg / "images").glob("*.png")):
        crop_png(path, OUT / "nuclei_monuseg_train" / "images" / path.name, MONUSEG_WINDOW)
        crop_tif(monuseg / "masks" / f"{path.stem}.tif", OUT / "nuclei_monuseg_train" / "masks" / f"{path.stem}.tif",
                 MONUSEG_WINDOW)
    for sub in ("images", "masks"):
        (OUT / "nuclei_dsb_fluo" / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(source / "nuclei_dsb_fluo" / sub / "img2d.tif", OUT / "nuclei_dsb_fluo" / sub / "img2d.tif")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
