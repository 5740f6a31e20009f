"""Busy vs held: a real Prometheus scrapes a fake dcgm-exporter (the metric and labels NVIDIA's exporter publishes
for a pod's GPUs), and `gpuaas report --prometheus` puts the busy GPU-hours beside the ledger's held ones."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from kubernetes import client

from gpuaas.domain.scenarios import SCENARIOS
from tests.integration.allocations import (
    allocation_manifest,
    create_allocation,
    delete_allocation,
    gpu_pod,
    pod_phase,
    unique,
    wait_for_ready,
)
from tests.integration.conftest import LocalCluster, OperatorProcess, free_port
from tests.integration.prometheus import Prometheus, running_prometheus
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
B200, H200 = SCENARIOS["small"].pools


class FakeDcgmExporter:
    """Serves DCGM_FI_DEV_GPU_UTIL for the GPUs it is told a pod holds, as dcgm-exporter does with pod labels."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str, int], float] = {}  # (namespace, pod, gpu) -> utilisation %
        self.lock = threading.Lock()
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = exporter.exposition().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def exposition(self) -> str:
        lines = ["# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).", "# TYPE DCGM_FI_DEV_GPU_UTIL gauge"]
        with self.lock:
            for (namespace, pod, gpu), util in sorted(self.series.items()):
                labels = (
                    f'gpu="{gpu}",UUID="GPU-{gpu:08d}",device="nvidia{gpu}",modelName="NVIDIA H200",'
                    f'Hostname="test-h200-0000",container="train",namespace="{namespace}",pod="{pod}"'
                )
                lines.append(f"DCGM_FI_DEV_GPU_UTIL{{{labels}}} {util}")
        return "\n".join(lines) + "\n"

    def set(self, namespace: str, pod: str, utilisation: list[float]) -> None:
        with self.lock:
            for gpu, util in enumerate(utilisation):
                self.series[(namespace, pod, gpu)] = util

    def clear(self) -> None:
        with self.lock:
            self.series.clear()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def exporter() -> Iterator[FakeDcgmExporter]:
    fake = FakeDcgmExporter()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def prometheus(exporter: FakeDcgmExporter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    scrape = {"job_name": "dcgm-exporter", "static_configs": [{"targets": [exporter.target]}]}
    with running_prometheus(tmp_path_factory.mktemp("prometheus-dcgm"), [scrape]) as server:
        wait_for(lambda: server.values('up{job="dcgm-exporter"}') == [1.0], timeout=30, message="exporter up")
        yield server


def report(cluster: LocalCluster, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gpuaas", "report", "--month", "current", "--format", "json"]
    command += ["--kubeconfig", str(cluster.kubeconfig), "--out", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def test_busy_gpu_hours_come_from_dcgm_utilisation_beside_the_held_hours(
    cluster: LocalCluster,
    operator: OperatorProcess,
    exporter: FakeDcgmExporter,
    prometheus: Prometheus,
    tmp_path: Path,
) -> None:
    name = unique("busy")
    create_allocation(cluster, allocation_manifest(name, H200.name, 8))
    try:
        wait_for_ready(cluster, name)
        core = client.CoreV1Api(cluster.api)
        core.create_namespaced_pod(name, gpu_pod("train-0", name, 8))
        wait_for(lambda: pod_phase(cluster, "train-0", name) == "Running", message="pod Running")
        # Half of the pod's 8 GPUs compute flat out, the others idle: 4 busy GPUs while the series last.
        exporter.set(name, "train-0", [100, 100, 100, 100, 0, 0, 0, 0])
        query = f'sum(DCGM_FI_DEV_GPU_UTIL{{namespace="{name}"}})'
        wait_for(lambda: prometheus.values(query) == [400.0], message="utilisation scraped")
        started = time.time()
        time.sleep(6)
        exporter.clear()
        wait_for(lambda: prometheus.values(query) == [], message="series gone (stale)")
        lasted = time.time() - started
        core.delete_namespaced_pod("train-0", name, grace_period_seconds=0)
    finally:
        delete_allocation(cluster, name)  # books the allocation's last interval and writes the record

    out = tmp_path / "report.json"
    result = report(cluster, out, "--prometheus", prometheus.url, "--busy-step", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["allocation"]: row for row in json.loads(out.read_text())["rows"]}
    row = rows[name]
    busy_seconds = row["busyGPUHours"] * 3600
    # 4 GPUs for as long as Prometheus saw the series: between the first scrape that had them and the last one, a
    # scrape interval (1 s) either side of what the test timed.
    assert 4 * (lasted - 3) <= busy_seconds <= 4 * (lasted + 1), (busy_seconds, lasted)
    assert row["busyGPUHours"] < row["usedGPUHours"]  # held 8 GPUs the whole time, 4 of them busy for a while
    # Rows of allocations whose namespaces had no samples were measured idle, not left blank.
    assert all(other["busyGPUHours"] == 0 for key, other in rows.items() if key != name)

    unreachable = report(cluster, tmp_path / "none.json", "--prometheus", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 1
    assert "cannot read busy GPU-hours" in unreachable.stdout + unreachable.stderr
    assert not (tmp_path / "none.json").exists()
