"""stacks.py, volume_io.py and the stack writers of labelfiles.py: volumes segmented section by
section, linked, streamed, resumed.

Most tests put a TEST DOUBLE in place of SAM: ``TruthSegmenter`` returns the real ground-truth
mitochondria (2-D components) of the section it is shown, so the labels are known and the tests
check the volume machinery (reading, the section store, linking, writing, resuming, memory), not a
model. The real model path (random weights through the command line) runs in the slow tests at the
end and must write consistent files.
"""
from __future__ import annotations

import json
import logging
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from conftest import SMALL
from test_automatic import save_decoder_adapter

from samlora.core import runfiles
from samlora.data.coco import CocoWriter, rle_decode
from samlora.data.volume_io import open_volume
from samlora.inference import sections as stacks
from samlora.inference.label_files import stack_output_paths, write_label_stack
from samlora.inference.linking import LinkOptions, link_slices
from samlora.inference.sections import Scored


# --------------------------------------------------------------------------------------------
# data (em_crop: conftest.py) and the test double
# --------------------------------------------------------------------------------------------
class TruthSegmenter:
    """TEST DOUBLE for the SAM Segmenter: the ground-truth objects of the section it is shown
    (found by the section's pixels), each with score 1; counts its calls."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, stop_after: int | None = None) -> None:
        self.truth = {image.tobytes(): section for image, section in zip(images, labels)}
        self.calls, self.stop_after = 0, stop_after

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, list[Scored]]:
        if self.stop_after is not None and self.calls == self.stop_after:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a volume
        self.calls += 1
        labels = self.truth[np.ascontiguousarray(image[..., 0]).tobytes()]
        return labels, [Scored(1.0, 1.0)] * int(labels.max())


def write_tiff(path: Path, images: np.ndarray) -> Path:
    tifffile.imwrite(path, images, photometric="minisblack")
    return path


def write_zarr(path: Path, images: np.ndarray, chunks=(2, 128, 128)) -> Path:
    zarr.create_array(store=str(path), shape=images.shape, chunks=chunks, dtype=images.dtype)[:] = images
    return path


def run_volume(path: Path, out: Path, segment, link: LinkOptions | None = LinkOptions(),
               resume: bool = False, overwrite: bool = False, fill=None) -> tuple[int, Path]:
    """stacks.predict_volume as detect predict calls it; returns (objects, labels path)."""
    output = runfiles.OutputDir(out, "detect predict").claim(overwrite, resume)
    with output.active():
        (out / stacks.WORK_FOLDER).mkdir(exist_ok=True)
        coco = CocoWriter("rle", spool=out / stacks.WORK_FOLDER / "coco.jsonl")
        outputs = stack_output_paths(out, path, with_overlay=True)
        objects = stacks.predict_volume(path, path.name, segment, {"model": "truth"}, output, resume, link, coco,
                                        outputs, fill)
        coco.write(out / "coco.json", "test")
        output.discard(out / stacks.WORK_FOLDER)
    return objects, outputs["labels"]


def read_labels(path: Path) -> np.ndarray:
    return zarr.open(str(path), mode="r")[:] if path.suffix == ".zarr" else tifffile.imread(path)


def check_coco(coco: dict, labels: np.ndarray) -> None:
    """Every annotation decodes to exactly its object in its section."""
    assert len(coco["annotations"]) == sum(len(np.unique(s[s > 0])) for s in labels)
    frames = {img["id"]: img["frame_index"] for img in coco["images"]}
    for ann in coco["annotations"]:
        np.testing.assert_array_equal(rle_decode(ann["segmentation"]), labels[frames[ann["image_id"]]] == ann["label"])


# --------------------------------------------------------------------------------------------
# tests with the test double
# --------------------------------------------------------------------------------------------
def test_a_tiff_stack_is_linked_and_streamed(em_crop, tmp_path: Path) -> None:
    images, truth = em_crop
    stack = write_tiff(tmp_path / "stack.tif", images[:8])
    objects, labels_path = run_volume(stack, tmp_path / "out", TruthSegmenter(images, truth))
    with tifffile.TiffFile(labels_path) as tif:
        assert tif.is_bigtiff and tif.series[0].shape == (8, 256, 256) and tif.series[0].axes == "ZYX"
        assert len(tif.pages) == 8
    labels = tifffile.imread(labels_path)
    assert labels.dtype == np.uint32
    np.testing.assert_array_equal(labels, link_slices(truth[:8]))
    assert objects == labels.max() > 0
    check_coco(json.loads((tmp_path / "out" / "coco.json").read_text()), labels)
    assert (tmp_path / "out" / "stack_overlay.png").is_file()
    assert not (tmp_path / "out" / stacks.WORK_FOLDER).exists()  # the work is cleared when done
    manifest = json.loads((tmp_path / "out" / runfiles.MANIFEST).read_text())["files"]
    assert sorted(manifest) == ["coco.json", "stack_labels.tif", "stack_overlay.png"]


def test_no_link_numbers_objects_on(em_crop, tmp_path: Path) -> None:
    images, truth = em_crop
    stack = write_tiff(tmp_path / "stack.tif", images[:4])
    objects, labels_path = run_volume(stack, tmp_path / "out", TruthSegmenter(images, truth), link=None)
    labels, offset = tifffile.imread(labels_path), 0
    for z in range(4):
        np.testing.assert_array_equal(labels[z], np.where(truth[z] > 0, truth[z] + offset, 0))
        offset += truth[z].max()
    assert objects == offset


def test_zarr_input_gives_the_tiff_labels_with_its_chunks(em_crop, tmp_path: Path) -> None:
    images, truth = em_crop
    options = LinkOptions(iou=0.1, gap=1, min_sections=2)
    _, from_tiff = run_volume(write_tiff(tmp_path / "v.tif", images[:7]), tmp_path / "a",
                              TruthSegmenter(images, truth), options)
    _, from_zarr = run_volume(write_zarr(tmp_path / "v.zarr", images[:7]), tmp_path / "b",
                              TruthSegmenter(images, truth), options)
    assert from_zarr.name == "v_labels.zarr"
    array = zarr.open(str(from_zarr), mode="r")
    assert array.chunks == (2, 128, 128) and array.dtype == np.uint32
    np.testing.assert_array_equal(array[:], tifffile.imread(from_tiff))
    np.testing.assert_array_equal(array[:], link_slices(truth[:7], 0.1, 1, 2))


def test_ome_zarr_input(em_crop, tmp_path: Path) -> None:
    """An OME-Zarr image (tczyx, one time point and one channel) is read as its ZYX volume."""
    images, truth = em_crop
    group = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w")
    group.attrs["ome"] = {"multiscales": [{"axes": [{"name": n} for n in "tczyx"], "datasets": [{"path": "0"}]}]}
    group.create_array("0", shape=(1, 1, 3, 256, 256), chunks=(1, 1, 1, 256, 256), dtype="uint8")[:] = images[None, None, :3]
    with open_volume(tmp_path / "ome.zarr") as volume:
        assert volume.shape == (3, 256, 256) and volume.chunks == (1, 256, 256)
        np.testing.assert_array_equal(volume.section(1)[..., 0], images[1])


def test_the_intensity_scale_is_computed_only_when_asked(em_crop, tmp_path: Path, monkeypatch) -> None:
    """A 16-bit stack: volume_shape reads its header alone; open_volume computes the scale once by
    default and uses a given one (a dask worker's, from the client) as it is."""
    from samlora.data import volume_io

    calls = []
    real = volume_io.volume_limits
    monkeypatch.setattr(volume_io, "volume_limits", lambda volume: calls.append(volume.path) or real(volume))
    stack = write_tiff(tmp_path / "s16.tif", em_crop[0][:3].astype(np.uint16) * 200)
    assert volume_io.volume_shape(stack) == (3, 256, 256) and calls == []
    with open_volume(stack) as volume:
        assert calls == [stack] and volume.limits is not None
        scaled, limits = volume.section(2), volume.limits
    with open_volume(stack, limits) as volume:
        assert calls == [stack] and volume.limits == limits
        np.testing.assert_array_equal(volume.section(2), scaled)
    with open_volume(stack, (0.0, 1.0)) as volume:
        assert volume.section(2).max() == 255 and calls == [stack]


def test_an_interrupted_run_resumes_from_the_last_finished_section(em_crop, tmp_path: Path) -> None:
    images, truth = em_crop
    stack = write_tiff(tmp_path / "stack.tif", images[:6])
    with pytest.raises(KeyboardInterrupt):
        run_volume(stack, tmp_path / "out", TruthSegmenter(images, truth, stop_after=4))
    store = tmp_path / "out" / stacks.WORK_FOLDER / "stack.sections"
    assert sorted(p.name for p in store.glob("*.npz")) == [f"{z:06d}.npz" for z in range(4)]
    assert not (tmp_path / "out" / "stack_labels.tif").exists()  # never half a file
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    again = TruthSegmenter(images, truth)
    _, labels_path = run_volume(stack, tmp_path / "out", again, resume=True)
    assert again.calls == 2  # only the sections the first run had not finished
    np.testing.assert_array_equal(tifffile.imread(labels_path), link_slices(truth[:6]))
    with pytest.raises(Exception, match="other options"):  # a store made with other options is refused
        output = runfiles.OutputDir(tmp_path / "x", "detect predict").claim(False)
        first = stacks.SectionStore(tmp_path / "x" / "s", {"input": "a", "model": 1})
        first.open(False, output)
        stacks.SectionStore(tmp_path / "x" / "s", {"input": "a", "model": 2}).open(True, output)


def test_memory_does_not_grow_with_the_sections(em_crop, tmp_path: Path) -> None:
    """The Python-visible peak memory (tracemalloc, numpy included) of a 64-section volume is
    that of a 16-section volume of the same sections: nothing is held per section."""
    images, truth = em_crop
    peaks = {}
    for depth in (16, 16, 64):  # the first run warms up (imports, caches)
        stack = write_tiff(tmp_path / f"s{depth}.tif", np.concatenate([images[:16]] * (depth // 16)))
        segment = TruthSegmenter(images, truth)
        tracemalloc.start()
        run_volume(stack, tmp_path / f"out{depth}", segment, LinkOptions(min_sections=2), overwrite=True)
        peaks[depth] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    held = 64 * 256 * 256 * 4  # what the 64 sections' uint32 labels alone would take
    assert peaks[64] / peaks[16] <= 1.1 and peaks[64] < held / 2, peaks


@pytest.mark.parametrize("kind", ["vit_t", "vit"])
def test_a_section_does_not_depend_on_the_thread_count(kind: str, em_crop, tmp_path: Path) -> None:
    """MobileSAM's TinyViT and SAM's ViT (their convolutions) on a section give the same bits on 1
    thread (a dask worker) and on 2 (this process) when the section goes through
    stacks.section_result: oneDNN, which sums in a thread-dependent order, is off there and back
    on after."""
    import torch
    from conftest import tiny_sam

    from samlora.models import sam as model

    sam, threads, embeddings = tiny_sam(kind, image_size=256), torch.get_num_threads(), {}

    def encode(image: np.ndarray) -> tuple[np.ndarray, list[Scored]]:
        assert not torch.backends.mkldnn.enabled
        with torch.no_grad():
            embeddings[torch.get_num_threads()] = sam.image_encoder(model.prepare_image(image, 256).tensor[None])
        return np.zeros(image.shape[:2], np.int32), []

    with open_volume(write_tiff(tmp_path / "s.tif", em_crop[0][:2])) as volume:
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                assert stacks.section_result(encode, volume, 1).scores.shape == (0,)
        finally:
            torch.set_num_threads(threads)
    assert torch.backends.mkldnn.enabled
    assert torch.equal(embeddings[1], embeddings[2])
    with stacks.thread_count_invariant("bf16"):  # the fallback's bf16 convolutions are ~50x slower
        assert torch.backends.mkldnn.enabled


def test_sections_computed_at_once_restore_onednn_when_the_last_ends() -> None:
    """Two sections in threads (a dask worker with 2 threads) share the global switch: the first to
    finish leaves oneDNN off for the other, the last restores it."""
    import threading

    import torch

    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def second() -> None:
        first_in.wait(10)
        with stacks.thread_count_invariant():
            second_in.set()
            first_out.wait(10)
            seen["after the first ended"] = torch.backends.mkldnn.enabled

    thread = threading.Thread(target=second)
    thread.start()
    with stacks.thread_count_invariant():
        first_in.set()
        assert second_in.wait(10)
    first_out.set()
    thread.join()
    assert seen == {"after the first ended": False} and torch.backends.mkldnn.enabled


def test_write_label_stack_refuses_a_wrong_count(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 sections given for a stack of 3"):
        write_label_stack(tmp_path / "l.tif", (3, 4, 4), [np.zeros((4, 4))] * 2)
    assert not list(tmp_path.iterdir())  # nothing left behind


# --------------------------------------------------------------------------------------------
# the real model path: random weights through the command line
# --------------------------------------------------------------------------------------------
AMG = ["--mode", "amg", "--points_per_side", "2", "--pred_iou_thresh", "0", "--stability_score_thresh", "0", *SMALL]


@pytest.mark.slow
def test_detect_predict_on_a_stack_with_random_weights(main, em_crop, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The command completes on a 3-section TIFF stack and a Zarr copy; the linked labels are
    link_slices of the --no_link labels, COCO matches the labels, Zarr gives the TIFF's labels."""
    images, _ = em_crop
    stack, volume = write_tiff(tmp_path / "s.tif", images[:3]), write_zarr(tmp_path / "s.zarr", images[:3])
    with caplog.at_level(logging.INFO):
        assert main(["detect", "predict", "--input", str(stack), "--output_dir", str(tmp_path / "a"), *AMG]) == 0
        assert main(["detect", "predict", "--input", str(stack), "--output_dir", str(tmp_path / "b"), "--no_link",
                     "--no_overlay", *AMG]) == 0
        assert main(["detect", "predict", "--input", str(volume), "--output_dir", str(tmp_path / "c"), *AMG]) == 0
    linked, per_section = tifffile.imread(tmp_path / "a" / "s_labels.tif"), tifffile.imread(tmp_path / "b" / "s_labels.tif")
    np.testing.assert_array_equal(linked, link_slices(per_section))
    np.testing.assert_array_equal(zarr.open(str(tmp_path / "c" / "s_labels.zarr"), mode="r")[:], linked)
    check_coco(json.loads((tmp_path / "a" / "coco.json").read_text()), linked)
    assert "3-D objects in 3 sections" in caplog.text


@pytest.mark.slow
def test_detect_predict_resumes_after_ctrl_c(main, em_crop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """Ctrl-C in the third section: exit 130 and the hint; a rerun without --resume is refused;
    --resume segments only the sections left and writes what an uninterrupted run writes."""
    from samlora.inference import segmenter

    images, _ = em_crop
    stack = write_tiff(tmp_path / "s.tif", images[:4])
    argv = ["detect", "predict", "--input", str(stack), "--output_dir", str(tmp_path / "out"), "--no_overlay", *AMG]
    real, calls = segmenter.Segmenter.__call__, []

    def interrupted(self, image):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, image)

    monkeypatch.setattr(segmenter.Segmenter, "__call__", interrupted)
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 130
    assert "rerun the same command with --resume" in caplog.text
    assert main(argv) == 2  # an interrupted run is neither overwritten nor continued without being asked
    calls.clear()
    assert main([*argv, "--resume"]) == 0
    assert len(calls) == 2  # sections 2 and 3
    monkeypatch.setattr(segmenter.Segmenter, "__call__", real)
    assert main([*argv[:5], str(tmp_path / "clean"), *argv[6:]]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "s_labels.tif"),
                                  tifffile.imread(tmp_path / "clean" / "s_labels.tif"))
    assert json.loads((tmp_path / "out" / "coco.json").read_text()) == json.loads((tmp_path / "clean" / "coco.json").read_text())
    assert not (tmp_path / "out" / stacks.WORK_FOLDER).exists()


@pytest.fixture(scope="module")
def decoder_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter holding a random instance decoder (test_automatic.save_decoder_adapter)."""
    return save_decoder_adapter(tmp_path_factory.mktemp("ais"))


@pytest.mark.slow
def test_detect_predict_ais_resumes_and_runs_on_workers_with_maps(main, em_crop, decoder_adapter: Path,
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--mode ais --write_maps on a 3-section stack: Ctrl-C in the second section, --resume,
    and --workers 2 (worker processes, the decoder loaded from the adapter there) all write the
    labels and Zx3xHxW maps of one uninterrupted run."""
    from samlora.inference.automatic import DecoderSegmenter

    images, _ = em_crop
    stack = write_tiff(tmp_path / "s.tif", images[:3])
    common = ["detect", "predict", "--input", str(stack), "--mode", "ais", "--model_path", str(decoder_adapter),
              "--write_maps", "--no_overlay", "--foreground_threshold", "0.45", *SMALL]
    assert main([*common, "--output_dir", str(tmp_path / "clean")]) == 0
    real, calls, stop = DecoderSegmenter.segment, [], [2]

    def interrupted(self, image):
        calls.append(1)
        if len(calls) in stop:
            stop.clear()
            raise KeyboardInterrupt
        return real(self, image)

    monkeypatch.setattr(DecoderSegmenter, "segment", interrupted)
    assert main([*common, "--output_dir", str(tmp_path / "out")]) == 130
    calls.clear()
    assert main([*common, "--output_dir", str(tmp_path / "out"), "--resume"]) == 0
    assert len(calls) == 2  # sections 1 and 2
    monkeypatch.setattr(DecoderSegmenter, "segment", real)
    assert main([*common, "--output_dir", str(tmp_path / "two"), "--workers", "2"]) == 0
    clean_maps = tifffile.imread(tmp_path / "clean" / "s_maps.tif")
    assert clean_maps.shape == (3, 3, *images.shape[1:]) and clean_maps.dtype == np.float32
    for run in ("out", "two"):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / run / "s_labels.tif"),
                                      tifffile.imread(tmp_path / "clean" / "s_labels.tif"))
        np.testing.assert_array_equal(tifffile.imread(tmp_path / run / "s_maps.tif"), clean_maps)
        assert json.loads((tmp_path / run / "coco.json").read_text()) == \
            json.loads((tmp_path / "clean" / "coco.json").read_text())
