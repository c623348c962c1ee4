"""Volumes read one section at a time: TIFF stacks page by page, Zarr and OME-Zarr arrays chunk by chunk.

Both are opened as zarr arrays (a TIFF through tifffile's ``aszarr`` store, whose chunks are its
pages or strips), so reading section z reads only the pages or the chunks that hold it, and a
volume larger than memory is never loaded. Images come out as ``HxWx3`` uint8 RGB scaled with one
intensity scale for the whole volume (:func:`volume_limits`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import EllipsisType
from typing import Any, Callable, Literal

import numpy as np
import tifffile

from samlora.core.errors import UserError
from samlora.data.images import IMAGE_EXTS, TIFF_EXTS, corrupt_file_error, intensity_limits, plane_layout, to_rgb

log = logging.getLogger(__name__)

ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
LIMIT_SECTIONS = 32  # the intensity scale of a non-uint8 volume comes from at most this many sections ...
LIMIT_VALUES = 1 << 22  # ... and at most this many of their pixels (evenly strided)


def is_zarr(path: Path) -> bool:
    """Whether ``path`` is a Zarr store (a folder named ``*.zarr`` or holding Zarr metadata)."""
    return path.is_dir() and (path.suffix.lower() == ".zarr" or any((path / m).exists() for m in ZARR_MARKERS))


@dataclass
class Volume:
    """An opened ``ZxHxW`` (gray) or ``ZxHxWx3`` (RGB) volume, read section by section.

    ``array``: a zarr array (any object with ``shape``, ``dtype``, ``chunks`` and ``array[z]``);
    ``kind``: ``tiff`` or ``zarr``; ``limits``: the intensity scale to uint8 (None for uint8).
    """

    path: Path
    array: Any
    kind: str
    limits: tuple[float, float] | None = None
    handle: Any = field(default=None, repr=False)  # the open TIFF file, closed by close()

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(Z, H, W)``."""
        return tuple(int(n) for n in self.array.shape[:3])  # type: ignore[return-value]

    @property
    def chunks(self) -> tuple[int, int, int]:
        """The ``(z, y, x)`` chunking of the source (a TIFF's: one section, its strips or tiles)."""
        return tuple(int(n) for n in self.array.chunks[:3])  # type: ignore[return-value]

    @property
    def zarr_format(self) -> int:
        return int(getattr(getattr(self.array, "metadata", None), "zarr_format", 3))

    def raw(self, z: int | EllipsisType) -> np.ndarray:
        """Section ``z`` as stored: ``HxW`` or ``HxWx3`` (``...``: the whole array, e.g. a 2-D label image)."""
        try:
            return np.asarray(self.array[z])
        except Exception as exc:  # noqa: BLE001 - zarr, tifffile and imagecodecs raise many kinds
            raise corrupt_file_error(self.path, exc) from exc

    def section(self, z: int) -> np.ndarray:
        """Section ``z`` as ``HxWx3`` uint8 RGB, on the volume's intensity scale."""
        return to_rgb(self.raw(z), self.path, self.limits)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def __enter__(self) -> "Volume":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def volume_limits(volume: Volume) -> tuple[float, float] | None:
    """One intensity scale for every section (16-bit and float volumes): the percentiles of
    :func:`images.scale_to_uint8` over up to :data:`LIMIT_SECTIONS` evenly spaced sections, each
    strided so that at most :data:`LIMIT_VALUES` pixels are kept (the whole volume when it is that
    small). None for uint8 volumes."""
    if np.dtype(volume.array.dtype) == np.uint8:
        return None
    depth, height, width = volume.shape
    sections = np.unique(np.linspace(0, depth - 1, min(depth, LIMIT_SECTIONS)).round().astype(int))
    step = max(1, math.ceil(math.sqrt(len(sections) * height * width / LIMIT_VALUES)))
    values = np.concatenate([volume.raw(int(z))[::step, ::step].ravel() for z in sections])
    return intensity_limits(values)


