"""Wall-clock timing shared by the benchmarks: the median of repeated runs, CUDA work included."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (the caller has warmed it up); on CUDA the
    device is synchronised around each run, so queued kernels count."""
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
