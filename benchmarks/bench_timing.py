"""Timing and memory helpers of the bench modules (bench.py, bench_sidebyside.py, bench_volumes.py)."""
from __future__ import annotations

import resource
import statistics
import time
from typing import Callable


def timed(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(measured: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each function, measured interleaved (one of each per repetition, so that
    load from other processes hits all alike), after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in measured}
    for rep in range(reps + 1):  # the first round warms up (bf16 kernels, ultralytics' predictor)
        for name, fn in measured.items():
            start = time.perf_counter()
            fn()
            if rep:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_rss_mib() -> float:
    """This process's resident-memory high-water mark in MiB: VmHWM (reset at exec, unlike
    ru_maxrss, which a spawned child inherits from its large parent)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB or bytes
