"""Prometheus metrics of gpuaas (prefix gpuaas_, base units)."""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from gpuaas.api.pool import GpuPoolSpec, GpuPoolStatus

POOL_LABELS = ("pool", "gpu_model", "provider")

pool_nodes = Gauge("gpuaas_pool_nodes", "Nodes matching the pool's nodeSelector.", POOL_LABELS)
pool_ready_nodes = Gauge("gpuaas_pool_ready_nodes", "Pool nodes whose Ready condition is True.", POOL_LABELS)
pool_capacity_gpus = Gauge("gpuaas_pool_capacity_gpus", "GPUs on healthy (Ready, schedulable) nodes.", POOL_LABELS)
pool_program_gpus = Gauge("gpuaas_pool_program_gpus", "GPUs of the pool that may be granted.", POOL_LABELS)
pool_granted_gpus = Gauge("gpuaas_pool_granted_gpus", "GPUs held by admitted allocations.", POOL_LABELS)
pool_available_gpus = Gauge("gpuaas_pool_available_gpus", "Grantable GPUs not yet granted.", POOL_LABELS)
pool_in_use_gpus = Gauge("gpuaas_pool_in_use_gpus", "GPUs requested by running pods.", POOL_LABELS)
pool_queue_length = Gauge("gpuaas_pool_queue_length", "Allocations waiting for capacity.", POOL_LABELS)

reconcile_duration = Histogram(
    "gpuaas_reconcile_duration_seconds",
    "Duration of one pool reconcile pass (admission, tenant objects, status).",
    ("pool",),
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
reconcile_errors = Counter("gpuaas_reconcile_errors_total", "Reconcile passes that failed.", ("pool",))

_POOL_GAUGES = (
    (pool_nodes, "nodes"),
    (pool_ready_nodes, "ready_nodes"),
    (pool_capacity_gpus, "capacity_gpus"),
    (pool_program_gpus, "program_gpus"),
    (pool_granted_gpus, "granted_gpus"),
    (pool_available_gpus, "available_gpus"),
    (pool_in_use_gpus, "in_use_gpus"),
    (pool_queue_length, "queued"),
)


def record_pool(name: str, spec: GpuPoolSpec, status: GpuPoolStatus) -> None:
    for gauge, field in _POOL_GAUGES:
        gauge.labels(name, spec.gpu_model, spec.provider).set(getattr(status, field))


def forget_pool(name: str, spec: GpuPoolSpec) -> None:
    """Deleted pools drop their series instead of freezing at the last value."""
    for gauge, _ in _POOL_GAUGES:
        with contextlib.suppress(KeyError):
            gauge.remove(name, spec.gpu_model, spec.provider)


def serve(port: int) -> None:
    start_http_server(port)
