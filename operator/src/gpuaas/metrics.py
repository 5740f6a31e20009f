"""Prometheus metrics of gpuaas (prefix gpuaas_, base units)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gpuaas.api.pool import GpuPoolSpec, GpuPoolStatus
from gpuaas.domain.lifecycle import AllocationSample

PHASES = ("Pending", "Queued", "Scheduled", "Active", "Suspended", "Expired", "Rejected", "Terminating")
ALLOCATION_LABELS = ["allocation", "tenant", "organization", "pool", "gpu_model"]

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
ledger_writes = Counter("gpuaas_ledger_writes_total", "Writes of GpuUsage records (creates and status).")
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


class AllocationCollector(Collector):
    """Per-allocation series from the latest pass of each pool. The counters are the ledger's totals
    (records plus what is booked but not yet written), so they never go backwards across restarts, and
    a deleted allocation's series vanish with it."""

    def __init__(self) -> None:
        self._by_pool: dict[str, list[AllocationSample]] = {}
        self._lock = threading.Lock()

    def replace(self, pool: str, samples: Iterable[AllocationSample]) -> None:
        with self._lock:
            self._by_pool[pool] = list(samples)

    def drop(self, pool: str) -> None:
        with self._lock:
            self._by_pool.pop(pool, None)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        with self._lock:
            samples = [sample for pool in self._by_pool.values() for sample in pool]
        granted = GaugeMetricFamily("gpuaas_allocation_granted_gpus", "GPUs granted.", labels=ALLOCATION_LABELS)
        in_use = GaugeMetricFamily(
            "gpuaas_allocation_in_use_gpus", "GPUs requested by running pods.", labels=ALLOCATION_LABELS
        )
        used = CounterMetricFamily(
            "gpuaas_allocation_used_gpu_seconds", "GPU-seconds used, from the ledger.", labels=ALLOCATION_LABELS
        )
        granted_seconds = CounterMetricFamily(
            "gpuaas_allocation_granted_gpu_seconds", "GPU-seconds granted, from the ledger.", labels=ALLOCATION_LABELS
        )
        phase = GaugeMetricFamily(
            "gpuaas_allocation_phase", "1 for the allocation's current phase.", labels=[*ALLOCATION_LABELS, "phase"]
        )
        idle = GaugeMetricFamily("gpuaas_allocation_idle", "1 when the allocation is idle.", labels=ALLOCATION_LABELS)
        for sample in samples:
            labels = [sample.allocation, sample.tenant, sample.organization, sample.pool, sample.gpu_model]
            granted.add_metric(labels, sample.granted_gpus)
            in_use.add_metric(labels, sample.in_use_gpus)
            used.add_metric(labels, sample.used_gpu_seconds)
            granted_seconds.add_metric(labels, sample.granted_gpu_seconds)
            idle.add_metric(labels, 1 if sample.idle else 0)
            for name in PHASES:
                phase.add_metric([*labels, name], 1 if sample.phase == name else 0)
        yield from (granted, in_use, used, granted_seconds, phase, idle)


allocations = AllocationCollector()
REGISTRY.register(allocations)


def record_allocations(pool: str, samples: Iterable[AllocationSample]) -> None:
    allocations.replace(pool, samples)


def record_pool(name: str, spec: GpuPoolSpec, status: GpuPoolStatus) -> None:
    reconcile_errors.labels(name)  # the series exists at 0 before the first error
    for gauge, field in _POOL_GAUGES:
        gauge.labels(name, spec.gpu_model, spec.provider).set(getattr(status, field))


def forget_pool(name: str, spec: GpuPoolSpec) -> None:
    """Deleted pools drop their series instead of freezing at the last value."""
    allocations.drop(name)
    for metric in (reconcile_errors, reconcile_duration):
        with contextlib.suppress(KeyError):
            metric.remove(name)
    for gauge, _ in _POOL_GAUGES:
        with contextlib.suppress(KeyError):
            gauge.remove(name, spec.gpu_model, spec.provider)


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _SilentHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the log."""


_last_pass = 0.0
READY_WITHIN_SECONDS = 30.0


def mark_pass() -> None:
    """A pool pass ran: this replica is the active one and its indexes are live."""
    global _last_pass  # noqa: PLW0603 - one process-wide heartbeat
    _last_pass = time.monotonic()


def is_ready() -> bool:
    return time.monotonic() - _last_pass < READY_WITHIN_SECONDS


def _app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """/metrics, and /readyz for the Service in front of the webhooks: only the active replica
    (whose pool daemons run, so whose indexes are fresh) answers admission requests."""
    if environ.get("PATH_INFO") == "/readyz":
        ready = is_ready()
        start_response("200 OK" if ready else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [b"ok\n" if ready else b"standby or not reconciling\n"]
    return _metrics_app(environ, start_response)  # type: ignore[no-any-return]


_metrics_app = make_wsgi_app()


def serve(port: int) -> None:
    server = make_server("0.0.0.0", port, _app, ThreadingWSGIServer, handler_class=_SilentHandler)  # noqa: S104
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