def open_volume(path: Path, limits: tuple[float, float] | None | Literal["scan"] = "scan") -> Volume:
    """Open a TIFF stack or a Zarr / OME-Zarr volume for reading section by section.

    ``limits``: the intensity scale, "scan" to compute it here (:func:`volume_limits`, which reads
    up to :data:`LIMIT_SECTIONS` sections of a non-uint8 volume); a dask worker is given the
    client's, so that every section is scaled alike and the scan runs once.
    Raises :class:`UserError` for what is not a 3-D volume: a Zarr without three spatial axes, a
    channel or time axis of more than one element, a TIFF that is neither.
    """
    volume = _open_zarr(path) if is_zarr(path) else _open_tiff(path)
    try:
        if 0 in volume.shape:
            raise UserError(f"{path} is an empty volume (shape {tuple(volume.array.shape)})")
        volume.limits = volume_limits(volume) if isinstance(limits, str) else limits
    except BaseException:
        volume.close()
        raise
    return volume


def volume_shape(path: Path) -> tuple[int, int, int]:
    """``(Z, H, W)`` of a volume, checked as :func:`open_volume` checks it, from its header alone."""
    with open_volume(path, limits=None) as volume:
        return volume.shape


def _open_tiff(path: Path) -> Volume:
    if path.suffix.lower() not in TIFF_EXTS:
        raise UserError(f"{path} is not a TIFF stack or a Zarr volume")
    return _tiff_volume(path, _check_stack)


def _check_stack(path: Path, series: Any) -> None:
    planar, is_stack = plane_layout(tuple(series.shape), series.axes, path)
    if planar or not is_stack:
        raise UserError(f"{path} is a 2-D image (shape {tuple(series.shape)}), not a stack")


def _tiff_volume(path: Path, check: Callable[[Path, Any], None] | None = None) -> Volume:
    """A TIFF's first series as a zarr array (chunks: its pages or strips), the file kept open
    until :meth:`Volume.close`. ``check(path, series)`` refuses a layout the caller cannot use;
    what tifffile or zarr cannot read is one :class:`UserError`, and the file is closed then."""
    import zarr

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # noqa: BLE001 - tifffile/imagecodecs raise many kinds
        raise corrupt_file_error(path, exc) from exc
    try:
        series = tif.series[0]
        if check is not None:
            check(path, series)
        return Volume(path, zarr.open(series.aszarr(), mode="r"), "tiff", handle=tif)
    except BaseException as exc:
        tif.close()
        if isinstance(exc, UserError):
            raise
        raise corrupt_file_error(path, exc) from exc


def _open_zarr(path: Path) -> Volume:
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - zarr raises many kinds for what is not a store
        raise UserError(f"cannot read {path} as Zarr ({type(exc).__name__}: {str(exc)[:100]}): give a Zarr "
                        "array or an OME-Zarr image") from None
    if isinstance(node, zarr.Group):
        return _ome_zarr(path, node)
    if node.ndim > 3:
        raise UserError(f"{path} has {node.ndim} axes (shape {tuple(node.shape)}): channels (or time points) are "
                        "not expected; save the channel to segment as a ZYX array (or as OME-Zarr with named axes)")
    _check_axes(path, node.shape, "zyx"[-node.ndim:])
    return Volume(path, node, "zarr")


def _ome_zarr(path: Path, group: Any) -> Volume:
    """The full-resolution array of an OME-Zarr image (its first multiscale dataset)."""
    attributes = dict(group.attrs)
    multiscales = attributes.get("multiscales") or attributes.get("ome", {}).get("multiscales")
    if not multiscales:
        arrays = sorted(name for name, _ in group.arrays())
        raise UserError(f"{path} is a Zarr group without OME-Zarr multiscales metadata; give one of its arrays "
                        f"({', '.join(arrays[:4]) or 'it holds none'}) as --input, e.g. {path}/{arrays[0] if arrays else '0'}")
    scale = multiscales[0]
    array = group[scale["datasets"][0]["path"]]
    axes = scale.get("axes") or ["z", "y", "x"][-array.ndim:]
    names = "".join((a["name"] if isinstance(a, dict) else str(a))[0].lower() for a in axes)
    _check_axes(path, array.shape, names)
    squeeze = tuple(i for i, name in enumerate(names) if name not in "zyx")
    if squeeze:
        array = _Squeezed(array, squeeze)
    return Volume(path, array, "zarr")


def _check_axes(path: Path, shape: tuple[int, ...], names: str) -> None:
    """Refuse a Zarr array that is not one gray ZYX volume (time and channel axes of one element pass)."""
    spatial = [n for n in names if n in "zyx"]
    if len(spatial) != 3 or (set(names) - set("zyxtc")):
        raise UserError(f"{path} has {len(shape)} axes (shape {tuple(shape)}, axes {names}): a volume needs 3 "
                        "spatial axes ZYX; save the volume to segment as a 3-D Zarr array")
    extra = {n: shape[i] for i, n in enumerate(names) if n in "tc" and shape[i] != 1}
    if extra:
        what = "channels" if "c" in extra else "time points"
        raise UserError(f"{path} has {max(extra.values())} {what} (shape {tuple(shape)}, axes {names}); detect "
                        f"expects one gray volume: save the {'channel' if 'c' in extra else 'time point'} to "
                        "segment as its own ZYX array")


