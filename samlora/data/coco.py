"""COCO instance annotations: RLE and polygons, read into samples and written from label maps."""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import IO, Iterator, Sequence

import cv2
import numpy as np
from scipy import ndimage

from samlora.core import runfiles
from samlora.core.errors import UserError
from samlora.data.images import (
    corrupt_file_error,
    list_files,
    read_image_file,
    relabel_consecutive,
    relative_name,
    to_rgb,
)
from samlora.data.instances import Instance
from samlora.data.sample import Sample

log = logging.getLogger(__name__)

CLASS_NAME = "object"  # the one category of the files detect writes


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


def find_coco_json(directory: Path) -> Path | None:
    """The COCO annotation file in ``directory`` or its ``annotations/`` folder, None if none.

    Several candidates are an error unless exactly one has a conventional name.
    """
    candidates = list_files(directory, (".json",))
    if (directory / "annotations").is_dir():
        candidates += list_files(directory / "annotations", (".json",))
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
    json_path = find_coco_json(directory)
    if json_path is None:
        raise UserError(f"no COCO annotation file (a JSON with 'images' and 'annotations', e.g. "
                        f"annotations.json) found in {directory}")
    data = _load_coco_json(json_path)
    entries = _image_files(data, json_path, directory)
    anns_by_image = _annotations_by_image(data, entries, json_path)
    samples, no_mask, hidden = [], 0, 0
    for info, image_path in entries:
        image = to_rgb(read_image_file(image_path), image_path)
        height, width = image.shape[:2]
        if (info.get("height"), info.get("width")) not in ((None, None), (height, width)):
            raise UserError(f"size mismatch: {json_path} says {image_path.name} is "
                            f"{info.get('width')}x{info.get('height')} but the file is {width}x{height}")
        labels, ignore, skipped, covered = _paint_image(anns_by_image[info.get("id")],
                                                        (height, width), json_path)
        no_mask += skipped
        hidden += covered
        source = relative_name(image_path, root)
        samples.append(Sample(image=image, labels=labels, group=source, tag=root.name,
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


def _load_coco_json(json_path: Path) -> dict:
    """The parsed file, checked to hold ``images`` and ``annotations`` lists."""
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt_file_error(json_path, exc) from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise UserError(f"{json_path} is not a COCO annotation file (needs 'images' and 'annotations' lists)")
    return data


def _image_files(data: dict, json_path: Path, directory: Path) -> list[tuple[dict, Path]]:
    """Each entry of ``images`` with its file, looked up beside the JSON and in ``images/``."""
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
    return entries


def _annotations_by_image(data: dict, entries: list[tuple[dict, Path]],
                          json_path: Path) -> dict[object, list[dict]]:
    """Annotations grouped by ``image_id``; one naming an unknown image is an error."""
    anns_by_image: dict[object, list[dict]] = defaultdict(list)
    known = {info.get("id") for info, _ in entries}
    for ann in data["annotations"]:
        if ann.get("image_id") not in known:
            raise UserError(f"{json_path}: annotation {ann.get('id')} refers to image_id "
                            f"{ann.get('image_id')!r}, which is not in 'images'")
        anns_by_image[ann.get("image_id")].append(ann)
    return anns_by_image


def _paint_image(anns: list[dict], shape: tuple[int, int],
                 json_path: Path) -> tuple[np.ndarray, np.ndarray, int, int]:
    """One image's annotations -> (``HxW`` int32 labels 1..N, ``HxW`` bool crowd regions,
    annotations without a segmentation, objects entirely covered by others)."""
    labels = np.zeros(shape, np.int32)
    ignore = np.zeros(shape, bool)
    objects = [a for a in anns if not a.get("iscrowd")]
    # Larger objects first, so a small object drawn over a large one stays visible.
    objects.sort(key=_annotation_area, reverse=True)
    painted, no_mask = 0, 0
    for ann in objects:
        if _paint_annotation(ann, labels, painted + 1, json_path):
            painted += 1
        else:
            no_mask += 1
    for ann in anns:
        if ann.get("iscrowd"):
            _paint_annotation(ann, ignore, True, json_path)
    relabeled = relabel_consecutive(labels)
    return relabeled, ignore, no_mask, painted - int(relabeled.max())


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _rle_string(counts: Sequence[int]) -> str:
    """pycocotools' compressed RLE string (LEB128-like, 5 bits a char, deltas from the 3rd run).

    Vectorised over the runs: group ``j`` (5 bits) of every value at once, a value's groups
    ending after the first one whose sign bit matches the rest (0 or -1) of the value.
    """
    counts = np.asarray(counts, np.int64)
    values = counts.copy()
    values[3:] -= counts[1:-2]
    groups, emitted = [], []
    alive = np.ones(values.shape, bool)  # values with groups still to write
    while alive.any():
        c = values & 0x1F
        values = values >> 5  # arithmetic shift, as pycocotools' C code
        more = np.where(c & 0x10, values != -1, values != 0)
        groups.append(c | np.where(more, 0x20, 0))
        emitted.append(alive.copy())
        alive &= more
    if not groups:
        return ""
    chars = np.stack(groups, axis=1)[np.stack(emitted, axis=1)] + 48  # row-major: value by value
    return chars.astype(np.uint8).tobytes().decode("ascii")


def rle_encode(crop: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int]) -> dict:
    """A bool mask ``crop`` placed at the crop window ``box`` = (x0, y0, x1, y1), max exclusive, in an HxW image -> COCO
    compressed RLE ``{"size": [H, W], "counts": str}`` (column-major, background first)."""
    height, width = shape
    x0, y0, x1, y1 = box
    columns = np.zeros((x1 - x0, height), np.uint8)  # only the columns the object spans
    columns[:, y0:y1] = crop.T
    flat = columns.ravel()
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]]).astype(np.int64))
    if flat[0]:
        runs = np.concatenate([[0], runs])
    runs[0] += x0 * height  # the empty columns left of the object
    if flat[-1]:
        runs = np.append(runs, 0)
    runs[-1] += (width - x1) * height  # and right of it
    return {"size": [height, width], "counts": _rle_string(runs)}


