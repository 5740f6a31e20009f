"""Busy vs held: how much of the GPU time a tenant held its GPUs actually computed on them.

The ledger books held GPU-seconds exactly, from the pods. What the GPUs did comes from NVIDIA's dcgm-exporter,
through Prometheus: `DCGM_FI_DEV_GPU_UTIL` (percent of time a kernel ran, per GPU) carries the `namespace` and `pod`
of the container that holds the GPU. Busy GPU-seconds of a namespace are the sum over time of its GPUs'
utilisation / 100, sampled every `step` seconds: an estimate at that resolution, not a billing figure.
"""

from __future__ import annotations

from collections.abc import Iterable

BUSY_EXPRESSION = 'sum by (cluster, namespace) (DCGM_FI_DEV_GPU_UTIL{namespace!=""}) / 100'
"""Busy GPUs per namespace (and cluster, where a central Prometheus or Thanos holds several) at an instant."""

MAX_POINTS = 10_000
"""Points per range query; Prometheus refuses more than 11,000 per series."""


def range_chunks(start: int, end: int, step: int) -> list[tuple[int, int]]:
    """[start, end) in epoch seconds, as (first, last) point times of range queries of at most MAX_POINTS points each.
    Each point stands for the `step` seconds that follow it, so consecutive chunks never share a point."""
    if step <= 0:
        raise ValueError("step must be a positive number of seconds")
    chunks = []
    first = start
    while first < end:
        last = min(first + step * (MAX_POINTS - 1), end - 1)
        last -= (last - first) % step  # a whole number of steps after first
        chunks.append((first, last))
        first = last + step
    return chunks


def busy_seconds(values: Iterable[tuple[float, str]], step: int) -> float:
    """GPU-seconds from (time, busy GPUs) samples `step` seconds apart: each sample holds for the step after it."""
    return sum(float(value) for _, value in values) * step
