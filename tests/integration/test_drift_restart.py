"""Generated objects are restored when edited or deleted; a killed operator converges without duplicates."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from kubernetes import client

from gpuaas.domain.scenarios import SCENARIOS
from tests.integration.allocations import (
    allocation,
    allocation_manifest,
    create_allocation,
    delete_allocation,
    status_of,
    unique,
    wait_for_ready,
)
from tests.integration.conftest import LocalCluster, OperatorProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
B200, H200 = SCENARIOS["small"].pools


def quota_gpus(core: client.CoreV1Api, namespace: str) -> str | None:
    try:
        return str(core.read_namespaced_resource_quota("gpuaas-quota", namespace).spec.hard["requests.nvidia.com/gpu"])
    except client.ApiException:
        return None


def test_drift_is_reverted(cluster: LocalCluster, operator: OperatorProcess) -> None:
    name = unique("drift")
    core = client.CoreV1Api(cluster.api)
    rbac = client.RbacAuthorizationV1Api(cluster.api)
    with allocation(cluster, allocation_manifest(name, H200.name, 8)):
        wait_for_ready(cluster, name)
        # A cluster admin passes the guard webhook; gpuaas still puts its objects back.
        edits: list[tuple[str, Callable[[], object], Callable[[], bool]]] = [
            (
                "quota edited",
                lambda: core.patch_namespaced_resource_quota(
                    "gpuaas-quota", name, {"spec": {"hard": {"requests.nvidia.com/gpu": "999"}}}
                ),
                lambda: quota_gpus(core, name) == "8",
            ),
            (
                "quota deleted",
                lambda: core.delete_namespaced_resource_quota("gpuaas-quota", name),
                lambda: quota_gpus(core, name) == "8",
            ),
            (
                "limit range deleted",
                lambda: core.delete_namespaced_limit_range("gpuaas-limits", name),
                lambda: bool(core.list_namespaced_limit_range(name).items),
            ),
            (
                "owners binding deleted",
                lambda: rbac.delete_namespaced_role_binding("gpuaas-owners", name),
                lambda: any(b.metadata.name == "gpuaas-owners" for b in rbac.list_namespaced_role_binding(name).items),
            ),
            (
                "namespace labels removed",
                lambda: core.patch_namespace(
                    name, {"metadata": {"labels": {"gpuaas.io/managed": None, "gpuaas.io/pool": "elsewhere"}}}
                ),
                lambda: (
                    (core.read_namespace(name).metadata.labels or {}).get("gpuaas.io/managed") == "true"
                    and core.read_namespace(name).metadata.labels.get("gpuaas.io/pool") == H200.name
                ),
            ),
        ]
        for what, edit, restored in edits:
            edit()
            wait_for(restored, timeout=10, message=f"{what}: restored")


def wait_for_decision(cluster: LocalCluster, name: str) -> dict[str, object]:
    status: dict[str, object] = wait_for(
        lambda: (s := status_of(cluster, name)).get("phase") in ("Active", "Queued") and s, message=f"{name} decided"
    )
    return status


def test_killed_operator_converges_without_duplicates(cluster: LocalCluster, operator: OperatorProcess) -> None:
    names = [unique("restart") for _ in range(6)]
    for name in names:
        create_allocation(cluster, allocation_manifest(name, B200.name, 8))
    operator.kill()  # mid-reconcile: some objects applied, some statuses written, some not
    try:
        operator.start()
        statuses = {name: wait_for_decision(cluster, name) for name in names}
        active = [n for n, s in statuses.items() if s["phase"] == "Active"]
        queued = [n for n, s in statuses.items() if s["phase"] == "Queued"]
        assert len(active) == B200.gpus // 8
        assert len(queued) == len(names) - len(active)
        rbac = client.RbacAuthorizationV1Api(cluster.api)
        core = client.CoreV1Api(cluster.api)
        for name in names:
            wait_for(lambda n=name: bool(core.list_namespaced_resource_quota(n).items), message=f"{name} quota")
            assert len(core.list_namespaced_resource_quota(name).items) == 1
            assert len(core.list_namespaced_limit_range(name).items) == 1
            assert len(rbac.list_namespaced_role_binding(name).items) == 1
            finalizers = client.CustomObjectsApi(cluster.api).get_cluster_custom_object(
                "gpuaas.io", "v1alpha1", "gpuallocations", name
            )["metadata"]["finalizers"]
            assert finalizers == ["gpuaas.io/release"]
        granted = sum(s["grantedGPUs"] for s in statuses.values() if s["phase"] == "Active")
        assert granted == B200.gpus
    finally:
        for name in names:
            delete_allocation(cluster, name)
