"""GpuAllocation end to end on a real API server: tenant space, quota, fence, bad input, lifecycle."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from kubernetes import client

from gpuaas.domain.scenarios import SCENARIOS
from tests.integration.allocations import (
    allocation,
    allocation_manifest,
    condition,
    gpu_pod,
    pod_phase,
    status_of,
    unique,
    wait_for_phase,
    wait_for_ready,
)
from tests.integration.conftest import LocalCluster, OperatorProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
B200, H200 = SCENARIOS["small"].pools


def test_happy_path_tenant_space_and_gpu_pod(cluster: LocalCluster, operator: OperatorProcess) -> None:
    name = unique("lab")
    with allocation(cluster, allocation_manifest(name, H200.name, 16)):
        status = wait_for_ready(cluster, name)
        assert status["phase"] == "Active"
        assert status["grantedGPUs"] == 16
        assert status["namespace"] == name
        for kind in ("Admitted", "QuotaApplied", "Fenced"):
            assert condition(status, kind)["status"] == "True", kind

        core = client.CoreV1Api(cluster.api)
        namespace = core.read_namespace(name)
        labels = namespace.metadata.labels
        assert labels["gpuaas.io/managed"] == "true"
        assert labels["gpuaas.io/allocation"] == name
        assert labels["gpuaas.io/pool"] == H200.name
        quota = core.read_namespaced_resource_quota("gpuaas-quota", name)
        assert quota.spec.hard["requests.nvidia.com/gpu"] == "16"
        assert core.read_namespaced_limit_range("gpuaas-limits", name).spec.limits
        binding = client.RbacAuthorizationV1Api(cluster.api).read_namespaced_role_binding("gpuaas-owners", name)
        assert binding.role_ref.name == "admin"
        assert [s.name for s in binding.subjects] == ["alice"]

        # The tenant runs a GPU pod: it is pinned to the pool and runs there.
        cluster.kubectl("--as", "alice", "apply", "-f", "-", stdin=json.dumps(gpu_pod("train-0", name, 8)))
        wait_for(lambda: pod_phase(cluster, "train-0", name) == "Running", message="GPU pod Running")
        pod = core.read_namespaced_pod("train-0", name)
        assert pod.spec.node_name.startswith(H200.name)
        assert pod.spec.node_selector["gpuaas.io/pool"] == H200.name
        assert "gpuaas.io/usage-ledger" in pod.metadata.finalizers
        wait_for(lambda: status_of(cluster, name).get("inUseGPUs") == 8, message="inUseGPUs 8")

        # Over quota: 8 + 16 > 16 is refused by the API server's quota admission.
        over = cluster.kubectl(
            "--as", "alice", "apply", "-f", "-", stdin=json.dumps(gpu_pod("too-big", name, 16)), check=False
        )
        assert over.returncode != 0
        assert "exceeded quota" in over.stderr


def test_pool_status_counts_grants(cluster: LocalCluster, operator: OperatorProcess) -> None:
    name = unique("grant")
    with allocation(cluster, allocation_manifest(name, B200.name, 8)):
        wait_for_ready(cluster, name)
        pool = wait_for(
            lambda: (
                (
                    p := client.CustomObjectsApi(cluster.api).get_cluster_custom_object(
                        "gpuaas.io", "v1alpha1", "gpupools", B200.name
                    )["status"]
                ).get("grantedGPUs")
                == 8
                and p
            ),
            message="pool grantedGPUs 8",
        )
        assert pool["availableGPUs"] == B200.gpus - 8
    output = cluster.kubectl("get", "gpuallocations").stdout
    assert name not in output


def test_window_scheduled_active_expired_keeps_namespace(cluster: LocalCluster, operator: OperatorProcess) -> None:
    name = unique("short")
    now = datetime.now(UTC)
    manifest = allocation_manifest(
        name, B200.name, 8, start=now + timedelta(seconds=6), end=now + timedelta(seconds=16), gracePeriodSeconds=2
    )
    with allocation(cluster, manifest):
        status = wait_for_phase(cluster, name, "Scheduled", timeout=10)
        assert status["grantedGPUs"] == 8
        assert condition(status, "Ready")["status"] == "False"
        core = client.CoreV1Api(cluster.api)
        assert core.read_namespaced_resource_quota("gpuaas-quota", name).spec.hard["requests.nvidia.com/gpu"] == "0"
        wait_for_ready(cluster, name, timeout=20)
        cluster.kubectl("--as", "alice", "apply", "-f", "-", stdin=json.dumps(gpu_pod("job", name, 8)))
        wait_for(lambda: pod_phase(cluster, "job", name) == "Running", message="pod Running")
        core.create_namespaced_persistent_volume_claim(
            name,
            {
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            },
        )
        wait_for_phase(cluster, name, "Expired", timeout=30)
        wait_for(
            lambda: (
                core.read_namespaced_resource_quota("gpuaas-quota", name).spec.hard["requests.nvidia.com/gpu"] == "0"
            ),
            message="quota closed",
        )
        wait_for(lambda: pod_phase(cluster, "job", name) is None, timeout=30, message="GPU pod stopped")
        assert core.read_namespace(name).status.phase == "Active"
        assert core.read_namespaced_persistent_volume_claim("data", name).metadata.name == "data"


def test_retain_deletion_keeps_namespace_released(cluster: LocalCluster, operator: OperatorProcess) -> None:
    name = unique("keep")
    manifest = allocation_manifest(name, H200.name, 8, deletionPolicy="Retain")
    core = client.CoreV1Api(cluster.api)
    with allocation(cluster, manifest):
        wait_for_ready(cluster, name)
        core.create_namespaced_config_map(name, {"metadata": {"name": "results"}, "data": {"acc": "0.91"}})
    namespace = core.read_namespace(name)
    assert namespace.metadata.labels["gpuaas.io/released"] == "true"
    assert core.read_namespaced_config_map("results", name).data == {"acc": "0.91"}
    assert core.read_namespaced_resource_quota("gpuaas-quota", name).spec.hard["requests.nvidia.com/gpu"] == "0"
    bindings = client.RbacAuthorizationV1Api(cluster.api).list_namespaced_role_binding(name).items
    assert "gpuaas-owners" not in [b.metadata.name for b in bindings]
    # A released namespace gets no GPUs even from a cluster admin's pod.
    refused = cluster.kubectl("apply", "-f", "-", stdin=json.dumps(gpu_pod("late", name, 1)), check=False)
    assert refused.returncode != 0
    assert "released" in refused.stderr
    core.delete_namespace(name)


def test_delete_policy_removes_namespace(cluster: LocalCluster, operator: OperatorProcess) -> None:
    name = unique("gone")
    core = client.CoreV1Api(cluster.api)
    with allocation(cluster, allocation_manifest(name, H200.name, 8)):
        wait_for_ready(cluster, name)
        cluster.kubectl("--as", "alice", "apply", "-f", "-", stdin=json.dumps(gpu_pod("p", name, 8)))
        wait_for(lambda: pod_phase(cluster, "p", name) == "Running", message="pod Running")

    def namespace_gone() -> bool:
        return name not in [ns.metadata.name for ns in core.list_namespace().items]

    wait_for(namespace_gone, timeout=60, message="namespace deleted")
