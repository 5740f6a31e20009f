"""Two replicas sharing a Lease: exactly one reconciles, the standby is warm (ready, indexes live) and takes over
when the leader dies, and at once when the leader stops cleanly."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from gpuaas.domain.scenarios import SCENARIOS
from tests.integration.allocations import (
    allocation_manifest,
    create_allocation,
    delete_allocation,
    unique,
    wait_for_ready,
)
from tests.integration.conftest import LocalCluster, OperatorProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
H200 = SCENARIOS["small"].pools[1]
LEASE = "gpuaas-it"
LEASE_NAMESPACE = "default"


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 - http URLs built here
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metric(replica: OperatorProcess, prefix: str) -> float:
    """The sum of one metric's samples on this replica's own /metrics."""
    _, text = get(f"http://127.0.0.1:{replica.metrics_port}/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def passes(replica: OperatorProcess) -> float:
    return metric(replica, "gpuaas_reconcile_duration_seconds_count")


def readyz(replica: OperatorProcess) -> tuple[int, str]:
    return get(f"http://127.0.0.1:{replica.metrics_port}/readyz")


def identity(replica: OperatorProcess) -> str:
    assert replica.process is not None
    return f"{socket.gethostname()}-{replica.process.pid}"


def holder(cluster: LocalCluster) -> str:
    lease: Any = client.CoordinationV1Api(cluster.api).read_namespaced_lease(LEASE, LEASE_NAMESPACE)
    return str(lease.spec.holder_identity or "")


@pytest.fixture
def replicas(
    cluster: LocalCluster, operator: OperatorProcess, tmp_path: Path
) -> Iterator[tuple[OperatorProcess, OperatorProcess]]:
    """The session's standalone operator steps aside for two replicas on one Lease, and comes back afterwards."""
    operator.stop()
    leader, standby = (
        OperatorProcess(
            cluster.kubeconfig,
            tmp_path / role / "operator.log",
            ("--leader-lease", LEASE, "--leader-lease-namespace", LEASE_NAMESPACE, "--leader-lease-seconds", "3"),
        )
        for role in ("leader", "standby")
    )
    for replica in (leader, standby):  # the first takes the Lease; the second finds it held
        replica.log_path.parent.mkdir(parents=True)
        replica.start()
    try:
        yield leader, standby
    finally:
        leader.stop()
        standby.stop()
        client.CoordinationV1Api(cluster.api).delete_namespaced_lease(LEASE, LEASE_NAMESPACE)
        operator.start()


def test_one_replica_reconciles_and_the_warm_standby_takes_over(
    cluster: LocalCluster, replicas: tuple[OperatorProcess, OperatorProcess]
) -> None:
    leader, standby = replicas
    first, second = unique("lead"), unique("lead")
    create_allocation(cluster, allocation_manifest(first, H200.name, 8))
    try:
        wait_for_ready(cluster, first)
        assert holder(cluster) == identity(leader)
        assert passes(leader) > 0
        assert metric(leader, "gpuaas_leader ") == 1
        # The standby runs no pass and exports no pool series, but is ready: its indexes are live.
        assert passes(standby) == 0
        assert metric(standby, "gpuaas_leader ") == 0
        assert metric(standby, "gpuaas_pool_capacity_gpus") == 0
        assert readyz(standby) == (200, "ok (standby)\n")
        assert readyz(leader) == (200, "ok (leader)\n")

        leader.kill()  # no chance to hand over: the standby waits for the Lease to run out
        wait_for(lambda: holder(cluster) == identity(standby), timeout=30, message="the standby holding the Lease")
        create_allocation(cluster, allocation_manifest(second, H200.name, 8))
        wait_for_ready(cluster, second, timeout=90)
        assert passes(standby) > 0
        assert readyz(standby) == (200, "ok (leader)\n")
    finally:
        for name in (first, second):
            delete_allocation(cluster, name)


def test_a_leader_that_stops_cleanly_hands_the_lease_over(
    cluster: LocalCluster, replicas: tuple[OperatorProcess, OperatorProcess]
) -> None:
    leader, standby = replicas
    wait_for(lambda: passes(leader) > 0, message="the leader's first pass")
    leader.stop()  # SIGTERM: the last pass ends, then the Lease is released
    # Released before the process exited: already empty, or already taken by the standby, never the dead leader.
    assert holder(cluster) in ("", identity(standby))
    assert "released lease" in leader.log_path.read_text()
    wait_for(lambda: holder(cluster) == identity(standby), timeout=5, message="the standby holding the Lease")
    wait_for(lambda: passes(standby) > 0, message="the standby's first pass")
