"""Read microscopy segmentation data into one sample record; patches, prompts, leakage-free folds.

Every command that trains or evaluates reads its data through :func:`load_dataset` (or
:func:`load_from_args`), splits it with :func:`make_folds` / :func:`make_holdout` and samples
training prompts with :func:`sample_prompts`.

Layouts (``--data_format``; ``auto`` detects them and logs what it found):

- ``nuinsseg``: ``<organ>/tissue images/*.png`` with ``<organ>/label masks modify/*.tif`` (used
  when present) or ``<organ>/label masks/*.tif``; ambiguous regions from
  ``<organ>/vague areas/mask binary/*.png`` become :attr:`Sample.ignore`. Tag = organ.
- ``stack``: multi-page TIFF volumes with their label volumes (EPFL/Lucchi ``training.tif`` +
  ``training_groundtruth.tif``; any ``X.tif`` + ``X_groundtruth|_gt|_labels|_mask.tif``; or the
  same file names in ``images/`` + ``masks/``), or ``images/`` + ``masks/`` folders holding one
  file per slice (numbered file names). Each slice is one sample.
- ``folders``: ``images/`` + ``masks/`` (or ``labels/``) matched by file stem; binary masks become
  instances by connected components, instance masks are renumbered 1..N.
- ``coco``: one COCO JSON (``annotations.json``) with ``images/``; polygons, compressed and
  uncompressed RLE; ``iscrowd`` regions become :attr:`Sample.ignore`.
- ``nifti``: ``.nii`` / ``.nii.gz`` volumes (nibabel, optional) read slice by slice along
  ``--nifti_axis``, paired like TIFF stacks (also nnU-Net's ``imagesTr`` / ``labelsTr``).

Any of them may sit in ``train/``, ``val/``, ``test/`` folders, which fixes
:attr:`Sample.split`; volumes named ``training*`` / ``testing*`` do too.

Folds are grouped so that near-identical pictures never sit on both sides of a split: patches keep
their source image's group, and slices of a volume are grouped in blocks of ``slice_block``
consecutive slices (group id ``"training.tif:block0"``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
import tifffile
from scipy import ndimage

from errors import UserError

log = logging.getLogger(__name__)

FORMATS = ("auto", "nuinsseg", "stack", "folders", "coco", "nifti")
DETECT_ORDER = ("coco", "nuinsseg", "nifti", "stack", "folders")  # most specific layout first
IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
MASK_EXTS = (".png", ".tif", ".tiff", ".bmp")  # lossless only: JPEG destroys label values
TIFF_EXTS = (".tif", ".tiff")
NIFTI_EXTS = (".nii.gz", ".nii")
IMAGE_DIRS = ("images", "imgs", "image")
MASK_DIRS = ("masks", "labels", "mask", "label", "groundtruth", "gt")
# A label file is named like its image plus one of these (training.tif -> training_groundtruth.tif).
LABEL_SUFFIXES = ("_groundtruth", "_gt", "_labels", "_label", "_masks", "_mask", "_seg")
SPLIT_DIRS = {"train": "train", "training": "train", "val": "val", "valid": "val",
              "validation": "val", "test": "test", "testing": "test"}
PERCENTILES = (1.0, 99.8)  # 16-bit and float images are scaled to uint8 between these
FOLDS_FILE = "folds.json"


# --------------------------------------------------------------------------------------------
# The sample record
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Sample:
    """One 2-D training / evaluation example: a whole image, a volume slice or a patch of either.

    Attributes:
        image: ``HxWx3`` uint8 RGB.
        labels: ``HxW`` int32 instance labels, 0 background, objects numbered 1..N.
        group: fold group; patches keep their source's group, volume slices share one per block.
        tag: tissue / organ / volume name, for per-tag summaries and metrics.
        path: the image (or volume) file the pixels came from.
        source: ``path`` relative to the data directory (stable across machines; used in keys).
        label_path: the label file, None for COCO.
        slice_index: index of the slice in its volume (None for 2-D images).
        volume: volume id (relative path) for slices, None for 2-D images.
        offset: ``(y, x)`` of the patch's top-left corner in its source image.
        source_shape: ``(H, W)`` of the whole source image or slice.
        split: "train" / "val" / "test" when the data has a fixed split, else None.
        ignore: ``HxW`` bool of ambiguous pixels (NuInsSeg vague areas, COCO crowd) or None.
    """

    image: np.ndarray
    labels: np.ndarray
    group: str
    tag: str
    path: Path
    source: str
    label_path: Path | None = None
    slice_index: int | None = None
    volume: str | None = None
    offset: tuple[int, int] = (0, 0)
    source_shape: tuple[int, int] | None = None
    split: str | None = None
    ignore: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.source_shape is None:
            self.source_shape = tuple(self.image.shape[:2])  # type: ignore[assignment]

    def __repr__(self) -> str:
        h, w = self.image.shape[:2]
        return (f"Sample({self.key!r}, {w}x{h}, {self.num_objects} objects, group={self.group!r}, "
                f"tag={self.tag!r}, split={self.split!r})")

    @property
    def num_objects(self) -> int:
        """Number of instances (labels are consecutive 1..N)."""
        return int(self.labels.max()) if self.labels.size else 0

    @property
    def is_patch(self) -> bool:
        return tuple(self.image.shape[:2]) != tuple(self.source_shape) or self.offset != (0, 0)

    @property
    def key(self) -> str:
        """Unique, machine-independent id: ``source[slice]@y,x:HxW``."""
        key = self.source
        if self.slice_index is not None:
            key += f"[{self.slice_index}]"
        if self.is_patch:
            h, w = self.image.shape[:2]
            key += f"@{self.offset[0]},{self.offset[1]}:{h}x{w}"
        return key


# --------------------------------------------------------------------------------------------
# Files and pixels
# --------------------------------------------------------------------------------------------
def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _ext(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _stem(path: Path) -> str:
    ext = _ext(path)
    return path.name[: -len(ext)] if ext else path.name


def _files(directory: Path, exts: Sequence[str]) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and _visible(p) and _ext(p) in exts)


def _subdir(directory: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (directory / name).is_dir():
            return directory / name
    return None


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def _corrupt(path: Path, exc: object) -> UserError:
    return UserError(f"cannot read {path}: {exc}; the file is corrupt, truncated or not an image "
                     "- re-export or re-download it, or remove it from the data directory")


def _read_tiff(path: Path) -> tuple[np.ndarray, str]:
    """Read the first series of a TIFF; returns the array and its tifffile axes (``QYX``, ``YXS``)."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return series.asarray(), series.axes
    except Exception as exc:  # noqa: BLE001 - tifffile/imagecodecs raise many kinds
        raise _corrupt(path, exc) from exc


def _tiff_is_volume(path: Path) -> bool:
    try:
        with tifffile.TiffFile(path) as tif:
            shape, axes = tif.series[0].shape, tif.series[0].axes
    except Exception as exc:  # noqa: BLE001
        raise _corrupt(path, exc) from exc
    return len(shape) - (axes.endswith("S")) >= 3


def read_image_file(path: Path) -> np.ndarray:
    """Read one 2-D image or label file as stored: ``HxW`` or ``HxWxC`` (RGB order), any dtype."""
    path = Path(path)
    if _ext(path) in TIFF_EXTS:
        array, axes = _read_tiff(path)
        if array.ndim == 3 and axes.startswith("S") and not axes.endswith("S"):
            array = np.moveaxis(array, 0, -1)  # planar RGB
        elif array.ndim == 3 and not axes.endswith("S") or array.ndim > 3:
            raise UserError(f"{path} holds a stack of shape {array.shape} (axes {axes}), not one "
                            "image; use --data_format stack for volumes")
        return array
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise _corrupt(path, exc) from exc
    array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if array is None:
        raise _corrupt(path, "not decodable")
    if array.ndim == 3 and array.shape[2] == 3:
        array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA)
    return array


