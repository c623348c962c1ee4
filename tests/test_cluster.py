"""cluster.py: volume sections segmented on a dask.distributed cluster give the single-process result.

A local cluster of 2 workers (threads of this process: fast to start) segments the sections of a
real EM stack with the ground-truth TEST DOUBLE of test_stacks.py in place of SAM, built by each
worker from a picklable spec; the slow test runs the real command with ``--workers 2`` (worker
processes, random weights) against one process.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import SMALL
from test_stacks import TruthSegmenter, run_volume, write_tiff

from samlora.core.errors import UserError
from samlora.inference import cluster


class TruthSpec:
    """A picklable stand-in for cluster.SegmenterSpec: ``build()`` gives the TEST DOUBLE and
    counts the builds per thread (a worker of the local cluster is one thread)."""

    builds: dict[int, int] = {}
    lock = threading.Lock()

    def __init__(self, images: np.ndarray, truth: np.ndarray) -> None:
        self.images, self.truth = images, truth

    def __repr__(self) -> str:  # what a worker compares to know its models (as a SegmenterSpec's)
        return f"TruthSpec({self.images.shape})"

    def build(self) -> TruthSegmenter:
        with self.lock:
            self.builds[threading.get_ident()] = self.builds.get(threading.get_ident(), 0) + 1
        return TruthSegmenter(self.images, self.truth)


@pytest.fixture(scope="module")
def client():
    from dask.distributed import Client, LocalCluster

    local = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0")
    dask_client = Client(local)
    yield dask_client
    cluster.close(dask_client)


def never(image: np.ndarray):
    raise AssertionError("a section was segmented in the client, not on a worker")


def test_two_workers_give_the_single_process_result(client, em_crop, tmp_path: Path, monkeypatch) -> None:
    from samlora.data import volume_io

    images, truth = em_crop
    stack = write_tiff(tmp_path / "stack.tif", images[:9])
    _, alone = run_volume(stack, tmp_path / "one", TruthSegmenter(images, truth))
    spec = TruthSpec(images, truth)
    TruthSpec.builds.clear()
    scans, real = [], volume_io.volume_limits
    monkeypatch.setattr(volume_io, "volume_limits", lambda volume: scans.append(volume.path) or real(volume))
    _, parallel = run_volume(stack, tmp_path / "two", never,
                             fill=lambda volume, store: cluster.fill_store(client, spec, volume, store))
    assert scans == [stack]  # the intensity scale is computed once, in the client; the workers are given it
    np.testing.assert_array_equal(tifffile.imread(parallel), tifffile.imread(alone))
    assert (tmp_path / "two" / "coco.json").read_text() == (tmp_path / "one" / "coco.json").read_text()
    assert sorted(TruthSpec.builds.values()) in ([1], [1, 1])  # each worker built its models once, 9 sections
    assert len(client.scheduler_info()["workers"]) == 2


def test_an_unreachable_scheduler_is_one_error(monkeypatch) -> None:
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", "1s")
    with pytest.raises(UserError, match="cannot reach the dask scheduler at tcp://127.0.0.1:9"):
        cluster.connect(0, "tcp://127.0.0.1:9")


@pytest.mark.slow
def test_detect_predict_with_two_worker_processes(main, em_crop, tmp_path: Path) -> None:
    """The real command, random weights: --workers 2 (worker processes) writes what one process writes."""
    images, _ = em_crop
    stack = write_tiff(tmp_path / "s.tif", images[:4])
    common = ["detect", "predict", "--input", str(stack), "--mode", "amg", "--points_per_side", "2",
              "--pred_iou_thresh", "0", "--stability_score_thresh", "0", "--no_overlay", *SMALL]
    assert main([*common, "--output_dir", str(tmp_path / "one")]) == 0
    assert main([*common, "--output_dir", str(tmp_path / "two"), "--workers", "2"]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "two" / "s_labels.tif"),
                                  tifffile.imread(tmp_path / "one" / "s_labels.tif"))
    assert json.loads((tmp_path / "two" / "coco.json").read_text()) == json.loads((tmp_path / "one" / "coco.json").read_text())
