"""A tenant (an owner, or a service account in its namespace) tries to leave its pool or quota."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from gpuaas.domain.scenarios import SCENARIOS
from tests.integration.allocations import allocation, allocation_manifest, gpu_pod, pod_phase, unique, wait_for_ready
from tests.integration.conftest import LocalCluster, OperatorProcess, wait_for

pytestmark = pytest.mark.integration
B200, H200 = SCENARIOS["small"].pools
ROBOT = "ci-bot"


@pytest.fixture(scope="module")
def tenant(cluster: LocalCluster, operator: OperatorProcess) -> Iterator[str]:
    """A tenant on the H200 pool whose owners are alice and a service account of its own namespace."""
    name = unique("tenant")
    owners = [{"kind": "User", "name": "alice"}, {"kind": "ServiceAccount", "name": ROBOT}]
    with allocation(cluster, allocation_manifest(name, H200.name, 16, owners=owners)):
        wait_for_ready(cluster, name)
        client.CoreV1Api(cluster.api).create_namespaced_service_account(name, {"metadata": {"name": ROBOT}})
        yield name


def actors(namespace: str) -> list[str]:
    return ["alice", f"system:serviceaccount:{namespace}:{ROBOT}"]


def as_tenant(cluster: LocalCluster, actor: str, *args: str, manifest: dict[str, Any] | None = None) -> str:
    """Run kubectl as the tenant; returns stderr of a refused request, and fails the test if it was accepted."""
    stdin = json.dumps(manifest) if manifest is not None else None
    result = cluster.kubectl("--as", actor, *args, check=False, stdin=stdin)
    assert result.returncode != 0, f"{actor} was allowed: kubectl {' '.join(args)}: {result.stdout}"
    return result.stderr


def escaping_pod(namespace: str, **spec: Any) -> dict[str, Any]:
    return gpu_pod(unique("escape"), namespace, 1, **spec)


OTHER_POOL_AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": "gpuaas.io/pool", "operator": "In", "values": [B200.name]}]}
            ]
        }
    }
}
POD_ESCAPES = {
    "nodeName": ({"nodeName": f"{B200.name}-0000"}, "spec.nodeName"),
    "wildcard-toleration": ({"tolerations": [{"operator": "Exists"}]}, "tolerates every taint"),
    "other-pool-toleration": (
        {"tolerations": [{"key": "gpuaas.io/pool", "operator": "Equal", "value": B200.name, "effect": "NoSchedule"}]},
        B200.name,
    ),
    "other-pool-affinity": ({"affinity": OTHER_POOL_AFFINITY}, B200.name),
}


@pytest.mark.parametrize("escape", list(POD_ESCAPES))
@pytest.mark.parametrize("actor_index", [0, 1], ids=["owner", "serviceaccount"])
def test_pod_escapes_are_refused(cluster: LocalCluster, tenant: str, escape: str, actor_index: int) -> None:
    spec, expected = POD_ESCAPES[escape]
    error = as_tenant(cluster, actors(tenant)[actor_index], "apply", "-f", "-", manifest=escaping_pod(tenant, **spec))
    assert "denied the request" in error
    assert expected in error


def test_other_pool_node_selector_is_reverted(cluster: LocalCluster, tenant: str) -> None:
    """The mutating webhook forces the pool's own selector over one aimed at another pool."""
    name = unique("selector")
    pod = gpu_pod(name, tenant, 1, nodeSelector={"gpuaas.io/pool": B200.name})
    cluster.kubectl("--as", "alice", "apply", "-f", "-", stdin=json.dumps(pod))
    wait_for(lambda: pod_phase(cluster, name, tenant) == "Running", message="pod Running")
    placed = client.CoreV1Api(cluster.api).read_namespaced_pod(name, tenant)
    assert placed.spec.node_selector["gpuaas.io/pool"] == H200.name
    assert placed.spec.node_name.startswith(H200.name)
    client.CoreV1Api(cluster.api).delete_namespaced_pod(name, tenant)
    wait_for(lambda: pod_phase(cluster, name, tenant) is None, message="pod booked and gone")