class _Squeezed:
    """A zarr array seen without its axes of one element (an OME-Zarr ``tczyx`` image as ``zyx``)."""

    def __init__(self, array: Any, squeeze: tuple[int, ...]) -> None:
        self.array, self.squeeze = array, squeeze
        keep = [i for i in range(array.ndim) if i not in squeeze]
        self.shape = tuple(array.shape[i] for i in keep)
        self.chunks = tuple(array.chunks[i] for i in keep)
        self.dtype = array.dtype
        self.metadata = getattr(array, "metadata", None)

    def __getitem__(self, z: int) -> np.ndarray:
        index: list[Any] = [0 if i in self.squeeze else slice(None) for i in range(self.array.ndim)]
        index[next(i for i in range(self.array.ndim) if i not in self.squeeze)] = z
        return np.asarray(self.array[tuple(index)])


def read_seeds(path: Path, shape: tuple[int, int, int], section: int | None = None) -> dict[int, np.ndarray]:
    """``{z: HxW int64 object ids}`` of the annotated sections of a seed label file, read section by
    section: a ZxHxW stack (TIFF or Zarr) of the volume's ``shape`` with zeros in the sections not
    annotated, or one HxW label image of the section ``section``. A value is one object in every
    section it appears in. Raises :class:`UserError` for a shape that does not fit, non-integer or
    negative labels, or no object at all."""
    if not path.exists():
        raise UserError(f"--seed_labels {path} does not exist")
    if is_zarr(path):
        seeds = _open_zarr(path)
    elif path.suffix.lower() in TIFF_EXTS:
        seeds = _tiff_volume(path)
    else:
        raise UserError(f"--seed_labels {path}: give a label TIFF (stack or one section) or a Zarr array")
    with seeds:
        return _seed_sections(seeds, shape, section)


def _seed_sections(seeds: Volume, shape: tuple[int, int, int], section: int | None) -> dict[int, np.ndarray]:
    array, path = seeds.array, seeds.path
    dtype = np.dtype(array.dtype)
    if not (np.issubdtype(dtype, np.integer) or dtype == bool):
        raise UserError(f"--seed_labels {path} has dtype {dtype}: seed labels must be integers (0 = not annotated)")
    two_d = len(array.shape) == 2
    if (two_d and tuple(array.shape) != shape[1:]) or (not two_d and tuple(array.shape) != shape):
        raise UserError(f"--seed_labels {path} has shape {tuple(array.shape)} but the volume is {shape} (Z, H, W): "
                        "give one label image of a section's size, or a stack of the volume's shape")
    if two_d and (section is None or not 0 <= section < shape[0]):
        raise UserError(f"--seed_labels {path} is one section: say which with --seed_section (0..{shape[0] - 1})")
    found = {}
    for z in ([section] if two_d else range(shape[0])):
        labels = seeds.raw(... if two_d else z).astype(np.int64)
        if labels.size and labels.min() < 0:
            raise UserError(f"--seed_labels {path} has negative labels; objects are 1, 2, ... and 0 is background")
        if labels.any():
            found[int(z)] = labels  # type: ignore[index]
    if not found:
        raise UserError(f"--seed_labels {path} holds no object (all zeros)")
    return found


def find_inputs(path: Path) -> list[Path]:
    """``--input``: one image, stack file or Zarr volume, or the image / stack files of a folder (sorted)."""
    if not path.exists():
        raise UserError(f"--input {path} does not exist")
    if is_zarr(path):
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise UserError(f"folder {path} holds no images ({', '.join(IMAGE_EXTS)})")
    elif path.suffix.lower() in IMAGE_EXTS:
        files = [path]
    else:
        raise UserError(f"--input {path} is neither an image ({', '.join(IMAGE_EXTS)}), a folder of "
                        "images nor a TIFF stack")
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise UserError(f"{stems[f.stem].name} and {f.name} would write the same outputs; "
                            "rename one or segment them separately")
        stems[f.stem] = f
    return files
