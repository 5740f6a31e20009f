"""DRA on the local cluster: a pool whose fake nodes publish their GPUs in ResourceSlices, its quota, and the
ResourceClaims a tenant may make (tests/unit/test_dra.py has the rules)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes import client

from gpuaas.api.common import GROUP, VERSION
from gpuaas.domain.dra import DRA_GPUS_ANNOTATION
from gpuaas.domain.fence import USAGE_FINALIZER
from gpuaas.domain.scenarios import (
    SCENARIOS,
    ScenarioPool,
    device_class_manifest,
    node_manifest,
    pool_manifest,
    resource_slice_manifest,
)
from gpuaas.domain.tenant import GPU_QUOTA_KEY, QUOTA_NAME, device_class_quota_key
from tests.integration.allocations import (
    allocation,
    allocation_manifest,
    can,
    gpu_pod,
    pod_phase,
    pool_status,
    unique,
    wait_for_ready,
)
from tests.integration.conftest import LocalCluster, OperatorProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
GPU_CLASS = "gpu.nvidia.com"
DRA = ScenarioPool("test-dra", "B200", "nhn", 2, dra_class=GPU_CLASS)
H200 = SCENARIOS["small"].pools[1]


def dra_objects() -> list[dict[str, Any]]:
    return [
        device_class_manifest(GPU_CLASS),
        *(node_manifest(DRA, index) for index in range(DRA.nodes)),
        *(resource_slice_manifest(DRA, index) for index in range(DRA.nodes)),
        pool_manifest(DRA),
    ]


@pytest.fixture(scope="module")
def dra_pool(cluster: LocalCluster, operator: OperatorProcess) -> Iterator[str]:
    manifests = {"apiVersion": "v1", "kind": "List", "items": dra_objects()}
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps(manifests))
    try:
        yield DRA.name
    finally:
        cluster.kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-", stdin=json.dumps(manifests))


def claim_manifest(name: str, namespace: str, count: int | None = 2, **exactly: Any) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "devices": {
                "requests": [
                    {
                        "name": "gpus",
                        "exactly": {"deviceClassName": GPU_CLASS, **({"count": count} if count else {}), **exactly},
                    }
                ]
            }
        },
    }


def template_manifest(name: str, namespace: str, count: int = 2) -> dict[str, Any]:
    claim = claim_manifest(name, namespace, count)
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaimTemplate",
        "metadata": claim["metadata"],
        "spec": {"spec": claim["spec"]},
    }


def apply_as(cluster: LocalCluster, actor: str, manifest: dict[str, Any]) -> tuple[bool, str]:
    result = cluster.kubectl("--as", actor, "create", "-f", "-", check=False, stdin=json.dumps(manifest))
    return result.returncode == 0, result.stderr


def test_a_dra_pools_capacity_is_the_devices_its_nodes_publish(cluster: LocalCluster, dra_pool: str) -> None:
    status = wait_for(
        lambda: (s := pool_status(cluster, dra_pool)).get("capacityGPUs") == DRA.gpus and s,
        timeout=30,
        message=f"{dra_pool} capacity from ResourceSlices",
    )
    assert status["readyNodes"] == DRA.nodes


def test_a_tenant_of_a_dra_pool_claims_its_class_within_its_grant(cluster: LocalCluster, dra_pool: str) -> None:
    name = unique("dra")
    with allocation(cluster, allocation_manifest(name, dra_pool, 8)):
        wait_for_ready(cluster, name)
        quota = client.CoreV1Api(cluster.api).read_namespaced_resource_quota(QUOTA_NAME, name)
        assert quota.spec.hard[device_class_quota_key(GPU_CLASS)] == "8"
        assert quota.spec.hard[GPU_QUOTA_KEY] == "0"  # the device plugin's GPUs would be a second grant

        accepted, error = apply_as(cluster, "alice", template_manifest("two-gpus", name))
        assert accepted, error
        accepted, error = apply_as(cluster, "alice", claim_manifest("shared", name, 8))
        assert accepted, error

        refused = {
            "other-class": (claim_manifest("mig", name, deviceClassName="mig.nvidia.com"), "is not the GPU class"),
            "all": (claim_manifest("all", name, None, allocationMode="All"), "allocationMode All would take every"),
            # The API server itself refuses admin access outside namespaces labelled for it (a label tenants cannot
            # set); /validate-claims refuses it too, should a namespace ever carry that label.
            "admin": (claim_manifest("admin", name, adminAccess=True), "adminAccess: Forbidden: admin access"),
            "tolerations": (
                claim_manifest("tainted", name, tolerations=[{"operator": "Exists"}]),
                "tolerations would reach devices an administrator took out of service",
            ),
        }
        for case, (manifest, fragment) in refused.items():
            accepted, error = apply_as(cluster, "alice", manifest)
            assert not accepted, case
            assert fragment in error, (case, error)
        # The quota counts the class's devices: 8 are claimed, one more is over the grant.
        accepted, error = apply_as(cluster, "alice", claim_manifest("ninth", name, 1))
        assert not accepted
        assert "exceeded quota" in error, error
        assert f"requested: {device_class_quota_key(GPU_CLASS)}=1" in error, error
        # A claim that does not exist yet cannot be billed: the pod waits for it elsewhere, here it is refused.
        accepted, error = apply_as(cluster, "alice", claim_pod("early", name, resourceClaimName="later"))
        assert not accepted
        assert "names ResourceClaim later, which does not exist" in error, error


def claim_pod(pod: str, namespace: str, **claim: str) -> dict[str, Any]:
    container = {"name": "train", "image": "pytorch:25.01-py3", "resources": {"claims": [{"name": "gpus"}]}}
    return gpu_pod(pod, namespace, 0, containers=[container], resourceClaims=[{"name": "gpus", **claim}])


def test_a_pod_of_a_dra_pool_runs_on_its_claim_and_is_billed_for_its_devices(
    cluster: LocalCluster, dra_pool: str
) -> None:
    name = unique("dra-bill")
    core = client.CoreV1Api(cluster.api)
    with allocation(cluster, allocation_manifest(name, dra_pool, 8)):
        wait_for_ready(cluster, name)
        accepted, error = apply_as(cluster, "alice", template_manifest("two-gpus", name))
        assert accepted, error
        accepted, error = apply_as(cluster, "alice", claim_pod("train", name, resourceClaimTemplateName="two-gpus"))
        assert accepted, error
        wait_for(lambda: pod_phase(cluster, "train", name) == "Running", timeout=60, message="claim pod Running")
        pod = core.read_namespaced_pod("train", name)
        assert pod.metadata.annotations[DRA_GPUS_ANNOTATION] == '{"gpus":2}'
        assert USAGE_FINALIZER in pod.metadata.finalizers
        assert pod.spec.node_selector["gpuaas.io/pool"] == dra_pool  # pinned like any pod of the pool
        started = pod.status.container_statuses[0].state.running.started_at
        (claim,) = json.loads(cluster.kubectl("get", "resourceclaims", "-n", name, "-o", "json").stdout)["items"]
        assert len(claim["status"]["allocation"]["devices"]["results"]) == 2

        # Nor can it write a claim's allocation or its consumers (the scheduler's and the claim controller's).
        assert can(cluster, "alice", name, "get", "resourceclaims", "status")
        assert not can(cluster, "alice", name, "update", "resourceclaims", "status")
        assert not can(cluster, "alice", name, "patch", "resourceclaims", "status")
        # The tenant cannot lower what it is billed for.
        lowered = {"metadata": {"annotations": {DRA_GPUS_ANNOTATION: '{"gpus":0}'}}}
        result = cluster.kubectl(
            "--as", "alice", "-n", name, "patch", "pod", "train", "--type=merge", "-p", json.dumps(lowered), check=False
        )
        assert result.returncode != 0
        assert "only gpuaas writes it" in result.stderr

        time.sleep(3)  # GPU-seconds to book
        ended = datetime.now(UTC)  # before the call, which the server stamps truncated to its second
        core.delete_namespaced_pod("train", name, grace_period_seconds=0)
        wait_for(lambda: pod_phase(cluster, "train", name) is None, timeout=60, message="claim pod booked and released")
        expected = 2 * (ended - started).total_seconds()
        booked = wait_for(lambda: used_gpu_seconds(cluster, name), timeout=30, message="usage booked")
        assert abs(booked - expected) <= 2, (booked, expected)  # timestamps are whole seconds: 1 s per device


def test_two_pods_sharing_a_claim_are_billed_once_for_its_devices(cluster: LocalCluster, dra_pool: str) -> None:
    name = unique("dra-share")
    core = client.CoreV1Api(cluster.api)
    with allocation(cluster, allocation_manifest(name, dra_pool, 8)):
        wait_for_ready(cluster, name)
        accepted, error = apply_as(cluster, "alice", claim_manifest("team", name, 4))
        assert accepted, error
        starts = {pod: start_claim_pod(cluster, name, pod, resourceClaimName="team") for pod in ("first", "second")}
        time.sleep(4)  # both hold the claim: billing each pod's life would book these seconds twice
        core.delete_namespaced_pod("first", name, grace_period_seconds=0)
        wait_for(lambda: pod_phase(cluster, "first", name) is None, timeout=60, message="first booked and released")
        time.sleep(2)  # the second pod holds the claim on alone
        ended = datetime.now(UTC)  # before the call, which the server stamps truncated to its second
        core.delete_namespaced_pod("second", name, grace_period_seconds=0)
        wait_for(lambda: pod_phase(cluster, "second", name) is None, timeout=60, message="second booked and released")
        # The claim held its 4 devices from the first pod's start to the second pod's end, once: not 4 x each life.
        expected = 4 * (ended - starts["first"]).total_seconds()
        booked = wait_for(lambda: used_gpu_seconds(cluster, name), timeout=30, message="usage booked")
        assert abs(booked - expected) <= 8, (booked, expected)  # whole-second timestamps at both ends


def start_claim_pod(cluster: LocalCluster, namespace: str, pod: str, **claim: str) -> datetime:
    """Create the pod as the tenant; its container start once it runs."""
    accepted, error = apply_as(cluster, "alice", claim_pod(pod, namespace, **claim))
    assert accepted, error
    wait_for(lambda: pod_phase(cluster, pod, namespace) == "Running", timeout=60, message=f"{pod} Running")
    status = client.CoreV1Api(cluster.api).read_namespaced_pod(pod, namespace).status
    started: datetime = status.container_statuses[0].state.running.started_at
    return started


def used_gpu_seconds(cluster: LocalCluster, allocation_name: str) -> int:
    items = client.CustomObjectsApi(cluster.api).list_cluster_custom_object(GROUP, VERSION, "gpuusages")["items"]
    return sum(
        (r.get("ledger") or {}).get("usedGPUSeconds", 0) for r in items if r["spec"]["allocation"] == allocation_name
    )


def test_a_device_plugin_pools_tenant_may_not_claim_dra_gpus(cluster: LocalCluster, dra_pool: str) -> None:
    name = unique("plugin")
    with allocation(cluster, allocation_manifest(name, H200.name, 8)):
        wait_for_ready(cluster, name)
        quota = client.CoreV1Api(cluster.api).read_namespaced_resource_quota(QUOTA_NAME, name)
        assert wait_for(
            lambda: (
                client.CoreV1Api(cluster.api)
                .read_namespaced_resource_quota(QUOTA_NAME, name)
                .spec.hard.get(device_class_quota_key(GPU_CLASS))
                == "0"
            ),
            timeout=30,
            message="another pool's GPU class held at 0",
        )
        assert quota.spec.hard[GPU_QUOTA_KEY] == "8"
        accepted, error = apply_as(cluster, "alice", claim_manifest("gpus", name))
        assert not accepted
        assert f"pool {H200.name} grants GPUs as nvidia.com/gpu" in error, error


def test_the_pool_spec_names_its_class(cluster: LocalCluster, dra_pool: str) -> None:
    pool = client.CustomObjectsApi(cluster.api).get_cluster_custom_object(GROUP, VERSION, "gpupools", dra_pool)
    assert pool["spec"]["dra"] == {"deviceClassName": GPU_CLASS}


def test_the_scheduler_allocates_a_claim_from_the_fake_nodes_slices(cluster: LocalCluster, dra_pool: str) -> None:
    """The simulation itself, outside any tenant namespace: KWOK runs a pod whose claim the scheduler allocated."""
    namespace = unique("dra-sim")
    core = client.CoreV1Api(cluster.api)
    core.create_namespace({"metadata": {"name": namespace}})
    try:
        template = template_manifest("two-gpus", namespace)
        pod = claim_pod("sim", namespace, resourceClaimTemplateName="two-gpus")
        pod["spec"]["nodeSelector"] = {"gpuaas.io/pool": dra_pool}
        pod["spec"]["tolerations"] = [
            {"key": "gpuaas.io/pool", "operator": "Equal", "value": dra_pool, "effect": "NoSchedule"}
        ]
        cluster.kubectl(
            "create", "-f", "-", stdin=json.dumps({"kind": "List", "apiVersion": "v1", "items": [template, pod]})
        )
        wait_for(
            lambda: core.read_namespaced_pod("sim", namespace).status.phase == "Running",
            timeout=60,
            message="the claim's pod Running on a DRA node",
        )
        claims = json.loads(cluster.kubectl("get", "resourceclaims", "-n", namespace, "-o", "json").stdout)["items"]
        (claim,) = claims
        results = claim["status"]["allocation"]["devices"]["results"]
        assert len(results) == 2
        node = core.read_namespaced_pod("sim", namespace).spec.node_name
        assert {r["pool"] for r in results} == {node}
        assert {r["driver"] for r in results} == {GPU_CLASS}
    finally:
        core.delete_namespace(namespace)