def scale_to_uint8(array: np.ndarray, percentiles: tuple[float, float] = PERCENTILES) -> np.ndarray:
    """uint8 stays as it is; anything else is scaled linearly between two percentiles to 0..255."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    values = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = np.percentile(values, percentiles)
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(array.shape, np.uint8)
    scaled = (values - lo) * (255.0 / (hi - lo))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def to_rgb(array: np.ndarray, path: Path | str = "image") -> np.ndarray:
    """``HxW`` / ``HxWx1`` / ``HxWx3`` / ``HxWx4`` of any dtype -> ``HxWx3`` uint8 (percentile scaling)."""
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[..., :3]  # drop alpha
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise UserError(f"{path}: image of shape {array.shape} is neither grayscale nor RGB; "
                        "convert it to 1 or 3 channels")
    array = scale_to_uint8(array)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array)


def _check_label_values(array: np.ndarray, path: Path | str, allow_float: bool = False) -> np.ndarray:
    """Reject float (unless integral and allowed) and negative labels; returns an integer array."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        integral = np.all(np.isfinite(array)) and np.all(np.mod(array, 1) == 0)
        if not (allow_float and integral):
            raise UserError(f"{path}: label file has dtype {array.dtype}; labels must be integers "
                            "(0 = background, 1..N objects or 0/255 binary) - save it as uint8/uint16")
        array = array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise UserError(f"{path}: label file has unsupported dtype {array.dtype}; use uint8/uint16")
    if np.issubdtype(array.dtype, np.signedinteger) and array.size and array.min() < 0:
        raise UserError(f"{path}: label file has negative values (min {array.min()}); labels must "
                        "be 0 for background and positive for objects")
    return array


def relabel_consecutive(labels: np.ndarray) -> np.ndarray:
    """Renumber the non-zero values of ``labels`` (any non-negative integers) to 1..N, int32."""
    if labels.size == 0:
        return labels.astype(np.int32)
    top = int(labels.max())
    if top < 1 << 24:
        present = np.bincount(labels.ravel().astype(np.intp, copy=False), minlength=top + 1) > 0
        present[0] = False
        lut = (np.cumsum(present) * present).astype(np.int32)
        return lut[labels]
    values, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape).astype(np.int32)
    return inverse if values[0] == 0 else inverse + 1


def to_instance_labels(array: np.ndarray, path: Path | str = "labels",
                       allow_float: bool = False) -> np.ndarray:
    """A label image as stored -> ``HxW`` int32 instances.

    Binary masks (one non-zero value: 0/1, 0/255, bool) become instances by 8-connected components;
    instance masks (several values) are renumbered 1..N, keeping each value one object.
    """
    if array.ndim == 3 and array.shape[2] in (3, 4):
        first = array[..., 0]
        if not (np.array_equal(first, array[..., 1]) and np.array_equal(first, array[..., 2])):
            raise UserError(f"{path}: label image has {array.shape[2]} different color channels; "
                            "save instance labels as a single-channel image")
        array = array[..., 0]
    if array.ndim != 2:
        raise UserError(f"{path}: label image has shape {array.shape}; expected a 2-D image")
    array = _check_label_values(array, path, allow_float)
    if array.size and array.max() > 0 and _num_values_at_most_one(array):
        _, components = cv2.connectedComponents((array > 0).astype(np.uint8), connectivity=8)
        return components.astype(np.int32)
    return relabel_consecutive(array)


def _num_values_at_most_one(array: np.ndarray) -> bool:
    """True when ``array`` has a single non-zero value (a binary mask)."""
    first = array.max()
    return not np.any((array != 0) & (array != first))


