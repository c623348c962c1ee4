"""The dataset layouts: detecting them, pairing their files and reading them into whole-image samples.

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
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from samlora.core.errors import UserError
from samlora.data.coco import find_coco_json, read_coco
from samlora.data.images import (
    IMAGE_EXTS,
    MASK_EXTS,
    NIFTI_EXTS,
    TIFF_EXTS,
    MaskKind,
    corrupt_file_error,
    file_ext,
    file_stem,
    is_visible,
    list_files,
    read_image_and_labels,
    read_image_file,
    read_tiff,
    relative_name,
    scale_to_uint8,
    tiff_is_volume,
    to_instance_labels,
    to_rgb,
)
from samlora.data.sample import Sample

log = logging.getLogger(__name__)

FORMATS = ("auto", "nuinsseg", "stack", "folders", "coco", "nifti")
DETECT_ORDER = ("coco", "nuinsseg", "nifti", "stack", "folders")  # most specific layout first
IMAGE_DIRS = ("images", "imgs", "image")
MASK_DIRS = ("masks", "labels", "mask", "label", "groundtruth", "gt")
# A label file is named like its image plus one of these (training.tif -> training_groundtruth.tif).
LABEL_SUFFIXES = ("_groundtruth", "_gt", "_labels", "_label", "_masks", "_mask", "_seg")
SPLIT_DIRS = {"train": "train", "training": "train", "val": "val", "valid": "val",
              "validation": "val", "test": "test", "testing": "test"}


# --------------------------------------------------------------------------------------------
# Pairing images with masks
# --------------------------------------------------------------------------------------------
def _subdir(directory: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (directory / name).is_dir():
            return directory / name
    return None


def _label_stem_candidates(stem: str) -> list[str]:
    candidates = [stem] + [stem + suffix for suffix in LABEL_SUFFIXES]
    nnunet = re.sub(r"_\d{4}$", "", stem)  # nnU-Net channel suffix: case_0000 -> case
    if nnunet != stem:
        candidates.append(nnunet)
    return candidates


def _by_stem(files: Iterable[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in files:
        stem = file_stem(path)
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
        match = next((c for c in _label_stem_candidates(file_stem(image)) if c in mask_by_stem), None)
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
    files = list_files(directory, exts)
    by_stem = {file_stem(p): p for p in files}
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
@dataclass(frozen=True)
class ReadOptions:
    """How label files are read: volume slices grouped in blocks of ``slice_block``, NIfTI sliced
    along ``nifti_axis``, masks interpreted per ``mask_type`` (images.MASK_TYPES)."""

    slice_block: int = 10
    nifti_axis: int = 2
    mask_type: str = "auto"


def _mask_fields(kind: MaskKind) -> dict:
    return {"mask_kind": kind.kind, "mask_close": kind.close}


def _folder_pair_dirs(directory: Path) -> tuple[Path, Path] | None:
    images, masks = _subdir(directory, IMAGE_DIRS), _subdir(directory, MASK_DIRS)
    return (images, masks) if images and masks else None


def read_folders(directory: Path, root: Path, split: str | None = None, options: ReadOptions = ReadOptions(),
                 as_slices: bool = False) -> list[Sample]:
    """``images/`` + ``masks/`` matched by stem. ``as_slices``: the files are consecutive slices of
    one volume (sorted by number), grouped in blocks of ``options.slice_block``."""
    dirs = _folder_pair_dirs(directory)
    if dirs is None:
        raise UserError(f"{directory} has no images/ and masks/ folders (found: "
                        f"{', '.join(sorted(p.name for p in directory.iterdir())) or 'nothing'})")
    image_dir, mask_dir = dirs
    images, masks = list_files(image_dir, IMAGE_EXTS), list_files(mask_dir, MASK_EXTS + (".jpg", ".jpeg"))
    if not images:
        raise UserError(f"no images found in {image_dir} (looked for {', '.join(IMAGE_EXTS)})")
    jpeg_masks = [p for p in masks if file_ext(p) in (".jpg", ".jpeg")]
    if jpeg_masks:
        raise UserError(f"{jpeg_masks[0]}: masks must be lossless (PNG or TIFF); JPEG changes label "
                        "values at object edges")
    pairs = pair_files(images, masks, directory)
    if as_slices:
        pairs.sort(key=lambda pair: (int(file_stem(pair[0])) if file_stem(pair[0]).isdigit() else 0,
                                     file_stem(pair[0])))
    elif _numeric(file_stem(p) for p, _ in pairs):
        log.warning("%s: numbered file names look like consecutive slices of a volume; with "
                    "--data_format folders each image is its own fold group (use --data_format "
                    "stack to keep neighbouring slices together)", image_dir)
    volume = relative_name(image_dir, root)
    samples = []
    for index, (image_path, mask_path) in enumerate(pairs):
        image, labels, kind = read_image_and_labels(image_path, mask_path, options.mask_type)
        source = relative_name(image_path, root)
        common = dict(image=image, labels=labels, tag=root.name, path=image_path, source=source,
                      label_path=mask_path, split=split, **_mask_fields(kind))
        if as_slices:
            samples.append(Sample(group=f"{volume}:block{index // options.slice_block}", slice_index=index,
                                  volume=volume, **common))
        else:
            samples.append(Sample(group=source, **common))
    return samples


def _find_nuinsseg_organs(directory: Path) -> list[Path]:
    if (directory / "tissue images").is_dir():
        return [directory]
    return sorted(p for p in directory.iterdir() if p.is_dir() and (p / "tissue images").is_dir())


def read_nuinsseg(directory: Path, root: Path, split: str | None = None,
                  options: ReadOptions = ReadOptions()) -> list[Sample]:
    """NuInsSeg: ``<organ>/tissue images/*.png`` + ``<organ>/label masks[ modify]/*.tif``."""
    organs = _find_nuinsseg_organs(directory)
    if not organs:
        raise UserError(f"{directory} has no '<organ>/tissue images' folders (NuInsSeg layout)")
    samples = []
    for organ in organs:
        images = list_files(organ / "tissue images", IMAGE_EXTS)
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
        vague = {file_stem(p): p for d in vague_dirs for p in list_files(d, MASK_EXTS)}
        for image_path, mask_path in pair_files(images, list_files(label_dir, MASK_EXTS), organ):
            image, labels, kind = read_image_and_labels(image_path, mask_path, options.mask_type)
            ignore = None
            if file_stem(image_path) in vague:
                ignore = read_image_file(vague[file_stem(image_path)])
                ignore = (ignore[..., 0] if ignore.ndim == 3 else ignore) > 0
                if ignore.shape != labels.shape:
                    raise UserError(f"size mismatch: {vague[file_stem(image_path)]} is {ignore.shape} "
                                    f"but {image_path} is {labels.shape}")
            source = relative_name(image_path, root)
            samples.append(Sample(image=image, labels=labels, group=source, tag=organ.name,
                                  path=image_path, source=source, label_path=mask_path,
                                  split=split, ignore=ignore, **_mask_fields(kind)))
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
                    label_path: Path, root: Path, split: str | None, options: ReadOptions,
                    allow_float: bool = False) -> list[Sample]:
    if image_vol.shape[0] != label_vol.shape[0]:
        raise UserError(f"{image_path} has {image_vol.shape[0]} slices but its labels {label_path} "
                        f"have {label_vol.shape[0]}; they must hold the same slices")
    if image_vol.shape[1:3] != label_vol.shape[1:3]:
        raise UserError(f"size mismatch: slices of {image_path} are {image_vol.shape[1:3]} but "
                        f"those of {label_path} are {label_vol.shape[1:3]}")
    image_vol = scale_to_uint8(image_vol)  # one intensity scale for the whole volume
    source = relative_name(image_path, root)
    split = split or _split_of_name(file_stem(image_path))
    samples = []
    for z in range(image_vol.shape[0]):
        labels, kind = to_instance_labels(label_vol[z], f"{label_path} slice {z}", allow_float, options.mask_type)
        samples.append(Sample(
            image=to_rgb(image_vol[z], image_path), labels=labels,
            group=f"{source}:block{z // options.slice_block}", tag=file_stem(image_path), path=image_path,
            source=source, label_path=label_path, slice_index=z, volume=source, split=split,
            **_mask_fields(kind)))
    return samples


def read_stack(directory: Path, root: Path, split: str | None = None,
               options: ReadOptions = ReadOptions()) -> list[Sample]:
    """TIFF volumes with label volumes, or ``images/`` + ``masks/`` of per-slice files."""
    pairs = _volume_pairs(directory, TIFF_EXTS)
    if not pairs and _folder_pair_dirs(directory):
        image_dir, mask_dir = _folder_pair_dirs(directory)  # type: ignore[misc]
        images = list_files(image_dir, IMAGE_EXTS)
        if images and file_ext(images[0]) in TIFF_EXTS and tiff_is_volume(images[0]):
            pairs = pair_files(images, list_files(mask_dir, MASK_EXTS), directory)
        else:
            return read_folders(directory, root, split, options, as_slices=True)
    if not pairs:
        raise UserError(f"no TIFF volumes found in {directory} (expected e.g. training.tif with "
                        "training_groundtruth.tif, or images/ and masks/ folders)")
    samples = []
    for image_path, label_path in pairs:
        image_vol = _volume_axes(*read_tiff(image_path), image_path, is_label=False)
        label_vol = _volume_axes(*read_tiff(label_path), label_path, is_label=True)
        samples += _volume_samples(image_vol, label_vol, image_path, label_path, root, split, options)
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
        raise corrupt_file_error(path, exc) from exc
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise UserError(f"{path}: NIfTI of shape {array.shape} is not a 3-D volume")
    return np.moveaxis(array, axis, 0)


def read_nifti(directory: Path, root: Path, split: str | None = None,
               options: ReadOptions = ReadOptions()) -> list[Sample]:
    """NIfTI volumes + label volumes, read as slices along ``options.nifti_axis`` (after RAS
    reorientation)."""
    axis = options.nifti_axis
    layouts: list[tuple[list[tuple[Path, Path]], str | None]] = []
    pairs = _volume_pairs(directory, NIFTI_EXTS)
    if pairs:
        layouts.append((pairs, split))
    nnunet = (("imagesTr", "labelsTr", "train"), ("imagesTs", "labelsTs", "test"))
    for image_name, label_name, fixed in nnunet:
        if (directory / image_name).is_dir() and (directory / label_name).is_dir():
            layouts.append((pair_files(list_files(directory / image_name, NIFTI_EXTS),
                                       list_files(directory / label_name, NIFTI_EXTS), directory), fixed))
    dirs = _folder_pair_dirs(directory)
    if dirs:
        pairs = pair_files(list_files(dirs[0], NIFTI_EXTS), list_files(dirs[1], NIFTI_EXTS), directory)
        layouts.append((pairs, split))
    if not any(pairs for pairs, _ in layouts):
        raise UserError(f"no NIfTI volumes found in {directory} (expected X.nii.gz with "
                        "X_seg.nii.gz, images/ + labels/, or imagesTr/ + labelsTr/)")
    samples = []
    for pairs, fixed in layouts:
        for image_path, label_path in pairs:
            image_vol, label_vol = _load_nifti(image_path, axis), _load_nifti(label_path, axis)
            samples += _volume_samples(image_vol, label_vol, image_path, label_path, root, fixed,
                                       options, allow_float=True)
    return samples


# --------------------------------------------------------------------------------------------
# Layout detection and dispatch
# --------------------------------------------------------------------------------------------
def _looks_like(fmt: str, directory: Path) -> str:
    """What in ``directory`` suggests layout ``fmt`` (empty string: nothing)."""
    if fmt == "coco":
        found = find_coco_json(directory)
        return f"a COCO annotation file ({found.name})" if found else ""
    if fmt == "nuinsseg":
        organs = _find_nuinsseg_organs(directory)
        return f"{len(organs)} NuInsSeg '<organ>/tissue images' folder(s)" if organs else ""
    if fmt == "nifti":
        places = [directory] + [directory / n for n in IMAGE_DIRS + ("imagesTr", "imagesTs")]
        count = sum(len(list_files(p, NIFTI_EXTS)) for p in places if p.is_dir())
        return f"{count} NIfTI file(s)" if count else ""
    if fmt == "stack":
        pairs = _volume_pairs(directory, TIFF_EXTS)
        if pairs:
            return "TIFF volume(s) with label volumes: " + ", ".join(
                f"{a.name} + {b.name}" for a, b in pairs)
        dirs = _folder_pair_dirs(directory)
        if not dirs:
            return ""
        images = list_files(dirs[0], IMAGE_EXTS)
        if images and file_ext(images[0]) in TIFF_EXTS and tiff_is_volume(images[0]):
            return f"multi-page TIFF volumes in {dirs[0].name}/ and {dirs[1].name}/"
        if _numeric(file_stem(p) for p in images):
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
    found = ", ".join(sorted(p.name for p in directory.iterdir() if is_visible(p))[:10]) or "nothing"
    images = _subdir(directory, IMAGE_DIRS)
    if images is not None and _subdir(directory, MASK_DIRS) is None:
        raise UserError(f"{images} has no masks beside it: add a masks/ (or labels/) folder with a mask for each "
                        "image, named like the image")
    raise UserError(f"no images found: cannot recognise the layout of {directory} (it holds: "
                    f"{found}); expected images/ + masks/, NuInsSeg organ folders, EPFL-style "
                    "TIFF stacks, a COCO annotations.json or NIfTI volumes")


def _split_dirs(directory: Path) -> list[tuple[Path, str]]:
    return [(p, SPLIT_DIRS[p.name.lower()]) for p in sorted(directory.iterdir())
            if p.is_dir() and p.name.lower() in SPLIT_DIRS]


def layout_parts(data_dir: Path, data_format: str) -> list[tuple[Path, str | None, str]]:
    """The folders to read under ``data_dir``: ``(folder, fixed split or None, layout)``.

    ``data_dir`` itself, or its ``train/``, ``val/``, ``test/`` folders when ``data_dir`` does
    not hold the layout itself; ``data_format`` ``auto`` is detected per folder.
    """
    fmt = data_format
    if fmt == "auto" and not any(_looks_like(f, data_dir) for f in DETECT_ORDER) and _split_dirs(data_dir):
        return [(d, s, detect_format(d)) for d, s in _split_dirs(data_dir)]
    if fmt != "auto" and not _looks_like(fmt, data_dir) and _split_dirs(data_dir):
        return [(d, s, fmt) for d, s in _split_dirs(data_dir)]
    return [(data_dir, None, detect_format(data_dir) if fmt == "auto" else fmt)]


def read_layout(fmt: str, directory: Path, root: Path, split: str | None,
                options: ReadOptions = ReadOptions()) -> list[Sample]:
    """Whole-image samples of ``directory`` in layout ``fmt``; sources are relative to ``root``."""
    if fmt == "nuinsseg":
        return read_nuinsseg(directory, root, split, options)
    if fmt == "stack":
        return read_stack(directory, root, split, options)
    if fmt == "folders":
        return read_folders(directory, root, split, options)
    if fmt == "coco":
        return read_coco(directory, root, split)
    if fmt == "nifti":
        return read_nifti(directory, root, split, options)
    raise UserError(f"unknown --data_format {fmt!r}; choose one of {', '.join(FORMATS)}")