def polygons(crop: np.ndarray, box: tuple[int, int, int, int]) -> list[list[float]]:
    """Outer contours of a bool mask crop as COCO polygons ``[x1, y1, x2, y2, ...]``."""
    contours, _ = cv2.findContours(crop.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for contour in contours:
        if len(contour) >= 3:
            points = contour.reshape(-1, 2).astype(np.float64) + (box[0], box[1])
            out.append(points.ravel().round(2).tolist())
    return out


class CocoWriter:
    """Collects one COCO detection/segmentation file: an image entry per 2-D image or slice.

    With a ``spool`` file the annotations wait there, one JSON line each, instead of in memory
    (a volume's thousands of sections), and :meth:`write` streams them into the file.
    """

    def __init__(self, segmentation: str = "rle", spool: Path | None = None) -> None:
        if segmentation not in ("rle", "polygon"):
            raise ValueError(f"segmentation must be rle or polygon, got {segmentation!r}")
        self.segmentation = segmentation
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.count = 0  # annotations so far
        self.spool = spool
        if spool is not None:
            spool.write_text("", encoding="utf-8")

    def add(self, file_name: str, labels: np.ndarray, instances: Sequence[Instance],
            frame: int | None = None, ids: np.ndarray | None = None) -> None:
        """One image's final HxW labels (1..K) and the K instances in label order. Each object is
        written with its label ``value``, or ``ids[value]`` (K+1,) where given (0: the object is
        left out, e.g. dropped from a linked volume)."""
        height, width = labels.shape
        image_id = len(self.images) + 1
        entry = {"id": image_id, "file_name": file_name, "height": height, "width": width}
        if frame is not None:
            entry["frame_index"] = frame
        self.images.append(entry)
        found = []
        for value, where in enumerate(ndimage.find_objects(labels), start=1):
            label = value if ids is None else int(ids[value])
            if where is None or label == 0:
                continue
            crop = labels[where] == value
            box = (where[1].start, where[0].start, where[1].stop, where[0].stop)
            segmentation = (rle_encode(crop, box, (height, width)) if self.segmentation == "rle"
                            else polygons(crop, box))
            self.count += 1
            found.append({
                "id": self.count, "image_id": image_id, "category_id": 1,
                "segmentation": segmentation, "area": int(crop.sum()),
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "iscrowd": 0,
                "score": round(instances[value - 1].confidence, 5),
                "predicted_iou": round(instances[value - 1].score, 5), "label": label})
        if self.spool is None:
            self.annotations += found
        elif found:
            with open(self.spool, "a", encoding="utf-8") as fh:
                fh.writelines(json.dumps(a, sort_keys=True) + "\n" for a in found)

    def _annotations(self) -> Iterator[str]:
        if self.spool is None:
            yield from (json.dumps(a, sort_keys=True) for a in self.annotations)
            return
        with open(self.spool, encoding="utf-8") as fh:
            yield from (line.rstrip("\n") for line in fh)

    def write(self, path: Path, description: str) -> None:
        """The COCO file (atomically), the annotations streamed one by one."""
        head = {"info": {"description": description}, "images": self.images,
                "categories": [{"id": 1, "name": CLASS_NAME, "supercategory": CLASS_NAME}]}

        def stream(fh: IO) -> None:
            fh.write(json.dumps(head, indent=1, sort_keys=True)[:-2] + ',\n "annotations": [\n')
            for n, line in enumerate(self._annotations()):
                fh.write(("" if n == 0 else ",\n") + line)
            fh.write("\n ]\n}\n")

        runfiles.atomic_write(path, stream, binary=False)