def _image_and_labels(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = to_rgb(read_image_file(image_path), image_path)
    labels = to_instance_labels(read_image_file(mask_path), mask_path)
    if image.shape[:2] != labels.shape:
        raise UserError(f"size mismatch: image {image_path} is {image.shape[1]}x{image.shape[0]} "
                        f"but its mask {mask_path} is {labels.shape[1]}x{labels.shape[0]} (WxH); "
                        "image and mask must have the same size")
    return image, labels


# --------------------------------------------------------------------------------------------
# Pairing images with masks
# --------------------------------------------------------------------------------------------
def _label_stem_candidates(stem: str) -> list[str]:
    candidates = [stem] + [stem + suffix for suffix in LABEL_SUFFIXES]
    nnunet = re.sub(r"_\d{4}$", "", stem)  # nnU-Net channel suffix: case_0000 -> case
    if nnunet != stem:
        candidates.append(nnunet)
    return candidates


def _by_stem(files: Iterable[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in files:
        stem = _stem(path)
        if stem in found:
            raise UserError(f"two files with the same name stem {stem!r}: {found[stem]} and {path}; "
                            "keep one per name so images and masks match unambiguously")
        found[stem] = path
    return found


def pair_files(images: Sequence[Path], masks: Sequence[Path], where: Path) -> list[tuple[Path, Path]]:
    """Match image files to mask files by stem (``a.png`` <-> ``a.tif`` / ``a_mask.png``).

    Raises :class:`UserError` naming the files when an image has no mask or a mask no image.
    """
    mask_by_stem = _by_stem(masks)
    pairs, lonely_images, used = [], [], set()
    for image in images:
        match = next((c for c in _label_stem_candidates(_stem(image)) if c in mask_by_stem), None)
        if match is None or match in used:
            lonely_images.append(image)
            continue
        used.add(match)
        pairs.append((image, mask_by_stem[match]))
    if lonely_images:
        names = ", ".join(str(p) for p in lonely_images[:3])
        more = f" and {len(lonely_images) - 3} more" if len(lonely_images) > 3 else ""
        raise UserError(f"{len(lonely_images)} image(s) without a mask in {where}: {names}{more}; "
                        "each image needs a mask with the same file name stem")
    lonely_masks = [p for s, p in mask_by_stem.items() if s not in used]
    if lonely_masks:
        names = ", ".join(str(p) for p in lonely_masks[:3])
        more = f" and {len(lonely_masks) - 3} more" if len(lonely_masks) > 3 else ""
        raise UserError(f"{len(lonely_masks)} mask(s) without an image in {where}: {names}{more}; "
                        "remove them or add the matching images")
    return pairs


def _volume_pairs(directory: Path, exts: Sequence[str]) -> list[tuple[Path, Path]]:
    """Pairs ``X.ext`` + ``X_groundtruth.ext`` (or another label suffix) inside one folder."""
    files = _files(directory, exts)
    by_stem = {_stem(p): p for p in files}
    pairs = []
    for stem, path in by_stem.items():
        for suffix in LABEL_SUFFIXES:
            if stem.endswith(suffix) and stem[: -len(suffix)] in by_stem:
                pairs.append((by_stem[stem[: -len(suffix)]], path))
                break
    paired = {p for pair in pairs for p in pair}
    lonely = [p for p in files if p not in paired]
    if pairs and lonely:
        raise UserError(f"{lonely[0]} has no matching label volume in {directory} (expected a file "
                        f"named like it plus one of {', '.join(LABEL_SUFFIXES)}); add it or remove it")
    return sorted(pairs)


def _split_of_name(stem: str) -> str | None:
    """A fixed split from a volume's name: ``training`` / ``testing`` (EPFL), ``train_1``, ``val``."""
    match = re.match(r"(train|training|test|testing|val|valid|validation)(?![a-z])", stem.lower())
    return SPLIT_DIRS[match.group(1)] if match else None


def _numeric(stems: Iterable[str]) -> bool:
    stems = list(stems)
    return len(stems) > 1 and all(re.fullmatch(r"\d+", s) for s in stems)


# --------------------------------------------------------------------------------------------
# Readers: each returns whole-image samples; ``root`` is the data directory given by the user
# --------------------------------------------------------------------------------------------
def _folder_pair_dirs(directory: Path) -> tuple[Path, Path] | None:
    images, masks = _subdir(directory, IMAGE_DIRS), _subdir(directory, MASK_DIRS)
    return (images, masks) if images and masks else None


def read_folders(directory: Path, root: Path, split: str | None = None, slice_block: int = 10,
                 as_slices: bool = False) -> list[Sample]:
    """``images/`` + ``masks/`` matched by stem. ``as_slices``: the files are consecutive slices of
    one volume (sorted by number), grouped in blocks of ``slice_block``."""
    dirs = _folder_pair_dirs(directory)
    if dirs is None:
        raise UserError(f"{directory} has no images/ and masks/ folders (found: "
                        f"{', '.join(sorted(p.name for p in directory.iterdir())) or 'nothing'})")
    image_dir, mask_dir = dirs
    images, masks = _files(image_dir, IMAGE_EXTS), _files(mask_dir, MASK_EXTS + (".jpg", ".jpeg"))
    if not images:
        raise UserError(f"no images found in {image_dir} (looked for {', '.join(IMAGE_EXTS)})")
    jpeg_masks = [p for p in masks if _ext(p) in (".jpg", ".jpeg")]
    if jpeg_masks:
        raise UserError(f"{jpeg_masks[0]}: masks must be lossless (PNG or TIFF); JPEG changes label "
                        "values at object edges")
    pairs = pair_files(images, masks, directory)
    if as_slices:
        pairs.sort(key=lambda pair: (int(_stem(pair[0])) if _stem(pair[0]).isdigit() else 0, _stem(pair[0])))
    elif _numeric(_stem(p) for p, _ in pairs):
        log.warning("%s: numbered file names look like consecutive slices of a volume; with "
                    "--data_format folders each image is its own fold group (use --data_format "
                    "stack to keep neighbouring slices together)", image_dir)
    volume = _rel(image_dir, root)
    samples = []
    for index, (image_path, mask_path) in enumerate(pairs):
        image, labels = _image_and_labels(image_path, mask_path)
        source = _rel(image_path, root)
        common = dict(image=image, labels=labels, tag=root.name, path=image_path, source=source,
                      label_path=mask_path, split=split)
        if as_slices:
            samples.append(Sample(group=f"{volume}:block{index // slice_block}", slice_index=index,
                                  volume=volume, **common))
        else:
            samples.append(Sample(group=source, **common))
    return samples


def _find_nuinsseg_organs(directory: Path) -> list[Path]:
    if (directory / "tissue images").is_dir():
        return [directory]
    return sorted(p for p in directory.iterdir() if p.is_dir() and (p / "tissue images").is_dir())


def read_nuinsseg(directory: Path, root: Path, split: str | None = None) -> list[Sample]:
    """NuInsSeg: ``<organ>/tissue images/*.png`` + ``<organ>/label masks[ modify]/*.tif``."""
    organs = _find_nuinsseg_organs(directory)
    if not organs:
        raise UserError(f"{directory} has no '<organ>/tissue images' folders (NuInsSeg layout)")
    samples = []
    for organ in organs:
        images = _files(organ / "tissue images", IMAGE_EXTS)
        if not images:
            raise UserError(f"no images found in {organ / 'tissue images'}")
        label_dir = organ / "label masks modify"
        if not label_dir.is_dir():
            label_dir = organ / "label masks"
        if not label_dir.is_dir():
            raise UserError(f"{organ} has tissue images but no 'label masks' folder; add the "
                            "instance label TIFFs there")
        log.debug("%s: labels from %s", organ.name, label_dir.name)
        vague_dirs = [d for d in (organ / "vague areas" / "mask binary",
                                  organ / "vague areas" / "mask binary_vague") if d.is_dir()]
        vague = {_stem(p): p for d in vague_dirs for p in _files(d, MASK_EXTS)}
        for image_path, mask_path in pair_files(images, _files(label_dir, MASK_EXTS), organ):
            image, labels = _image_and_labels(image_path, mask_path)
            ignore = None
            if _stem(image_path) in vague:
                ignore = read_image_file(vague[_stem(image_path)])
                ignore = (ignore[..., 0] if ignore.ndim == 3 else ignore) > 0
                if ignore.shape != labels.shape:
                    raise UserError(f"size mismatch: {vague[_stem(image_path)]} is {ignore.shape} "
                                    f"but {image_path} is {labels.shape}")
            source = _rel(image_path, root)
            samples.append(Sample(image=image, labels=labels, group=source, tag=organ.name,
                                  path=image_path, source=source, label_path=mask_path,
                                  split=split, ignore=ignore))
    return samples


def _volume_axes(array: np.ndarray, axes: str, path: Path, is_label: bool) -> np.ndarray:
    """Bring a TIFF series to ``ZxHxW`` (labels, gray) or ``ZxHxW[x3]`` (images)."""
    color = axes.endswith("S") and not is_label
    if array.ndim == 2 or (array.ndim == 3 and color):
        return array[None]  # a single slice
    if array.ndim == 3 or (array.ndim == 4 and color):
        return array
    raise UserError(f"{path}: TIFF of shape {array.shape} (axes {axes}) is not a Z x H x W volume")


def _volume_samples(image_vol: np.ndarray, label_vol: np.ndarray, image_path: Path,
                    label_path: Path, root: Path, split: str | None, slice_block: int,
                    allow_float: bool = False) -> list[Sample]:
    if image_vol.shape[0] != label_vol.shape[0]:
        raise UserError(f"{image_path} has {image_vol.shape[0]} slices but its labels {label_path} "
                        f"have {label_vol.shape[0]}; they must hold the same slices")
    if image_vol.shape[1:3] != label_vol.shape[1:3]:
        raise UserError(f"size mismatch: slices of {image_path} are {image_vol.shape[1:3]} but "
                        f"those of {label_path} are {label_vol.shape[1:3]}")
    image_vol = scale_to_uint8(image_vol)  # one intensity scale for the whole volume
    source = _rel(image_path, root)
    split = split or _split_of_name(_stem(image_path))
    samples = []
    for z in range(image_vol.shape[0]):
        samples.append(Sample(
            image=to_rgb(image_vol[z], image_path),
            labels=to_instance_labels(label_vol[z], f"{label_path} slice {z}", allow_float),
            group=f"{source}:block{z // slice_block}", tag=_stem(image_path), path=image_path,
            source=source, label_path=label_path, slice_index=z, volume=source, split=split))
    return samples


def read_stack(directory: Path, root: Path, split: str | None = None,
               slice_block: int = 10) -> list[Sample]:
    """TIFF volumes with label volumes, or ``images/`` + ``masks/`` of per-slice files."""
    pairs = _volume_pairs(directory, TIFF_EXTS)
    if not pairs and _folder_pair_dirs(directory):
        image_dir, mask_dir = _folder_pair_dirs(directory)  # type: ignore[misc]
        images = _files(image_dir, IMAGE_EXTS)
        if images and _ext(images[0]) in TIFF_EXTS and _tiff_is_volume(images[0]):
            pairs = pair_files(images, _files(mask_dir, MASK_EXTS), directory)
        else:
            return read_folders(directory, root, split, slice_block, as_slices=True)
    if not pairs:
        raise UserError(f"no TIFF volumes found in {directory} (expected e.g. training.tif with "
                        "training_groundtruth.tif, or images/ and masks/ folders)")
    samples = []
    for image_path, label_path in pairs:
        image_vol = _volume_axes(*_read_tiff(image_path), image_path, is_label=False)
        label_vol = _volume_axes(*_read_tiff(label_path), label_path, is_label=True)
        samples += _volume_samples(image_vol, label_vol, image_path, label_path, root, split, slice_block)
    return samples


def _load_nifti(path: Path, axis: int) -> np.ndarray:
    try:
        import nibabel as nib
    except ImportError as exc:
        raise UserError(f"reading NIfTI ({path}) needs the optional package nibabel: "
                        "pip install nibabel") from exc
    try:
        image = nib.as_closest_canonical(nib.load(str(path)))
        array = np.asanyarray(image.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds
        raise _corrupt(path, exc) from exc
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise UserError(f"{path}: NIfTI of shape {array.shape} is not a 3-D volume")
    return np.moveaxis(array, axis, 0)


def read_nifti(directory: Path, root: Path, split: str | None = None, slice_block: int = 10,
               axis: int = 2) -> list[Sample]:
    """NIfTI volumes + label volumes, read as slices along ``axis`` (after RAS reorientation)."""
    layouts: list[tuple[list[tuple[Path, Path]], str | None]] = []
    pairs = _volume_pairs(directory, NIFTI_EXTS)
    if pairs:
        layouts.append((pairs, split))
    nnunet = (("imagesTr", "labelsTr", "train"), ("imagesTs", "labelsTs", "test"))
    for image_name, label_name, fixed in nnunet:
        if (directory / image_name).is_dir() and (directory / label_name).is_dir():
            layouts.append((pair_files(_files(directory / image_name, NIFTI_EXTS),
                                       _files(directory / label_name, NIFTI_EXTS), directory), fixed))
    dirs = _folder_pair_dirs(directory)
    if dirs:
        pairs = pair_files(_files(dirs[0], NIFTI_EXTS), _files(dirs[1], NIFTI_EXTS), directory)
        layouts.append((pairs, split))
    if not any(pairs for pairs, _ in layouts):
        raise UserError(f"no NIfTI volumes found in {directory} (expected X.nii.gz with "
                        "X_seg.nii.gz, images/ + labels/, or imagesTr/ + labelsTr/)")
    samples = []
    for pairs, fixed in layouts:
        for image_path, label_path in pairs:
            image_vol, label_vol = _load_nifti(image_path, axis), _load_nifti(label_path, axis)
            samples += _volume_samples(image_vol, label_vol, image_path, label_path, root, fixed,
                                       slice_block, allow_float=True)
    return samples


# ---- COCO -----------------------------------------------------------------------------------
def rle_decode(rle: dict, path: Path | str = "annotation") -> np.ndarray:
    """Decode a COCO RLE (compressed string or uncompressed list of counts) to ``HxW`` bool.

    Counts run column-major (Fortran order) and start with background, as in pycocotools.
    """
    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: RLE segmentation without a valid 'size' and 'counts'") from exc
    if isinstance(counts, (str, bytes)):
        counts = _rle_string_to_counts(counts.decode() if isinstance(counts, bytes) else counts)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size and (counts.min() < 0 or counts.sum() != height * width):
        raise UserError(f"{path}: RLE counts add up to {counts.sum()} pixels but size is "
                        f"{height}x{width}; the annotation is corrupt")
    values = np.zeros(counts.size, dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    if flat.size != height * width:
        raise UserError(f"{path}: RLE does not cover its {height}x{width} size")
    return flat.reshape((width, height)).T


def _rle_string_to_counts(text: str) -> list[int]:
    """pycocotools' LEB128-like string (6 bits per char, offset 48, deltas after the 2nd count)."""
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            char = ord(text[pos]) - 48
            value |= (char & 0x1F) << (5 * shift)
            more = bool(char & 0x20)
            pos += 1
            shift += 1
            if not more and (char & 0x10):
                value |= -1 << (5 * shift)
            if more and pos >= len(text):
                raise UserError("compressed RLE string ends in the middle of a number")
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def _polygon_area(segmentation: list) -> float:
    area = 0.0
    for poly in segmentation:
        pts = np.asarray(poly, dtype=np.float32).reshape(-1, 2)
        if len(pts) >= 3:
            area += abs(float(cv2.contourArea(pts)))
    return area


def _annotation_area(ann: dict) -> float:
    if "area" in ann:
        return float(ann["area"])
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        return _polygon_area(seg)
    if isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        return float(sum(seg["counts"][1::2]))
    return 0.0


def _paint_annotation(ann: dict, target: np.ndarray, value: int | bool, path: Path) -> bool:
    """Paint one annotation's region into ``target``; False when it has no segmentation."""
    seg = ann.get("segmentation")
    height, width = target.shape
    if isinstance(seg, list):
        polys = [np.round(np.asarray(p, dtype=np.float64).reshape(-1, 2)).astype(np.int32)
                 for p in seg if len(p) >= 6]
        if not polys:
            return False
        allpts = np.concatenate(polys)
        x0, y0 = np.clip(allpts.min(0), 0, [width - 1, height - 1])
        x1, y1 = np.clip(allpts.max(0), 0, [width - 1, height - 1])
        canvas = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
        cv2.fillPoly(canvas, [p - [x0, y0] for p in polys], 1)
        target[y0:y1 + 1, x0:x1 + 1][canvas > 0] = value
        return True
    if isinstance(seg, dict):
        mask = rle_decode(seg, f"{path} annotation {ann.get('id')}")
        if mask.shape != target.shape:
            raise UserError(f"{path}: annotation {ann.get('id')} has RLE size {mask.shape} but its "
                            f"image is {target.shape}")
        target[mask] = value
        return True
    return False


def _is_coco_file(path: Path) -> bool:
    """Cheap test for a COCO file: the JSON mentions an "annotations" key (streamed, any size)."""
    needle, tail = b'"annotations"', b""
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                if needle in tail + chunk:
                    return True
                tail = chunk[-len(needle):]
    except OSError:
        return False
    return False


def _find_coco_json(directory: Path) -> Path | None:
    candidates = _files(directory, (".json",))
    if (directory / "annotations").is_dir():
        candidates += _files(directory / "annotations", (".json",))
    candidates = [p for p in candidates if _is_coco_file(p)]
    if len(candidates) > 1:
        preferred = [p for p in candidates if p.name in ("annotations.json", "_annotations.coco.json")]
        if len(preferred) != 1:
            raise UserError(f"several JSON files in {directory}: {', '.join(p.name for p in candidates)}; "
                            "keep one COCO annotation file (annotations.json) per folder")
        return preferred[0]
    return candidates[0] if candidates else None


def read_coco(directory: Path, root: Path, split: str | None = None) -> list[Sample]:
    """COCO instances: polygons and RLE; ``iscrowd`` regions go to :attr:`Sample.ignore`."""
    json_path = _find_coco_json(directory)
    if json_path is None:
        raise UserError(f"no COCO annotation file (a JSON with 'images' and 'annotations', e.g. "
                        f"annotations.json) found in {directory}")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(json_path, exc) from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise UserError(f"{json_path} is not a COCO annotation file (needs 'images' and 'annotations' lists)")
    search = [json_path.parent / "images", json_path.parent, directory / "images", directory]
    entries, missing = [], []
    for info in data["images"]:
        name = str(info.get("file_name", ""))
        found = next((d / name for d in search if name and (d / name).is_file()), None)
        if found is None:
            missing.append(name)
        entries.append((info, found))
    if missing:
        raise UserError(f"{json_path} references {len(missing)} image(s) that do not exist, e.g. "
                        f"{missing[0]!r} (looked in {', '.join(str(d) for d in search[:2])}); copy "
                        "the images there or fix their file_name")
    if not entries:
        raise UserError(f"no images found: {json_path} lists no images")
    anns_by_image: dict[object, list[dict]] = defaultdict(list)
    known = {info.get("id") for info, _ in entries}
    for ann in data["annotations"]:
        if ann.get("image_id") not in known:
            raise UserError(f"{json_path}: annotation {ann.get('id')} refers to image_id "
                            f"{ann.get('image_id')!r}, which is not in 'images'")
        anns_by_image[ann.get("image_id")].append(ann)
    samples, no_mask, hidden = [], 0, 0
    for info, image_path in entries:
        image = to_rgb(read_image_file(image_path), image_path)
        height, width = image.shape[:2]
        if (info.get("height"), info.get("width")) not in ((None, None), (height, width)):
            raise UserError(f"size mismatch: {json_path} says {image_path.name} is "
                            f"{info.get('width')}x{info.get('height')} but the file is {width}x{height}")
        labels = np.zeros((height, width), np.int32)
        ignore = np.zeros((height, width), bool)
        objects = [a for a in anns_by_image[info.get("id")] if not a.get("iscrowd")]
        # Larger objects first, so a small object drawn over a large one stays visible.
        objects.sort(key=_annotation_area, reverse=True)
        painted = 0
        for ann in objects:
            if _paint_annotation(ann, labels, painted + 1, json_path):
                painted += 1
            else:
                no_mask += 1
        for ann in anns_by_image[info.get("id")]:
            if ann.get("iscrowd"):
                _paint_annotation(ann, ignore, True, json_path)
        relabeled = relabel_consecutive(labels)
        hidden += painted - int(relabeled.max())
        source = _rel(image_path, root)
        samples.append(Sample(image=image, labels=relabeled, group=source, tag=root.name,
                              path=image_path, source=source, label_path=json_path, split=split,
                              ignore=ignore if ignore.any() else None))
    if no_mask:
        if no_mask == sum(len(v) for v in anns_by_image.values()):
            raise UserError(f"{json_path}: no annotation has a segmentation (boxes only?); "
                            "fine-tuning SAM needs masks")
        log.warning("%s: %d annotation(s) without a polygon or RLE were skipped", json_path, no_mask)
    if hidden:
        log.warning("%s: %d object(s) entirely covered by other objects were dropped", json_path, hidden)
    return samples


# --------------------------------------------------------------------------------------------
# Layout detection and the loader
# --------------------------------------------------------------------------------------------
def _looks_like(fmt: str, directory: Path) -> str:
    """What in ``directory`` suggests layout ``fmt`` (empty string: nothing)."""
    if fmt == "coco":
        found = _find_coco_json(directory)
        return f"a COCO annotation file ({found.name})" if found else ""
    if fmt == "nuinsseg":
        organs = _find_nuinsseg_organs(directory)
        return f"{len(organs)} NuInsSeg '<organ>/tissue images' folder(s)" if organs else ""
    if fmt == "nifti":
        places = [directory] + [directory / n for n in IMAGE_DIRS + ("imagesTr", "imagesTs")]
        count = sum(len(_files(p, NIFTI_EXTS)) for p in places if p.is_dir())
        return f"{count} NIfTI file(s)" if count else ""
    if fmt == "stack":
        pairs = _volume_pairs(directory, TIFF_EXTS)
        if pairs:
            return "TIFF volume(s) with label volumes: " + ", ".join(
                f"{a.name} + {b.name}" for a, b in pairs)
        dirs = _folder_pair_dirs(directory)
        if not dirs:
            return ""
        images = _files(dirs[0], IMAGE_EXTS)
        if images and _ext(images[0]) in TIFF_EXTS and _tiff_is_volume(images[0]):
            return f"multi-page TIFF volumes in {dirs[0].name}/ and {dirs[1].name}/"
        if _numeric(_stem(p) for p in images):
            return (f"{len(images)} numbered slices in {dirs[0].name}/ and {dirs[1].name}/, read "
                    "as one volume (use --data_format folders for unrelated images)")
        return ""
    if fmt == "folders":
        dirs = _folder_pair_dirs(directory)
        return f"{dirs[0].name}/ and {dirs[1].name}/ folders" if dirs else ""
    return ""


def detect_format(directory: Path) -> str:
    """Guess the layout of ``directory`` (one of :data:`FORMATS` except auto) and log why."""
    directory = Path(directory)
    for fmt in DETECT_ORDER:
        what = _looks_like(fmt, directory)
        if what:
            log.info("data: %s has %s -> --data_format %s", directory, what, fmt)
            return fmt
    found = ", ".join(sorted(p.name for p in directory.iterdir() if _visible(p))[:10]) or "nothing"
    raise UserError(f"no images found: cannot recognise the layout of {directory} (it holds: "
                    f"{found}); expected images/ + masks/, NuInsSeg organ folders, EPFL-style "
                    "TIFF stacks, a COCO annotations.json or NIfTI volumes")


def _split_dirs(directory: Path) -> list[tuple[Path, str]]:
    return [(p, SPLIT_DIRS[p.name.lower()]) for p in sorted(directory.iterdir())
            if p.is_dir() and p.name.lower() in SPLIT_DIRS]


def _read(fmt: str, directory: Path, root: Path, split: str | None, slice_block: int,
          nifti_axis: int) -> list[Sample]:
    if fmt == "nuinsseg":
        return read_nuinsseg(directory, root, split)
    if fmt == "stack":
        return read_stack(directory, root, split, slice_block)
    if fmt == "folders":
        return read_folders(directory, root, split, slice_block)
    if fmt == "coco":
        return read_coco(directory, root, split)
    if fmt == "nifti":
        return read_nifti(directory, root, split, slice_block, nifti_axis)
    raise UserError(f"unknown --data_format {fmt!r}; choose one of {', '.join(FORMATS)}")


def load_dataset(data_dir: str | os.PathLike, data_format: str = "auto", patch_size: int = 0,
                 patch_overlap: int = 0, drop_empty_patches: bool = False, slice_block: int = 10,
                 nifti_axis: int = 2) -> list[Sample]:
    """Read every sample under ``data_dir``, optionally cut into patches.

    Args:
        data_dir: the data directory (any layout in the module docstring, possibly inside
            ``train/``, ``val/``, ``test/`` folders).
        data_format: one of :data:`FORMATS`; ``auto`` detects and logs it.
        patch_size: side of square patches (0 = whole images); images smaller than it stay whole
            along that side.
        patch_overlap: pixels shared by neighbouring patches (0 <= overlap < patch_size).
        drop_empty_patches: drop patches (or whole images when ``patch_size`` is 0) without objects.
        slice_block: consecutive volume slices that share one fold group.
        nifti_axis: the axis NIfTI volumes are sliced along.

    Returns:
        Samples in a deterministic order (sorted files, slices, then patches row by row).
    """
    data_dir = Path(data_dir).expanduser()
    if data_format not in FORMATS:
        raise UserError(f"unknown --data_format {data_format!r}; choose one of {', '.join(FORMATS)}")
    if patch_size < 0:
        raise UserError(f"--patch_size must be 0 (whole images) or positive, got {patch_size}")
    if patch_overlap < 0 or (patch_size and patch_overlap >= patch_size):
        raise UserError(f"--patch_overlap must be in 0..patch_size-1, got {patch_overlap} "
                        f"for --patch_size {patch_size}")
    if slice_block < 1:
        raise UserError(f"--slice_block must be at least 1, got {slice_block}")
    if nifti_axis not in (0, 1, 2):
        raise UserError(f"--nifti_axis must be 0, 1 or 2, got {nifti_axis}")
    if not data_dir.is_dir():
        raise UserError(f"--data_dir {data_dir} is not a directory")

    fmt = data_format
    if fmt == "auto" and not any(_looks_like(f, data_dir) for f in DETECT_ORDER) and _split_dirs(data_dir):
        parts = [(d, s, detect_format(d)) for d, s in _split_dirs(data_dir)]
    elif fmt != "auto" and not _looks_like(fmt, data_dir) and _split_dirs(data_dir):
        parts = [(d, s, fmt) for d, s in _split_dirs(data_dir)]
    else:
        parts = [(data_dir, None, detect_format(data_dir) if fmt == "auto" else fmt)]
    samples: list[Sample] = []
    for directory, split, part_format in parts:
        samples += _read(part_format, directory, data_dir, split, slice_block, nifti_axis)
    if not samples:
        raise UserError(f"no images found in {data_dir}")
    if patch_size:
        samples = [p for s in samples for p in make_patches(s, patch_size, patch_overlap)]
    if drop_empty_patches:
        kept = [s for s in samples if s.num_objects > 0]
        log.info("data: dropped %d of %d %s without objects", len(samples) - len(kept), len(samples),
                 "patches" if patch_size else "images")
        if not kept:
            raise UserError(f"empty dataset after filtering: none of the {len(samples)} "
                            f"{'patches' if patch_size else 'images'} from {data_dir} contains an "
                            "object; check the masks or leave out --drop_empty_patches")
        samples = kept
    return samples


# --------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------
def _starts(length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)  # last patch flush with the border, no padding
    return starts


def make_patches(sample: Sample, patch_size: int, overlap: int = 0) -> list[Sample]:
    """Cut ``sample`` into ``patch_size`` squares (copies), row by row, keeping source and group.

    Patches overlap by at least ``overlap`` pixels; the last row / column is shifted to end at the
    border. A side shorter than ``patch_size`` is kept whole. Labels are renumbered 1..N per patch.
    """
    if patch_size <= 0 or overlap < 0 or overlap >= patch_size:
        raise ValueError(f"bad patch_size {patch_size} / overlap {overlap}")
    height, width = sample.labels.shape
    stride = patch_size - overlap
    patches = []
    for y in _starts(height, patch_size, stride):
        for x in _starts(width, patch_size, stride):
            window = (slice(y, y + patch_size), slice(x, x + patch_size))
            patches.append(Sample(
                image=sample.image[window].copy(),
                labels=relabel_consecutive(sample.labels[window]),
                group=sample.group, tag=sample.tag, path=sample.path, source=sample.source,
                label_path=sample.label_path, slice_index=sample.slice_index, volume=sample.volume,
                offset=(sample.offset[0] + y, sample.offset[1] + x), source_shape=sample.source_shape,
                split=sample.split,
                ignore=None if sample.ignore is None else sample.ignore[window].copy()))
    return patches


# --------------------------------------------------------------------------------------------
# Folds
# --------------------------------------------------------------------------------------------
Fold = tuple[list[int], list[int]]


def fold_group(sample: Sample, slice_block: int = 10) -> str:
    """The group a sample is split by: its volume block for slices, else :attr:`Sample.group`."""
    if sample.volume is not None and sample.slice_index is not None:
        return f"{sample.volume}:block{sample.slice_index // slice_block}"
    return sample.group


def split_test(samples: Sequence[Sample]) -> tuple[list[int], list[int]]:
    """Indices of (train + val + unsplit samples, fixed test samples)."""
    test = [i for i, s in enumerate(samples) if s.split == "test"]
    return [i for i, s in enumerate(samples) if s.split != "test"], test


def _groups(samples: Sequence[Sample], indices: Sequence[int], slice_block: int) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i in indices:
        groups[fold_group(samples[i], slice_block)].append(i)
    return groups


def make_folds(samples: Sequence[Sample], num_folds: int, seed: int = 0,
               slice_block: int = 10) -> list[Fold]:
    """Seeded group k-fold over the samples that are not in a fixed test split.

    Groups (see :func:`fold_group`) are shuffled with ``seed``, then assigned largest first to the
    fold with the fewest samples, so folds are balanced and no group is on both sides of a split.

    Returns:
        ``num_folds`` pairs of sorted (train indices, validation indices) into ``samples``.
    """
    if num_folds < 2:
        raise UserError(f"k-fold cross-validation needs at least 2 folds, got {num_folds}; "
                        "use a single train/validation split (make_holdout) instead")
    if slice_block < 1:
        raise UserError(f"--slice_block must be at least 1, got {slice_block}")
    trainval, test = split_test(samples)
    if not trainval:
        raise UserError(f"all {len(samples)} samples are in the fixed test split; nothing to train on")
    groups = _groups(samples, trainval, slice_block)
    if num_folds > len(groups):
        raise UserError(f"cannot make {num_folds} folds from {len(groups)} groups of images "
                        f"(patches of one image, or {slice_block} consecutive slices, form a group); "
                        f"use at most {len(groups)} folds or a smaller --slice_block")
    rng = np.random.default_rng(seed)
    names = sorted(groups)
    names = [names[i] for i in rng.permutation(len(names))]
    names.sort(key=lambda g: -len(groups[g]))  # stable: equal sizes keep the seeded order
    sizes = [0] * num_folds
    members: list[list[int]] = [[] for _ in range(num_folds)]
    for name in names:
        fold = int(np.argmin(sizes))
        members[fold] += groups[name]
        sizes[fold] += len(groups[name])
    folds = []
    for k in range(num_folds):
        val = sorted(members[k])
        val_set = set(val)
        folds.append(([i for i in trainval if i not in val_set], val))
    if test:
        log.info("data: %d fixed test samples are left out of the folds", len(test))
    if any(samples[i].split == "val" for i in trainval):
        log.info("data: k-fold pools the fixed train and val splits")
    return folds


def make_holdout(samples: Sequence[Sample], val_fraction: float = 0.2, seed: int = 0,
                 slice_block: int = 10) -> Fold:
    """One grouped train / validation split of the non-test samples.

    A fixed ``val`` split in the data is used as it is; otherwise seeded shuffled groups go to
    validation until it holds at least ``val_fraction`` of the samples (at least one group, and
    at least one group left for training).
    """
    trainval, _ = split_test(samples)
    fixed_val = [i for i in trainval if samples[i].split == "val"]
    if fixed_val:
        log.info("data: using the fixed validation split (%d samples)", len(fixed_val))
        return [i for i in trainval if samples[i].split != "val"], fixed_val
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"the validation fraction must be between 0 and 1, got {val_fraction}")
    groups = _groups(samples, trainval, slice_block)
    if len(groups) < 2:
        raise UserError(f"cannot split {len(groups)} group(s) into training and validation; "
                        "add images or use a smaller --slice_block")
    rng = np.random.default_rng(seed)
    names = sorted(groups)
    names = [names[i] for i in rng.permutation(len(names))]
    val: list[int] = []
    for name in names[:-1]:
        if val and len(val) >= val_fraction * len(trainval):
            break
        val += groups[name]
    val_set = set(val)
    return [i for i in trainval if i not in val_set], sorted(val)


def save_folds(path: str | os.PathLike, folds: Sequence[Fold], samples: Sequence[Sample],
               slice_block: int = 10, seed: int | None = None) -> Path:
    """Write the folds (indices, group ids and sample keys) to ``path`` (a file or a directory,
    which gets ``folds.json``). Returns the file written."""
    path = Path(path)
    if path.is_dir():
        path = path / FOLDS_FILE
    _, test = split_test(samples)
    record = {
        "format": "samlora-folds", "version": 1, "seed": seed, "slice_block": slice_block,
        "samples": [{"key": s.key, "group": fold_group(s, slice_block), "split": s.split}
                    for s in samples],
        "test": test,
        "folds": [{"train": list(map(int, train)), "val": list(map(int, val)),
                   "train_groups": sorted({fold_group(samples[i], slice_block) for i in train}),
                   "val_groups": sorted({fold_group(samples[i], slice_block) for i in val}),
                   "val_paths": sorted({samples[i].source for i in val})}
                  for train, val in folds],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    tmp.replace(path)
    return path


def load_folds(path: str | os.PathLike, samples: Sequence[Sample]) -> list[Fold]:
    """Read folds written by :func:`save_folds` and check they were made for these ``samples``."""
    path = Path(path)
    if path.is_dir():
        path = path / FOLDS_FILE
    fresh = "use a fresh --output_dir, or the same data and data options as the run that wrote it"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        slice_block = int(record["slice_block"])
        stored = record["samples"]
        folds = [(list(f["train"]), list(f["val"])) for f in record["folds"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot read {path}: {exc}; {fresh}") from exc
    if len(stored) != len(samples):
        raise UserError(f"{path} was made for {len(stored)} samples but the data now has "
                        f"{len(samples)}; {fresh}")
    for i, (entry, sample) in enumerate(zip(stored, samples, strict=True)):
        if entry.get("key") != sample.key or entry.get("group") != fold_group(sample, slice_block):
            raise UserError(f"{path} does not match the data: sample {i} was {entry.get('key')!r} "
                            f"(group {entry.get('group')!r}), now {sample.key!r}; {fresh}")
    for train, val in folds:
        if any(not 0 <= i < len(samples) for i in train + val):
            raise UserError(f"{path} has sample indices out of range; {fresh}")
        shared = {fold_group(samples[i], slice_block) for i in train} & \
                 {fold_group(samples[i], slice_block) for i in val}
        if shared:
            raise UserError(f"{path} puts group {sorted(shared)[0]!r} on both sides of a split; {fresh}")
    return folds


def load_or_make_folds(output_dir: str | os.PathLike, samples: Sequence[Sample], num_folds: int,
                       seed: int = 0, slice_block: int = 10, val_fraction: float = 0.2) -> list[Fold]:
    """Re-use ``output_dir/folds.json`` when it exists (checked), else make and write it.

    ``num_folds`` >= 2 gives k folds; 1 gives one grouped holdout split with ``val_fraction``.
    """
    path = Path(output_dir) / FOLDS_FILE
    if path.is_file():
        folds = load_folds(path, samples)
        if len(folds) != max(num_folds, 1):
            raise UserError(f"{path} holds {len(folds)} fold(s) but {num_folds} were asked for; "
                            "use a fresh --output_dir or the same number of folds")
        log.info("data: re-using the folds in %s", path)
        return folds
    folds = make_folds(samples, num_folds, seed, slice_block) if num_folds >= 2 else \
        [make_holdout(samples, val_fraction, seed, slice_block)]
    save_folds(path, folds, samples, slice_block=slice_block, seed=seed)
    log.info("data: wrote %s", path)
    return folds


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------
@dataclass
class Prompts:
    """Prompts for N objects of one image (pixel coordinates of that image, SAM conventions).

    Attributes:
        boxes: ``Nx4`` float32 XYXY, inclusive max corner (as SAM's ``batched_mask_to_box``).
        points: ``NxKx2`` float32 (x, y), K = 2 * num_points: positives first, then negatives.
        point_labels: ``NxK`` int32: 1 positive, 0 negative, -1 padding (no point).
        masks: ``NxHxW`` bool target masks.
        object_ids: ``N`` int32 label values of the objects.
        use_boxes / use_points: which prompts to give the model for this image.
        mask_inputs: ``NxHxW`` bool, the object's own mask as a prompt, or None.
    """

    boxes: np.ndarray
    points: np.ndarray
    point_labels: np.ndarray
    masks: np.ndarray
    object_ids: np.ndarray
    use_boxes: bool
    use_points: bool
    mask_inputs: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.object_ids.shape[0])


PROMPT_MODES = ("box", "point", "mix")


def sample_prompts(labels: np.ndarray, rng: np.random.Generator, prompt: str = "box",
                   num_points: int = 1, box_jitter: float = 0.1, max_objects: int | None = None,
                   mask_prompt: bool = False, ignore: np.ndarray | None = None) -> Prompts:
    """Sample training prompts for the objects of one ``HxW`` label image.

    Args:
        labels: ``HxW`` integer instance labels (0 background).
        rng: a seeded ``numpy.random.Generator``.
        prompt: "box", "point" or "mix" (per call one of box / points / box + points).
        num_points: k positive points inside the object and k negative points outside it
            (near the object when possible, never in ``ignore``).
        box_jitter: each box side moves by up to this fraction of the box width / height.
        max_objects: keep a random subset of at most this many objects (None or 0 = all).
        mask_prompt: also return each object's mask as a mask prompt.
        ignore: ``HxW`` bool of ambiguous pixels.
    """
    if prompt not in PROMPT_MODES:
        raise ValueError(f"prompt must be one of {PROMPT_MODES}, got {prompt!r}")
    if num_points < 0 or (prompt == "point" and num_points == 0):
        raise ValueError(f"num_points must be >= 1 for point prompts, got {num_points}")
    if not 0.0 <= box_jitter < 0.5:
        raise ValueError(f"box_jitter must be in [0, 0.5), got {box_jitter}")
    if labels.ndim != 2:
        raise ValueError(f"labels must be HxW, got shape {labels.shape}")
    height, width = labels.shape
    slices = ndimage.find_objects(labels.astype(np.int32, copy=False)) if labels.size else []
    ids = np.array([i + 1 for i, s in enumerate(slices) if s is not None], dtype=np.int32)
    if max_objects and ids.size > max_objects:
        ids = np.sort(rng.choice(ids, size=max_objects, replace=False)).astype(np.int32)
    mode = prompt if prompt != "mix" else ("box", "point", "box+point")[int(rng.integers(3))]
    k = num_points
    n = ids.size
    boxes = np.zeros((n, 4), np.float32)
    points = np.zeros((n, 2 * k, 2), np.float32)
    point_labels = np.zeros((n, 2 * k), np.int32)
    point_labels[:, :k] = 1
    masks = np.zeros((n, height, width), bool)
    for row, obj in enumerate(ids):
        ys, xs = slices[obj - 1]
        local = labels[ys, xs] == obj
        masks[row, ys, xs] = local
        x0, y0, x1, y1 = xs.start, ys.start, xs.stop - 1, ys.stop - 1
        w, h = x1 - x0 + 1, y1 - y0 + 1
        box = np.array([x0, y0, x1, y1], np.float64)
        if box_jitter > 0:
            box += rng.uniform(-box_jitter, box_jitter, size=4) * np.array([w, h, w, h])
        box = np.clip(box, 0, [width - 1, height - 1, width - 1, height - 1])
        box[2], box[3] = max(box[2], box[0]), max(box[3], box[1])
        boxes[row] = box
        if k:
            inside = np.flatnonzero(local)
            pick = rng.choice(inside, size=k, replace=inside.size < k)
            points[row, :k, 0] = x0 + pick % w
            points[row, :k, 1] = y0 + pick // w
            points[row, k:], point_labels[row, k:] = _negative_points(
                labels, obj, (y0, y1, x0, x1), k, rng, ignore)
    return Prompts(boxes=boxes, points=points, point_labels=point_labels, masks=masks,
                   object_ids=ids, use_boxes="box" in mode, use_points="point" in mode,
                   mask_inputs=masks.copy() if mask_prompt else None)


def _negative_points(labels: np.ndarray, obj: int, bounds: tuple[int, int, int, int], k: int,
                     rng: np.random.Generator, ignore: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """k points outside object ``obj``: in its box grown by half its size, else anywhere."""
    height, width = labels.shape
    y0, y1, x0, x1 = bounds
    my, mx = max(2, (y1 - y0 + 1) // 2), max(2, (x1 - x0 + 1) // 2)
    ya, yb, xa, xb = max(0, y0 - my), min(height, y1 + my + 1), max(0, x0 - mx), min(width, x1 + mx + 1)
    for window in ((slice(ya, yb), slice(xa, xb)), (slice(0, height), slice(0, width))):
        allowed = labels[window] != obj
        if ignore is not None:
            allowed &= ~ignore[window]
        candidates = np.flatnonzero(allowed)
        if candidates.size:
            pick = rng.choice(candidates, size=k, replace=candidates.size < k)
            w = window[1].stop - window[1].start
            xy = np.stack([window[1].start + pick % w, window[0].start + pick // w], axis=1)
            return xy.astype(np.float32), np.zeros(k, np.int32)
    return np.zeros((k, 2), np.float32), np.full(k, -1, np.int32)  # the object fills the image


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------
def augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
            ignore: np.ndarray | None = None, enabled: bool = True, brightness: float = 0.1,
            contrast: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Random flip + 90-degree rotation (one of the 8 symmetries of the square) applied alike to
    ``image`` (``HxWx3`` uint8), ``labels`` (``HxW``) and ``ignore``; then brightness / contrast
    on the image only (contrast factor in 1 +- ``contrast`` around the mean, shift of up to
    ``brightness`` x 255). ``enabled=False`` (validation) returns the inputs untouched.

    Returns:
        ``(image, labels, ignore)``; rotations swap H and W of non-square inputs.
    """
    if not enabled:
        return image, labels, ignore
    flip, turns = bool(rng.random() < 0.5), int(rng.integers(4))

    def geometric(array: np.ndarray) -> np.ndarray:
        if not flip and turns == 0:
            return array  # the identity: no copy
        if flip:
            array = array[:, ::-1]
        return np.ascontiguousarray(np.rot90(array, turns))

    image, labels = geometric(image), geometric(labels)
    ignore = None if ignore is None else geometric(ignore)
    if brightness > 0 or contrast > 0:
        factor = 1.0 + rng.uniform(-contrast, contrast)
        shift = rng.uniform(-brightness, brightness) * 255.0
        mean = float(image.mean())
        image = np.clip((image.astype(np.float32) - mean) * factor + mean + shift, 0, 255)
        image = np.round(image).astype(np.uint8)
    return image, labels, ignore


# --------------------------------------------------------------------------------------------
# Summary and command-line options
# --------------------------------------------------------------------------------------------
def summarize_dataset(samples: Sequence[Sample], folds: Sequence[Fold] | None = None,
                      slice_block: int = 10) -> str:
    """A few lines for the log: counts, sizes, objects per sample, tags, splits and folds."""
    if not samples:
        return "dataset: empty"
    objects = np.array([s.num_objects for s in samples])
    sizes = Counter(f"{s.image.shape[1]}x{s.image.shape[0]}" for s in samples)
    sources = {s.source for s in samples}
    patches = sum(s.is_patch for s in samples)
    groups = {fold_group(s, slice_block) for s in samples}
    size_text = ", ".join(f"{size} ({n})" for size, n in sizes.most_common(4))
    if len(sizes) > 4:
        size_text += f", ... {len(sizes)} sizes"
    lines = [
        f"dataset: {len(samples)} samples ({patches} patches) from {len(sources)} files, "
        f"{len(groups)} fold groups",
        f"  sizes (WxH): {size_text}",
        f"  objects per sample: mean {objects.mean():.1f}, min {objects.min()}, max {objects.max()}, "
        f"total {objects.sum()}; {int((objects == 0).sum())} samples without objects",
    ]
    tags: dict[str, list[int]] = defaultdict(list)
    for s in samples:
        tags[s.tag].append(s.num_objects)
    lines.append("  tags: " + ", ".join(f"{t} {len(v)} samples / {sum(v)} objects"
                                          for t, v in sorted(tags.items())))
    splits = Counter(s.split or "unsplit" for s in samples)
    if set(splits) != {"unsplit"}:
        lines.append("  fixed split: " + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())))
    for k, (train, val) in enumerate(folds or []):
        n_train = len({fold_group(samples[i], slice_block) for i in train})
        n_val = len({fold_group(samples[i], slice_block) for i in val})
        lines.append(f"  fold {k}: train {len(train)} samples / {n_train} groups, "
                     f"val {len(val)} samples / {n_val} groups")
    return "\n".join(lines)


def log_summary(samples: Sequence[Sample], folds: Sequence[Fold] | None = None,
                slice_block: int = 10) -> None:
    for line in summarize_dataset(samples, folds, slice_block).splitlines():
        log.info("%s", line)


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True) -> argparse._ArgumentGroup:
    """Add the ``data`` option group shared by every command that reads data."""
    group = parser.add_argument_group("data")
    group.add_argument("--data_dir", type=Path, required=required,
                       help="data directory (images/ + masks/, NuInsSeg organ folders, EPFL TIFF "
                            "stacks, COCO annotations.json or NIfTI volumes; optionally in "
                            "train/ val/ test/ folders)")
    group.add_argument("--data_format", choices=FORMATS, default="auto",
                       help="layout of --data_dir; auto detects it and logs what it found")
    group.add_argument("--patch_size", type=int, default=0,
                       help="cut images into square patches of this side in pixels (e.g. 256); "
                            "0 = whole images. Patches of one image stay in one fold")
    group.add_argument("--patch_overlap", type=int, default=0,
                       help="pixels shared by neighbouring patches (less than --patch_size)")
    group.add_argument("--drop_empty_patches", action="store_true",
                       help="drop patches (whole images when --patch_size is 0) without objects")
    group.add_argument("--slice_block", type=int, default=10,
                       help="consecutive slices of a volume that always share a fold, so "
                            "neighbouring near-identical slices never sit on both sides")
    group.add_argument("--nifti_axis", type=int, choices=(0, 1, 2), default=2,
                       help="axis NIfTI volumes are sliced along (after RAS reorientation; 2 = axial)")
    group.add_argument("--max_objects", type=int, default=32,
                       help="at most this many objects per image get prompts in one training step "
                            "(0 = all)")
    return group


def load_from_args(args: argparse.Namespace) -> list[Sample]:
    """:func:`load_dataset` with the options of :func:`add_data_arguments`; logs the summary."""
    if getattr(args, "max_objects", 0) < 0:
        raise UserError(f"--max_objects must be 0 (all) or positive, got {args.max_objects}")
    samples = load_dataset(args.data_dir, args.data_format, args.patch_size,
                           patch_overlap=args.patch_overlap,
                           drop_empty_patches=args.drop_empty_patches,
                           slice_block=args.slice_block, nifti_axis=args.nifti_axis)
    log_summary(samples, slice_block=args.slice_block)
    return samples
