"""Two replicas with kopf peering: exactly one reconciles, and the standby takes over when it dies."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuaas.domain.scenarios import SCENARIOS
from gpuaas.k8s.manifests import load_manifests, server_side_apply
from tests.integration.allocations import (
    allocation_manifest,
    create_allocation,
    delete_allocation,
    unique,
    wait_for_ready,
)
from tests.integration.conftest import REPO, LocalCluster, OperatorProcess, wait_for

pytestmark = pytest.mark.integration
H200 = SCENARIOS["small"].pools[1]
PEERING = "gpuaas-it"


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 - http URLs built here
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def passes(replica: OperatorProcess) -> float:
    """Reconcile passes this replica has run, from its own /metrics."""
    _, text = get(f"http://127.0.0.1:{replica.metrics_port}/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gpuaas_reconcile_duration_seconds_count")
    )


def ready(replica: OperatorProcess) -> bool:
    return get(f"http://127.0.0.1:{replica.metrics_port}/readyz")[0] == 200


@pytest.fixture
def replicas(
    cluster: LocalCluster, operator: OperatorProcess, tmp_path: Path
) -> Iterator[tuple[OperatorProcess, OperatorProcess]]:
    """The session's standalone operator steps aside for two peered replicas, and comes back afterwards."""
    for manifest in load_manifests([REPO / "helm" / "gpuaas" / "files" / "kopf" / "peering-crds.yaml"]):
        server_side_apply(cluster.api, manifest)
    wait_for(lambda: cluster.kubectl("get", "clusterkopfpeerings", check=False).returncode == 0, message="CRDs")
    server_side_apply(
        cluster.api, {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING}}
    )
    operator.stop()
    leader, standby = (
        OperatorProcess(
            cluster.kubeconfig, tmp_path / role / "operator.log", ("--peering", PEERING, "--peering-priority", priority)
        )
        for role, priority in (("leader", "200"), ("standby", "100"))
    )
    for replica in (leader, standby):  # the standby finds a higher-priority peer and pauses at once
        replica.log_path.parent.mkdir(parents=True)
        replica.start(ready=replica is leader)
    try:
        yield leader, standby
    finally:
        leader.stop()
        standby.stop()
        operator.start()


def test_one_replica_reconciles_and_the_standby_takes_over(
    cluster: LocalCluster, replicas: tuple[OperatorProcess, OperatorProcess]
) -> None:
    leader, standby = replicas
    first, second = unique("peer"), unique("peer")
    create_allocation(cluster, allocation_manifest(first, H200.name, 8))
    try:
        wait_for_ready(cluster, first)
        wait_for(lambda: ready(leader), message="leader ready")
        assert passes(leader) > 0
        assert passes(standby) == 0
        assert not ready(standby)

        leader.kill()
        create_allocation(cluster, allocation_manifest(second, H200.name, 8))
        wait_for_ready(cluster, second, timeout=90)
        assert passes(standby) > 0
        assert ready(standby)
    finally:
        for name in (first, second):
            delete_allocation(cluster, name)
