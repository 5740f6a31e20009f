"""GpuPool status follows real Node objects on a real kube-apiserver, without operator restarts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from gpuaas.domain.scenarios import SCENARIOS, node_manifest, node_name
from tests.integration.allocations import pool_status
from tests.integration.conftest import LocalCluster, OperatorProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
SMALL = SCENARIOS["small"]
B200 = SMALL.pools[0]


def pinned_kubernetes_version() -> str:
    env = (Path(__file__).resolve().parents[2] / "tools" / "versions.env").read_text()
    return next(line.split("=", 1)[1] for line in env.splitlines() if line.startswith("KUBERNETES_VERSION="))


def wait_for_capacity(cluster: LocalCluster, pool: str, gpus: int, timeout: float = 30) -> dict[str, Any]:
    status: dict[str, Any] = wait_for(
        lambda: (s := pool_status(cluster, pool)).get("capacityGPUs") == gpus and s,
        timeout=timeout,
        message=f"{pool} capacityGPUs == {gpus}",
    )
    return status


def test_apiserver_is_the_pinned_build(cluster: LocalCluster) -> None:
    version = client.VersionApi(cluster.api).get_code()
    assert version.git_version == pinned_kubernetes_version()
    assert version.git_tree_state == "clean"


def test_pools_report_every_node_healthy(cluster: LocalCluster, operator: OperatorProcess) -> None:
    for pool in SMALL.pools:
        status = wait_for_capacity(cluster, pool.name, pool.gpus)
        assert status["nodes"] == pool.nodes
        assert status["readyNodes"] == pool.nodes
        assert status["programGPUs"] == pool.gpus
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True"


def test_kubectl_shows_pool_columns(cluster: LocalCluster, operator: OperatorProcess) -> None:
    wait_for_capacity(cluster, B200.name, B200.gpus)
    output = cluster.kubectl("get", "gp", B200.name).stdout
    header, row = output.splitlines()[:2]
    assert header.split()[:5] == ["NAME", "MODEL", "PROVIDER", "NODES", "READY"]
    assert row.split()[:6] == [B200.name, "B200", "nhn", str(B200.nodes), str(B200.nodes), str(B200.gpus)]


def test_cordoned_node_leaves_capacity_and_returns(cluster: LocalCluster, operator: OperatorProcess) -> None:
    core = client.CoreV1Api(cluster.api)
    node = node_name(B200, 0)
    wait_for_capacity(cluster, B200.name, B200.gpus)
    core.patch_node(node, {"spec": {"unschedulable": True}})
    try:
        status = wait_for_capacity(cluster, B200.name, B200.gpus - 8)
        assert status["readyNodes"] == B200.nodes  # cordoned is still Ready, just not schedulable
        degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
        assert degraded["status"] == "True"
    finally:
        core.patch_node(node, {"spec": {"unschedulable": False}})
    wait_for_capacity(cluster, B200.name, B200.gpus)


def test_added_and_removed_nodes_change_capacity(cluster: LocalCluster, operator: OperatorProcess) -> None:
    core = client.CoreV1Api(cluster.api)
    extra = node_manifest(B200, 900)
    wait_for_capacity(cluster, B200.name, B200.gpus)
    core.create_node(extra)
    try:
        status = wait_for_capacity(cluster, B200.name, B200.gpus + 8)
        assert status["nodes"] == B200.nodes + 1
    finally:
        core.delete_node(node_name(B200, 900))
    status = wait_for_capacity(cluster, B200.name, B200.gpus)
    assert status["nodes"] == B200.nodes


def test_not_ready_node_leaves_capacity(cluster: LocalCluster, operator: OperatorProcess) -> None:
    """A node nobody heartbeats for (not managed by KWOK) whose Ready condition we flip by hand."""
    core = client.CoreV1Api(cluster.api)
    manifest = node_manifest(B200, 901)
    manifest["metadata"]["annotations"] = {}  # type: ignore[index]
    name = node_name(B200, 901)
    core.create_node(manifest)
    try:
        ready = {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test"}
        core.patch_node_status(name, {"status": {"conditions": [ready]}})
        wait_for_capacity(cluster, B200.name, B200.gpus + 8)
        core.patch_node_status(name, {"status": {"conditions": [{**ready, "status": "False"}]}})
        status = wait_for_capacity(cluster, B200.name, B200.gpus)
        assert status["readyNodes"] == B200.nodes
    finally:
        core.delete_node(name)
