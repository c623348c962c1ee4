"""Image and label files: reading them, and converting pixels to RGB uint8 and instance labels."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import tifffile

from samlora.core.errors import UserError

IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
MASK_EXTS = (".png", ".tif", ".tiff", ".bmp")  # lossless only: JPEG destroys label values
TIFF_EXTS = (".tif", ".tiff")
NIFTI_EXTS = (".nii.gz", ".nii")
PERCENTILES = (1.0, 99.8)  # 16-bit and float images are scaled to uint8 between these


def is_visible(path: Path) -> bool:
    """False for hidden files (``.DS_Store``, ``._x.png`` from macOS copies)."""
    return not path.name.startswith(".")


def file_ext(path: Path) -> str:
    """The lower-case extension, ``.nii.gz`` counted as one."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def file_stem(path: Path) -> str:
    """The file name without :func:`file_ext` (``case.nii.gz`` -> ``case``)."""
    ext = file_ext(path)
    return path.name[: -len(ext)] if ext else path.name


def list_files(directory: Path, exts: Sequence[str]) -> list[Path]:
    """The visible files of ``directory`` with one of ``exts``, sorted."""
    return sorted(p for p in directory.iterdir() if p.is_file() and is_visible(p) and file_ext(p) in exts)


def relative_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` in POSIX form (machine-independent), else its name."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def corrupt_file_error(path: Path, exc: object) -> UserError:
    """The error for a file that cannot be read or decoded."""
    reason = (str(exc).splitlines() or [""])[0][:120] or type(exc).__name__
    return UserError(f"cannot read {path} ({reason}): the file is corrupt, truncated or not an image "
                     "- re-export or re-download it, or remove it from the data directory")


def read_tiff(path: Path) -> tuple[np.ndarray, str]:
    """Read the first series of a TIFF; returns the array and its tifffile axes (``QYX``, ``YXS``)."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return series.asarray(), series.axes
    except Exception as exc:  # noqa: BLE001 - tifffile/imagecodecs raise many kinds
        raise corrupt_file_error(path, exc) from exc


def tiff_is_volume(path: Path) -> bool:
    """True when the TIFF's first series has more than one plane (colour samples aside)."""
    try:
        with tifffile.TiffFile(path) as tif:
            shape, axes = tif.series[0].shape, tif.series[0].axes
    except Exception as exc:  # noqa: BLE001
        raise corrupt_file_error(path, exc) from exc
    return len(shape) - (axes.endswith("S")) >= 3


def read_image_file(path: Path) -> np.ndarray:
    """Read one 2-D image or label file as stored: ``HxW`` or ``HxWxC`` (RGB order), any dtype."""
    path = Path(path)
    if file_ext(path) in TIFF_EXTS:
        array, axes = read_tiff(path)
        if array.ndim == 3 and axes.startswith("S") and not axes.endswith("S"):
            array = np.moveaxis(array, 0, -1)  # planar RGB
        elif array.ndim == 3 and not axes.endswith("S") or array.ndim > 3:
            raise UserError(f"{path} holds a stack of shape {array.shape} (axes {axes}), not one "
                            "image; use --data_format stack for volumes")
        return array
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise corrupt_file_error(path, exc) from exc
    array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if array is None:
        raise corrupt_file_error(path, "not decodable")
    if array.ndim == 3 and array.shape[2] == 3:
        array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA)
    return array


def intensity_limits(array: np.ndarray, percentiles: tuple[float, float] = PERCENTILES) -> tuple[float, float]:
    """``(lo, hi)`` of :func:`scale_to_uint8`: two percentiles of the finite values (NaN and inf as
    0), or the minimum and maximum where the percentiles coincide."""
    values = np.nan_to_num(np.asarray(array, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = np.percentile(values, percentiles)
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    return float(lo), float(hi)


def scale_to_uint8(array: np.ndarray, percentiles: tuple[float, float] = PERCENTILES,
                   limits: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 stays as it is; anything else is scaled linearly to 0..255 between two percentiles,
    or between the given ``limits`` (one scale for every section of a volume)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    values = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = intensity_limits(values, percentiles) if limits is None else limits
    if hi <= lo:
        return np.zeros(array.shape, np.uint8)
    scaled = (values - lo) * (255.0 / (hi - lo))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def to_rgb(array: np.ndarray, path: Path | str = "image", limits: tuple[float, float] | None = None) -> np.ndarray:
    """``HxW`` / ``HxWx1`` / ``HxWx3`` / ``HxWx4`` of any dtype -> ``HxWx3`` uint8 (percentile scaling,
    or between ``limits``)."""
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[..., :3]  # drop alpha
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise UserError(f"{path}: image of shape {array.shape} is neither grayscale nor RGB; "
                        "convert it to 1 or 3 channels")
    array = scale_to_uint8(array, limits=limits)
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


MASK_TYPES = ("auto", "binary", "instance")
# auto: a mask is binary when this share of its non-zero pixels has the top value ...
BINARY_SHARE = 0.98
# ... or, for 0/255-like masks (top value >= 128: antialiased or resized), this share.
ANTIALIASED_SHARE = 0.5


@dataclass(frozen=True)
class MaskKind:
    """How a label image was read: ``kind`` binary or instance; ``close``: auto decided by a small margin."""

    kind: str
    close: bool = False
    share: float = 1.0  # share of the non-zero pixels with the top value


def mask_kind(array: np.ndarray, mask_type: str = "auto") -> MaskKind:
    """Whether an ``HxW`` non-negative integer label image is a binary (foreground) mask or an
    instance mask. ``auto``: binary when nearly all non-zero pixels share the top value, or when it
    is 0/255-like (top value >= 128) with a minority of intermediate values (antialiased or resized
    masks); instance otherwise (several ids, each a share of the objects)."""
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
    nonzero = array[array > 0]
    if mask_type != "auto":
        return MaskKind(mask_type)
    if nonzero.size == 0:
        return MaskKind("binary")
    top = nonzero.max()
    share = float(np.count_nonzero(nonzero == top)) / nonzero.size
    if share >= BINARY_SHARE:
        return MaskKind("binary", close=share < 0.999, share=share)
    if top >= 128 and share >= ANTIALIASED_SHARE:
        return MaskKind("binary", close=share < 0.6, share=share)
    return MaskKind("instance", close=top >= 128 and share >= 0.4, share=share)


def to_instance_labels(array: np.ndarray, path: Path | str = "labels", allow_float: bool = False,
                       mask_type: str = "auto") -> tuple[np.ndarray, MaskKind]:
    """A label image as stored -> (``HxW`` int32 instances, how it was read).

    Binary masks (:func:`mask_kind`) are thresholded at half their top value and split into
    objects by 8-connected components; instance masks are renumbered 1..N, each value one object.
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
    kind = mask_kind(array, mask_type)
    if kind.kind == "binary":
        if not array.size or array.max() == 0:
            return np.zeros(array.shape, np.int32), kind
        foreground = (array > array.max() / 2).astype(np.uint8)
        _, components = cv2.connectedComponents(foreground, connectivity=8)
        return components.astype(np.int32), kind
    return relabel_consecutive(array), kind


def read_image_and_labels(image_path: Path, mask_path: Path,
                          mask_type: str = "auto") -> tuple[np.ndarray, np.ndarray, MaskKind]:
    """Read an image and its mask: ``HxWx3`` uint8 RGB and ``HxW`` int32 instances of one size."""
    image = to_rgb(read_image_file(image_path), image_path)
    labels, kind = to_instance_labels(read_image_file(mask_path), mask_path, mask_type=mask_type)
    if image.shape[:2] != labels.shape:
        raise UserError(f"size mismatch: image {image_path} is {image.shape[1]}x{image.shape[0]} "
                        f"but its mask {mask_path} is {labels.shape[1]}x{labels.shape[0]} (WxH); "
                        "image and mask must have the same size")
    return image, labels, kind


def plane_layout(shape: tuple[int, ...], axes: str, path: Path) -> tuple[bool, bool]:
    """``(planar_rgb, is_stack)`` of a TIFF series of ``shape`` and tifffile ``axes``; refuses
    what is neither a 2-D image nor a 3-D stack (ZYX, gray or RGB)."""
    planar = len(shape) == 3 and axes.startswith("S") and not axes.endswith("S")
    if planar:
        shape, axes = shape[1:] + shape[:1], axes[1:] + "S"
    if "C" in axes:
        raise UserError(f"{path} has {shape[axes.index('C')]} channels (axes {axes}): save the "
                        "channel to segment as a gray image or stack, or the image as RGB")
    spatial = len(shape) - (1 if axes.endswith("S") else 0)
    if spatial == 2:
        return planar, False
    if spatial != 3 or (axes.endswith("S") and shape[-1] not in (1, 3, 4)):
        raise UserError(f"{path} has shape {tuple(shape)} (axes {axes}): only 2-D images and 3-D "
                        "stacks (ZYX, gray or RGB) are supported")
    if shape[0] == 0:
        raise UserError(f"{path} is an empty stack")
    return planar, True


def check_planes(path: Path) -> bool:
    """Refuse an input that is neither a 2-D image nor a 3-D stack, reading a TIFF's header only;
    returns whether it is a stack (read by volume_io.py)."""
    if path.suffix.lower() not in TIFF_EXTS:
        to_rgb(read_image_file(path), path)
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            shape, axes = tuple(tif.series[0].shape), tif.series[0].axes
    except Exception as exc:  # noqa: BLE001 - tifffile/imagecodecs raise many kinds
        raise corrupt_file_error(path, exc) from exc
    return plane_layout(shape, axes, path)[1]
