"""Prometheus metrics of gpuaas (prefix gpuaas_, base units)."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gpuaas.api.pool import GpuPoolSpec, GpuPoolStatus
from gpuaas.domain.lifecycle import AllocationSample
from gpuaas.metrics_server import MetricsAccess, read_frame, write_frame

logger = logging.getLogger(__name__)

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
pool_down_gpus = Gauge("gpuaas_pool_down_gpus", "Program GPUs not on healthy nodes.", POOL_LABELS)
pool_credited_gpus = Gauge(
    "gpuaas_pool_credited_gpus", "Granted GPUs on hardware that is down (the grants' downtime credit).", POOL_LABELS
)

reconcile_duration = Histogram(
    "gpuaas_reconcile_duration_seconds",
    "Duration of one pool reconcile pass (admission, tenant objects, status), from its turn to decide (one pool"
    ' decides at a time; the wait for the turn is gpuaas_reconcile_part_seconds{part="turn"}).',
    ("pool",),
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 2.5, 5, 10, 30),
)
reconcile_part = Histogram(
    "gpuaas_reconcile_part_seconds",
    "Each part of a pool reconcile pass: waiting for its turn (one pool decides at a time; not part of the pass's"
    " duration), its snapshot of the indexes (on the event loop), deciding and handing out writes, waiting (bounded)"
    " for them, ending it (the pool's status and month records, the series), and the hand-offs between the event"
    " loop and the pass's thread (how long a busy event loop took to start the thread and to take its result back).",
    ("pool", "part"),
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
PASS_PARTS = ("turn", "snapshot", "deciding", "waiting", "ending", "handoff")
watch_lag = Histogram(
    "gpuaas_apply_shown_seconds",
    "From the end of an apply of a tenant object to the pass that found it in the operator's watch-fed index, by"
    " kind: how stale the operator's view of its own writes is (resolution: the pass interval).",
    ("kind",),
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
ledger_writes = Counter("gpuaas_ledger_writes_total", "Writes of GpuUsage records (creates and ledger updates).")
reconcile_errors = Counter(
    "gpuaas_reconcile_errors_total", "Reconcile passes that failed, and allocations whose writes failed.", ("pool",)
)
writes_in_flight = Gauge(
    "gpuaas_pool_allocations_in_flight",
    "Allocations whose writes a pass handed to a worker and that were still running when the pass ended.",
    ("pool",),
)
namespace_terminating = Gauge(
    "gpuaas_namespace_terminating",
    "1 while a deleted allocation waits for its namespace to be deleted (something in it holds it).",
    ("pool", "allocation", "namespace"),
)
_terminating_series: dict[str, set[tuple[str, str]]] = {}


class GcPauses:
    """Pauses of Python's cyclic garbage collector, by generation. Every thread waits for one, the webhooks' and
    /metrics' included, and a full collection of a large heap takes long. Counted in plain lists: the collector
    may run while a thread holds a metric's lock, so its callback must take none."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]
        self._started = 0.0

    def on_collection(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation, pause = info["generation"], time.perf_counter() - self._started
        self.count[generation] += 1
        self.seconds[generation] += pause
        self.longest[generation] = max(self.longest[generation], pause)

    def collect(self) -> Iterable[Metric]:
        total = CounterMetricFamily("gpuaas_gc_pause_seconds", "Time spent in GC pauses.", labels=["generation"])
        count = CounterMetricFamily("gpuaas_gc_pauses", "GC pauses.", labels=["generation"])
        longest = GaugeMetricFamily("gpuaas_gc_pause_max_seconds", "Longest GC pause so far.", labels=["generation"])
        for generation in range(3):
            total.add_metric([str(generation)], self.seconds[generation])
            count.add_metric([str(generation)], self.count[generation])
            longest.add_metric([str(generation)], self.longest[generation])
        return [total, count, longest]


gc_pauses = GcPauses()
REGISTRY.register(gc_pauses)
gc.callbacks.append(gc_pauses.on_collection)


_POOL_GAUGES = (
    (pool_nodes, "nodes"),
    (pool_ready_nodes, "ready_nodes"),
    (pool_capacity_gpus, "capacity_gpus"),
    (pool_program_gpus, "program_gpus"),
    (pool_granted_gpus, "granted_gpus"),
    (pool_available_gpus, "available_gpus"),
    (pool_in_use_gpus, "in_use_gpus"),
    (pool_queue_length, "queued"),
    (pool_down_gpus, "down_gpus"),
    (pool_credited_gpus, "credited_gpus"),
)


ALLOCATION_METRICS = (
    ("gpuaas_allocation_granted_gpus", "gauge", "GPUs granted."),
    ("gpuaas_allocation_in_use_gpus", "gauge", "GPUs requested by running pods."),
    ("gpuaas_allocation_used_gpu_seconds_total", "counter", "GPU-seconds used, from the ledger."),
    ("gpuaas_allocation_granted_gpu_seconds_total", "counter", "GPU-seconds granted, from the ledger."),
    ("gpuaas_allocation_phase", "gauge", "1 for the allocation's current phase (one series per allocation)."),
    ("gpuaas_allocation_idle", "gauge", "1 when the allocation is idle."),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample_lines(sample: AllocationSample) -> dict[str, str]:
    labels = ",".join(
        f'{name}="{_label(value)}"'
        for name, value in zip(
            ALLOCATION_LABELS,
            (sample.allocation, sample.tenant, sample.organization, sample.pool, sample.gpu_model),
            strict=True,
        )
    )
    values = {
        "gpuaas_allocation_granted_gpus": sample.granted_gpus,
        "gpuaas_allocation_in_use_gpus": sample.in_use_gpus,
        "gpuaas_allocation_used_gpu_seconds_total": sample.used_gpu_seconds,
        "gpuaas_allocation_granted_gpu_seconds_total": sample.granted_gpu_seconds,
        "gpuaas_allocation_idle": 1 if sample.idle else 0,
    }
    lines = {name: f"{name}{{{labels}}} {value}\n" for name, value in values.items()}
    lines["gpuaas_allocation_phase"] = f'gpuaas_allocation_phase{{{labels},phase="{sample.phase}"}} 1\n'
    return lines


class AllocationSeries:
    """Per-allocation series from the latest pass of each pool, rendered as exposition text by the pass that
    produced them, so that a scrape only joins text (a scrape of 3,000 allocations must not render 18,000
    series, nor wait behind a render). The counters are the ledger's totals (records plus what is booked but
    not yet written), so they never go backwards across restarts, and a deleted allocation's series vanish
    with it."""

    def __init__(self) -> None:
        self._rendered: dict[str, dict[str, bytes]] = {}
        # pool -> allocation -> its sample and that sample's lines: a steady pass hands back the very sample objects
        # of the last (reconciler._Cached), and rendering 2,000 allocations' lines took as long as deciding for them.
        self._lines: dict[str, dict[str, tuple[AllocationSample, dict[str, str]]]] = {}
        self._lock = threading.Lock()

    def replace(self, pool: str, samples: Iterable[AllocationSample]) -> None:
        """Called by one pool's passes at a time (each pool's series are its own)."""
        merged: dict[str, list[str]] = {name: [] for name, _, _ in ALLOCATION_METRICS}
        previous, current = self._lines.get(pool, {}), {}
        for sample in samples:
            kept = previous.get(sample.allocation)
            lines = kept[1] if kept is not None and kept[0] is sample else _sample_lines(sample)
            current[sample.allocation] = (sample, lines)
            for name, line in lines.items():
                merged[name].append(line)
        rendered = {name: "".join(lines).encode() for name, lines in merged.items()}  # encoded once, here
        with self._lock:
            self._rendered[pool] = rendered
            self._lines[pool] = current

    def drop(self, pool: str) -> None:
        with self._lock:
            self._rendered.pop(pool, None)
            self._lines.pop(pool, None)

    def exposition(self) -> bytes:
        with self._lock:
            pools = list(self._rendered.values())
        parts = []
        for name, kind, help_text in ALLOCATION_METRICS:
            parts.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n".encode())
            parts.extend(rendered[name] for rendered in pools)
        return b"".join(parts)


allocations = AllocationSeries()


def record_allocations(pool: str, samples: Iterable[AllocationSample]) -> None:
    allocations.replace(pool, samples)


def record_pool(name: str, spec: GpuPoolSpec, status: GpuPoolStatus) -> None:
    reconcile_errors.labels(name)  # the series exists at 0 before the first error
    for gauge, field in _POOL_GAUGES:
        gauge.labels(name, spec.gpu_model, spec.provider).set(getattr(status, field))


def record_terminating(pool: str, waiting: dict[str, str]) -> None:
    """allocation -> namespace, for this pool's deleted allocations whose namespace has not gone yet."""
    current = set(waiting.items())
    for allocation, namespace in _terminating_series.get(pool, set()) - current:
        with contextlib.suppress(KeyError):
            namespace_terminating.remove(pool, allocation, namespace)
    for allocation, namespace in current:
        namespace_terminating.labels(pool, allocation, namespace).set(1)
    _terminating_series[pool] = current


def forget_pool(name: str, spec: GpuPoolSpec) -> None:
    """Deleted pools drop their series instead of freezing at the last value."""
    allocations.drop(name)
    record_terminating(name, {})
    for metric in (reconcile_errors, reconcile_duration, writes_in_flight):
        with contextlib.suppress(KeyError):
            metric.remove(name)
    for part in PASS_PARTS:
        with contextlib.suppress(KeyError):
            reconcile_part.remove(name, part)
    for gauge, _ in _POOL_GAUGES:
        with contextlib.suppress(KeyError):
            gauge.remove(name, spec.gpu_model, spec.provider)


leader = Gauge("gpuaas_leader", "1 on the replica that holds the leader Lease and runs pool passes, 0 on a standby.")
_running_daemons = 0


@dataclass
class Readiness:
    """Ready means: this replica can answer the admission requests sent to it. Standbys are ready too (their indexes
    are as live as the leader's); outside the cluster, the leader first points the webhooks at itself."""

    indexes_warm: bool = False
    registration_needed: bool = False
    registered: bool = False
    leading: bool = False

    def problem(self) -> str | None:
        if not self.indexes_warm:
            return "indexes still loading"
        if self.leading and self.registration_needed and not self.registered:
            return "webhooks not registered yet"
        return None


readiness = Readiness()


def set_leading(leading: bool) -> None:
    readiness.leading = leading
    leader.set(1 if leading else 0)


def daemon_started() -> None:
    global _running_daemons  # noqa: PLW0603 - one process-wide count
    _running_daemons += 1


def daemon_stopped() -> None:
    global _running_daemons  # noqa: PLW0603 - one process-wide count
    _running_daemons = max(0, _running_daemons - 1)


def running_daemons() -> int:
    return _running_daemons


Review = Callable[[str], MetricsAccess]
PUBLISH_INTERVAL_SECONDS = 1.0  # readiness, and the exposition whenever a scrape asks
# The exposition unasked: rendering and copying the 2.5 MB of 3,000 allocations every second was about a twentieth of
# the operator's CPU under churn. A scrape that asks still gets a fresh copy when the operator sends it within the
# server's wait, else one at most this old.
EXPOSITION_INTERVAL_SECONDS = 5.0
PIPE_BYTES = 1 << 20  # Linux's default limit for an unprivileged pipe


def exposition() -> bytes:
    return generate_latest(REGISTRY) + allocations.exposition()


def readiness_frame() -> bytes:
    """A 3-digit HTTP status, then /readyz's body: open, for the kubelet's probe (the Services route only to ready
    replicas)."""
    problem = readiness.problem()
    if problem:
        return f"503{problem}\n".encode()
    return f"200ok ({'leader' if readiness.leading else 'standby'})\n".encode()


class MetricsServer:
    """The metrics server process (gpuaas/metrics_server.py) and the two threads that feed it: one sends readiness
    every second and the exposition every 5 s and whenever a scrape asks, the other answers its questions."""

    def __init__(self, port: int, review: Review | None) -> None:
        self._port = port
        self._review = review
        self._wanted = threading.Event()
        self._write_lock = threading.Lock()
        self._stopping = False
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._spawn()
        threading.Thread(target=self._publish_forever, daemon=True, name="metrics-publish").start()

    def _spawn(self) -> None:
        command = [sys.executable, "-m", "gpuaas.metrics_server", str(self._port)]
        self.process = subprocess.Popen(
            [*command, "--auth"] if self._review else command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        if self.process.stdin is not None:
            with contextlib.suppress(OSError, AttributeError):  # a larger pipe: a copy in a few writes, not forty
                fcntl.fcntl(self.process.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        threading.Thread(target=self._answer_forever, args=(self.process,), daemon=True, name="metrics-ask").start()

    def stop(self) -> None:
        """Close its stdin: the server exits, as it does when this process ends."""
        self._stopping = True
        if self.process is not None and self.process.stdin is not None:
            with self._write_lock:
                self.process.stdin.close()

    def _send(self, kind: bytes, payload: bytes) -> None:
        process = self.process
        if process is None or process.stdin is None:
            return
        with self._write_lock, contextlib.suppress(BrokenPipeError, ValueError):  # gone: _answer_forever respawns
            write_frame(process.stdin, kind, payload)

    def _publish_forever(self) -> None:
        sent_at = -EXPOSITION_INTERVAL_SECONDS
        while not self._stopping:
            wanted = self._wanted.wait(PUBLISH_INTERVAL_SECONDS)
            self._wanted.clear()
            self._send(b"R", readiness_frame())  # before the exposition, which a fresh scrape waits for
            if wanted or time.monotonic() - sent_at >= EXPOSITION_INTERVAL_SECONDS:
                sent_at = time.monotonic()
                self._send(b"M", exposition())

    def _answer_forever(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        while (frame := read_frame(process.stdout)) is not None:
            kind, payload = frame
            if kind == b"F":
                self._wanted.set()
            elif kind == b"Q" and self._review is not None:
                threading.Thread(target=self._answer_review, args=(json.loads(payload),), daemon=True).start()
        code = process.wait()
        if process.stdin is not None:
            with self._write_lock, contextlib.suppress(OSError):  # unflushed bytes have no reader left
                process.stdin.close()
        if not self._stopping:
            logger.error("the metrics server exited with %s; starting it again", code)
            time.sleep(1)
            self._spawn()

    def _answer_review(self, question: dict[str, Any]) -> None:
        assert self._review is not None
        try:
            access = self._review(question["token"])
        except Exception:  # the scrape gets a 503 at once rather than after the server's wait
            logger.exception("metrics access review failed")
            access = MetricsAccess(503, "the token could not be reviewed")
        answer = {"question": question["question"], "status": access.status, "reason": access.reason}
        self._send(b"A", json.dumps(answer).encode())


def serve(port: int, review: Review | None = None) -> None:
    """/metrics (for scrapers the API server says may read it, when `review` is set) and /readyz on `port`."""
    MetricsServer(port, review).start()
