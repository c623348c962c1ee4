"""Volume sections segmented in parallel on a dask.distributed cluster: a local one (``--workers N``) or an
existing scheduler (``--scheduler ADDRESS``, e.g. one that dask-jobqueue started on SLURM / LSF).

Each task segments one section and saves it in the run's section store (stacks.SectionStore);
each worker builds the models once, from a picklable :class:`SegmenterSpec`, and keeps them for
all its tasks. Linking and writing then run in the client, in section order, from the store:
exactly what one process does, so the outputs are the same.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from samlora.core.errors import UserError
from samlora.data.volume_io import Volume, open_volume
from samlora.inference.automatic import build_segmenter
from samlora.inference.sections import SectionStore, section_result
from samlora.inference.segmenter import Segmenter, SegmentOptions
from samlora.inference.yolo import Detector, DetectorOptions, load_detector
from samlora.models import adapters

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = "10s"


@dataclass(frozen=True)
class SegmenterSpec:
    """Everything a worker needs to build the Segmenter of ``detect predict`` (no model inside)."""

    model_type: str
    checkpoint: str | None
    image_size: int
    device: str
    model_path: str | None
    seed: int
    options: SegmentOptions
    proposals: DetectorOptions
    yolo_model: str | None

    def build(self, detector: Detector | None = None) -> Segmenter:
        """The Segmenter: the base model with the adapter, and the detector (``detector`` when it
        is loaded already)."""
        bases = adapters.BaseModels(self.model_type, None if self.checkpoint is None else Path(self.checkpoint),
                                    self.image_size, self.device)
        if detector is None and self.options.mode == "yolo":
            detector = load_detector(self.yolo_model, replace(self.proposals), bases.device)
        return build_segmenter(adapters.load_finetuned(bases, self.model_path, self.seed), self.options, detector)


def connect(workers: int, scheduler: str | None) -> Any:
    """A dask client: of a new local cluster of ``workers`` processes (one thread each), or of the
    scheduler at ``scheduler``. Raises :class:`UserError` when it cannot be reached."""
    from dask.distributed import Client, LocalCluster

    for name in ("distributed", "tornado"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if scheduler is not None:
        try:
            return Client(scheduler, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as exc:
            raise UserError(f"cannot reach the dask scheduler at {scheduler} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:100] if str(exc) else 'no answer'}); start it (dask "
                            "scheduler, or dask-jobqueue) and pass its address, e.g. tcp://host:8786") from None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")  # any free port
    log.info("dask: a local cluster of %d worker processes", workers)
    return Client(cluster)


def close(client: Any) -> None:
    """Close the client, and the local cluster it started."""
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


def _worker_cache() -> dict[str, Any]:
    """What this worker keeps between its tasks (its models, its open volume)."""
    from dask.distributed import get_worker

    worker = get_worker()
    if not hasattr(worker, "samlora_cache"):
        worker.samlora_cache = {}
    return worker.samlora_cache


def segment_section(spec: Any, path: Path, z: int, store: Path, limits: tuple[float, float] | None) -> int:
    """A task: segment section ``z`` of the volume ``path``, scaled to uint8 with the client's
    intensity ``limits`` (volume_io.open_volume), with this worker's models (built on its first
    task) and save it in the store folder; returns its object count."""
    cache = _worker_cache()
    key = repr(spec)
    if cache.get("spec") != key:
        cache.update(spec=key, segmenter=spec.build())
    volume: Volume | None = cache.get("volume")
    if volume is None or volume.path != path or volume.limits != limits:
        if volume is not None:
            volume.close()
        cache["volume"] = volume = open_volume(path, limits)
    result = section_result(cache["segmenter"], volume, z)
    SectionStore(store, {}).save(z, result)
    return len(result.scores)


def fill_store(client: Any, spec: Any, volume: Volume, store: SectionStore) -> None:
    """Segment every section the store lacks on the cluster's workers, in parallel, each scaled
    with ``volume``'s intensity limits (computed once, in the client)."""
    from dask.distributed import as_completed

    missing = [z for z in range(volume.shape[0]) if z not in store.done]
    if not missing:
        return
    workers = len(client.scheduler_info().get("workers", {}))
    log.info("%s: %d sections on %d dask workers", volume.path.name, len(missing), workers)
    futures = {client.submit(segment_section, spec, volume.path, z, store.folder, volume.limits, pure=False): z
               for z in missing}
    for future in tqdm(as_completed(futures), total=len(futures), desc="sections", unit="section", leave=False,
                       disable=None):
        future.result()  # a worker's error ends the run here
        store.done.add(futures[future])


def client(workers: int, scheduler: str | None, carries_seeds: bool = False) -> Any:
    """The dask client of ``--workers N`` / ``--scheduler ADDRESS`` (None: one process); the
    flags' bad combinations are refused with one line each."""
    if workers < 0:
        raise UserError(f"--workers must be 0 (this process) or more, got {workers}")
    if not workers and scheduler is None:
        return None
    if workers and scheduler is not None:
        raise UserError("give --workers (a local cluster) or --scheduler (an existing one), not both")
    if carries_seeds:
        raise UserError("--seed_labels carries objects from section to section, in one process: leave out "
                        "--workers / --scheduler")
    return connect(workers, scheduler)
