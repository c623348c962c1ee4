"""AIS training targets: against a slow reference written from the definition, on real EM and
nuclei labels, plus the cases the definition singles out (touching objects, pieces, rings,
small objects, the background fill)."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from samlora.training import instance_targets
from samlora.training.instance_targets import instance_targets as targets_of


def reference_targets(labels: np.ndarray, min_size: int) -> np.ndarray:
    """The definition, pixel by pixel (slow): see instance_targets' module docstring."""
    from scipy import ndimage

    pieces = np.zeros(labels.shape, np.int64)
    n = 0
    for value in np.unique(labels[labels > 0]):
        lab, k = ndimage.label(labels == value, structure=np.ones((3, 3)))
        pieces[lab > 0] = lab[lab > 0] + n
        n += k
    h, w = labels.shape
    out = np.ones((3, h, w), np.float32)
    out[0] = 0
    kept = [i for i in range(1, n + 1) if np.count_nonzero(pieces == i) >= min_size]
    keep = np.isin(pieces, kept)
    boundary = np.zeros((h, w), bool)  # an object pixel with a 4-neighbour of another value
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ys, xs = np.mgrid[0:h, 0:w]
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        other = np.zeros((h, w), bool)
        other[inside] = np.where(keep, pieces, 0)[ny[inside], nx[inside]] != np.where(keep, pieces, 0)[inside]
        boundary |= other
    boundary &= keep
    for i in kept:
        ys, xs = np.nonzero(pieces == i)
        out[0, ys, xs] = 1
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        by, bx = np.nonzero(boundary[y0:y1, x0:x1])
        by, bx = by + y0, bx + x0
        d = np.sqrt((ys[:, None] - by[None]) ** 2 + (xs[:, None] - bx[None]) ** 2).min(axis=1) if len(by) else 0 * ys
        box = np.zeros((y1 - y0, x1 - x0))
        box[ys - y0, xs - x0] = d
        inner = np.unravel_index(np.argmax(box), box.shape)  # first maximum, row-major
        cy, cx = int(np.round(ys.mean())), int(np.round(xs.mean()))
        if pieces[cy, cx] != i:
            cy, cx = inner[0] + y0, inner[1] + x0
        centre = np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2)
        out[1, ys, xs] = centre / (centre.max() + 1e-7)
        from_inner = box[inner] - d
        out[2, ys, xs] = from_inner / (np.abs(from_inner).max() + 1e-7)
    return out


@pytest.fixture(scope="module")
def real_labels(em_crop, shared_data) -> dict[str, np.ndarray]:
    """Real instance labels: the mitochondria of a 256 px window of EM section 0 (conftest's
    ``em_crop``) and a 256 px window of an H&E nuclei label image (touching nuclei)."""
    nuclei = tifffile.imread(shared_data / "nuclei_cpm15" / "cpm15 20x" / "label masks" / "image02.tif")
    return {"em": np.asarray(em_crop[1][0]), "nuclei": np.asarray(nuclei)[:256, :256]}


@pytest.mark.parametrize("name", ["em", "nuclei"])
@pytest.mark.parametrize("min_size", [0, 25])
def test_targets_equal_the_definition_on_real_labels(real_labels, name, min_size) -> None:
    labels = real_labels[name]
    assert len(np.unique(labels)) > 5  # several objects in the window
    ours = targets_of(labels, min_size=min_size)
    expected = reference_targets(labels, min_size)
    assert ours.shape == (3,) + labels.shape and ours.dtype == np.float32
    np.testing.assert_array_equal(ours[0], expected[0])
    assert float(np.abs(ours - expected).max()) < 1e-6
    assert ours.min() >= 0 and ours.max() <= 1


def test_background_is_filled_with_one_and_centres_are_zero() -> None:
    labels = np.zeros((20, 20), np.int32)
    labels[4:11, 5:12] = 3  # 7x7 square: centroid (7, 8) on the object
    out = targets_of(labels)
    assert out[0].sum() == 49 and (out[1:, labels == 0] == 1).all()
    assert out[1, 7, 8] == 0 and out[2, 7, 8] == 0  # the centre is the most inner pixel too
    assert out[2, 4, 5] == pytest.approx(1.0, abs=1e-6)  # a boundary pixel


def test_touching_objects_and_pieces() -> None:
    """Two touching values stay two objects; one value in two 8-disconnected pieces becomes two."""
    labels = np.zeros((10, 30), np.int32)
    labels[2:8, 2:8], labels[2:8, 8:14] = 1, 2  # touching
    labels[2:5, 20:23], labels[6:9, 25:28] = 5, 5  # two pieces of one value
    prepared = instance_targets.prepare_labels(labels)
    assert prepared.max() == 4
    assert len(np.unique(prepared[2:8, 2:8])) == 1 and prepared[2, 2] != prepared[2, 8]
    out = targets_of(labels)
    assert out[2, 4, 7] == pytest.approx(1.0, abs=1e-6)  # the shared edge is a boundary of both
    assert out[2, 4, 8] == pytest.approx(1.0, abs=1e-6)


def test_ring_uses_the_most_inner_pixel_as_centre() -> None:
    """A ring's centroid lies in its hole: the centre becomes the first pixel farthest from the boundary."""
    yy, xx = np.mgrid[0:41, 0:41]
    r = np.hypot(yy - 20, xx - 20)
    labels = ((r >= 10) & (r <= 16)).astype(np.uint8)
    out = targets_of(labels)
    assert labels[20, 20] == 0
    zero = np.argwhere((out[1] == 0) & (labels > 0))
    assert len(zero) == 1
    expected = reference_targets(labels.astype(np.int64), 0)
    assert float(np.abs(out - expected).max()) < 1e-6


def test_min_size_removes_small_objects_and_renumbers() -> None:
    labels = np.zeros((12, 12), np.int32)
    labels[0:2, 0:2] = 7  # 4 px
    labels[5:11, 5:11] = 9  # 36 px
    assert np.array_equal(np.unique(instance_targets.prepare_labels(labels, min_size=5)), [0, 1])
    out = targets_of(labels, min_size=5)
    assert out[0, 0, 0] == 0 and out[1, 0, 0] == 1 and out[0, 6, 6] == 1


def test_empty_and_bad_inputs() -> None:
    out = targets_of(np.zeros((5, 6), bool))
    assert out.shape == (3, 5, 6) and (out[0] == 0).all() and (out[1:] == 1).all()
    with pytest.raises(ValueError, match="2-D"):
        targets_of(np.zeros((2, 5, 6), np.int32))
    with pytest.raises(ValueError, match="integer or bool"):
        targets_of(np.zeros((5, 6), np.float32))
    with pytest.raises(ValueError, match=">= 0"):
        targets_of(-np.ones((5, 6), np.int32))
