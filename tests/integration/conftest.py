"""The integration tier: one real local control plane per test run, and the operator as a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client

from gpuaas.domain.scenarios import SCENARIOS, Scenario, pool_manifest
from gpuaas.k8s import localcluster
from gpuaas.k8s.client import new_api_client
from gpuaas.k8s.manifests import load_manifests, server_side_apply
from tests.waiting import wait_for

# Concurrent test runs on one machine need different clusters.
CLUSTER_NAME = os.environ.get("GPUAAS_TEST_CLUSTER", "gpuaas-test")
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class LocalCluster:
    name: str
    kubeconfig: Path
    binaries: localcluster.Binaries
    api: client.ApiClient

    def kwokctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return localcluster.kwokctl(self.binaries, *args, "--name", self.name)

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binaries.kubectl), "--kubeconfig", str(self.kubeconfig), *args],
            check=check,
            text=True,
            capture_output=True,
            input=stdin,
        )


def start_cluster(name: str, scenario: Scenario) -> LocalCluster:
    """A fresh local control plane with the scenario's nodes and pools and gpuaas's CRDs (an old one of that name
    is deleted first). The caller deletes it with `stop_cluster`."""
    binaries = localcluster.ensure_binaries()
    kubeconfig = REPO / ".cluster" / f"{name}.kubeconfig"
    localcluster.delete_cluster(binaries, name, kubeconfig)
    localcluster.create_cluster(binaries, name, kubeconfig)
    localcluster.wait_for_apiserver(kubeconfig)
    localcluster.create_nodes(kubeconfig, scenario, lambda _: None)
    api = new_api_client(str(kubeconfig))
    crds = load_manifests((REPO / "crds").glob("*.yaml"))
    for manifest in crds:
        server_side_apply(api, manifest)
    localcluster.wait_for_crds(api, [m["metadata"]["name"] for m in crds])
    for pool in scenario.pools:
        server_side_apply(api, pool_manifest(pool))
    return LocalCluster(name, kubeconfig, binaries, api)


def stop_cluster(name: str) -> None:
    if not os.environ.get("GPUAAS_KEEP_CLUSTER"):
        localcluster.delete_cluster(localcluster.ensure_binaries(), name, REPO / ".cluster" / f"{name}.kubeconfig")


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    try:
        started = start_cluster(CLUSTER_NAME, SCENARIOS["small"])
        yield started
        started.api.close()
    finally:
        stop_cluster(CLUSTER_NAME)


class OperatorProcess:
    """`gpuaas run` as a real subprocess, so tests can kill and restart it like a crashed pod."""

    def __init__(
        self, kubeconfig: Path, log_path: Path, extra_args: tuple[str, ...] = (), webhook_host: str = "127.0.0.1"
    ) -> None:
        self.extra_args = extra_args
        self.webhook_host = webhook_host  # the address the API server calls the webhooks at
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.webhook_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready: bool = True, env: dict[str, str] | None = None) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "gpuaas", "run",
                "--kubeconfig", str(self.kubeconfig),
                "--metrics-port", str(self.metrics_port),
                "--health-port", str(self.health_port),
                "--pool-resync-seconds", "0.5",
                "--webhook-port", str(self.webhook_port),
                "--webhook-url", f"https://{self.webhook_host}:{self.webhook_port}",
                "--webhook-cert-dir", str(self.log_path.parent / "webhook"),
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        self.wait_healthy(ready=ready)

    def wait_healthy(self, timeout: float = 60.0, ready: bool = True) -> None:
        """Up (kopf's liveness) or, with `ready`, reconciling: a pass ran, webhooks registered, indexes loaded."""
        endpoint = (
            f"http://127.0.0.1:{self.metrics_port}/readyz" if ready else f"http://127.0.0.1:{self.health_port}/healthz"
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"operator exited with {self.process.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(endpoint, timeout=1) as response:  # noqa: S310 - an http URL built here
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"operator not healthy within {timeout}s; see {self.log_path}")

    def series(self, name: str) -> float:
        """One series' value on the operator's /metrics (`name` with its labels, as exposed), 0 if absent."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        prefix = f"{name} "
        return next((float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix)), 0.0)

    def passes(self, pool: str) -> int:
        """The pool's reconcile passes so far."""
        return int(self.series(f'gpuaas_reconcile_duration_seconds_count{{pool="{pool}"}}'))

    def wait_passes(self, pool: str, count: int = 3) -> None:
        """Until the pool has run `count` more passes: what a later pass could change, it has changed by then."""
        target = self.passes(pool) + count
        wait_for(lambda: self.passes(pool) >= target, timeout=30, message=f"{count} more passes of pool {pool}")

    @contextmanager
    def restarted_with(self, *args: str) -> Iterator[OperatorProcess]:
        """Restarted with `args` added to its command line, and back as it was afterwards."""
        plain = self.extra_args
        self.stop()
        self.extra_args = (*plain, *args)
        self.start()
        try:
            yield self
        finally:
            self.stop()
            self.extra_args = plain
            self.start()

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, as when a node dies under the operator."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="session")
def operator(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    process = OperatorProcess(cluster.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log")
    process.start()
    yield process
    process.stop()