def test_gpus_in_init_containers_count_against_quota(cluster: LocalCluster, tenant: str) -> None:
    pod = gpu_pod(unique("init"), tenant, 1)
    pod["spec"]["initContainers"] = [
        {"name": "grab", "image": "busybox", "resources": {"limits": {"nvidia.com/gpu": "64"}}}
    ]
    error = as_tenant(cluster, "alice", "apply", "-f", "-", manifest=pod)
    assert "exceeded quota" in error


def test_limits_only_gpus_are_fenced_and_booked(cluster: LocalCluster, tenant: str) -> None:
    name = unique("limits")
    cluster.kubectl("--as", "alice", "apply", "-f", "-", stdin=json.dumps(gpu_pod(name, tenant, 8)))
    wait_for(lambda: pod_phase(cluster, name, tenant) == "Running", message="pod Running")
    pod = client.CoreV1Api(cluster.api).read_namespaced_pod(name, tenant)
    assert pod.spec.node_name.startswith(H200.name)
    assert "gpuaas.io/usage-ledger" in pod.metadata.finalizers
    quota = client.CoreV1Api(cluster.api).read_namespaced_resource_quota("gpuaas-quota", tenant)
    assert quota.status.used["requests.nvidia.com/gpu"] == "8"
    client.CoreV1Api(cluster.api).delete_namespaced_pod(name, tenant)
    wait_for(lambda: pod_phase(cluster, name, tenant) is None, message="pod booked and gone")


@pytest.mark.parametrize("actor_index", [0, 1], ids=["owner", "serviceaccount"])
def test_quota_and_limit_range_cannot_be_changed(cluster: LocalCluster, tenant: str, actor_index: int) -> None:
    actor = actors(tenant)[actor_index]
    raise_quota = '{"spec":{"hard":{"requests.nvidia.com/gpu":"1000"}}}'
    assert "forbidden" in as_tenant(cluster, actor, "-n", tenant, "patch", "quota", "gpuaas-quota", "-p", raise_quota)
    assert "forbidden" in as_tenant(cluster, actor, "-n", tenant, "delete", "quota", "gpuaas-quota")
    assert "forbidden" in as_tenant(cluster, actor, "-n", tenant, "delete", "limitrange", "gpuaas-limits")
    # RBAC lets a namespace admin delete RoleBindings; the guard webhook keeps gpuaas's own.
    assert "denied the request" in as_tenant(cluster, actor, "-n", tenant, "delete", "rolebinding", "gpuaas-owners")


@pytest.mark.parametrize("subresource", ["", "status", "finalize"])
def test_namespace_labels_cannot_be_changed(cluster: LocalCluster, tenant: str, subresource: str) -> None:
    patch = '{"metadata":{"labels":{"gpuaas.io/managed":null,"gpuaas.io/pool":"test-b200"}}}'
    args = ["patch", "namespace", tenant, "--type", "merge", "-p", patch]
    if subresource:
        args += ["--subresource", subresource]
    for actor in actors(tenant):
        assert "forbidden" in as_tenant(cluster, actor, *args).lower()
    labels = client.CoreV1Api(cluster.api).read_namespace(tenant).metadata.labels
    assert labels["gpuaas.io/managed"] == "true"
    assert labels["gpuaas.io/pool"] == H200.name


def test_cannot_bind_cluster_admin(cluster: LocalCluster, tenant: str) -> None:
    for actor in actors(tenant):
        error = as_tenant(
            cluster, actor, "-n", tenant, "create", "rolebinding", unique("grab"), "--clusterrole", "cluster-admin",
            "--user", "alice",
        )  # fmt: skip
        assert "forbidden" in error


def test_cannot_create_pods_in_another_tenants_namespace(cluster: LocalCluster, tenant: str) -> None:
    other = unique("other")
    with allocation(cluster, allocation_manifest(other, B200.name, 8, owners=[{"kind": "User", "name": "bob"}])):
        wait_for_ready(cluster, other)
        for actor in actors(tenant):
            error = as_tenant(cluster, actor, "apply", "-f", "-", manifest=gpu_pod(unique("intruder"), other, 1))
            assert "forbidden" in error
