"""Helpers for tests that apply GpuAllocations and act as tenants."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpuaas.api.common import GROUP, VERSION
from tests.integration.conftest import LocalCluster
from tests.waiting import wait_for

NOW = datetime.now(UTC)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def allocation_manifest(
    name: str,
    pool: str,
    gpus: int,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    owners: list[dict[str, str]] | None = None,
    organization: str = "KAIST 비전 연구실",
    **spec: Any,
) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "GpuAllocation",
        "metadata": {"name": name},
        "spec": {
            "tenant": {
                "name": name,
                "organization": organization,
                "contact": "lab@kaist.ac.kr",
                "contract": "T-1",
            },
            "pool": pool,
            "gpus": gpus,
            "window": {
                "start": (start or NOW - timedelta(days=1)).isoformat(),
                "end": (end or NOW + timedelta(days=30)).isoformat(),
            },
            "owners": owners if owners is not None else [{"kind": "User", "name": "alice"}],
            "deletionPolicy": "Delete",
            **spec,
        },
    }


def custom(cluster: LocalCluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cluster.api)


def create_allocation(cluster: LocalCluster, manifest: dict[str, Any]) -> None:
    custom(cluster).create_cluster_custom_object(GROUP, VERSION, "gpuallocations", manifest)


def get_allocation(cluster: LocalCluster, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = custom(cluster).get_cluster_custom_object(GROUP, VERSION, "gpuallocations", name)
    return obj


def status_of(cluster: LocalCluster, name: str) -> dict[str, Any]:
    status: dict[str, Any] = get_allocation(cluster, name).get("status") or {}
    return status


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def wait_for_phase(cluster: LocalCluster, name: str, phase: str, timeout: float = 30) -> dict[str, Any]:
    status: dict[str, Any] = wait_for(
        lambda: (s := status_of(cluster, name)).get("phase") == phase and s,
        timeout=timeout,
        message=f"{name} phase {phase}",
    )
    return status


def wait_for_ready(cluster: LocalCluster, name: str, timeout: float = 30) -> dict[str, Any]:
    status: dict[str, Any] = wait_for(
        lambda: condition(s := status_of(cluster, name), "Ready").get("status") == "True" and s,
        timeout=timeout,
        message=f"{name} Ready",
    )
    return status


def delete_allocation(cluster: LocalCluster, name: str, wait: bool = True, timeout: float = 60) -> None:
    """Delete an allocation (gone already is fine) and, with `wait`, until its release finalizer has let it go."""
    try:
        custom(cluster).delete_cluster_custom_object(GROUP, VERSION, "gpuallocations", name)
    except ApiException as error:
        if error.status != 404:
            raise
    if wait:
        wait_for(lambda: not allocation_exists(cluster, name), timeout=timeout, message=f"allocation {name} deleted")


def set_node_ready(cluster: LocalCluster, node: str, ready: bool) -> None:
    """Drive the Ready condition of a node KWOK does not manage (made without its annotation)."""
    condition = {"type": "Ready", "status": "True" if ready else "False", "reason": "Test", "message": "test"}
    client.CoreV1Api(cluster.api).patch_node_status(node, {"status": {"conditions": [condition]}})


def pool_status(cluster: LocalCluster, pool: str) -> dict[str, Any]:
    obj = custom(cluster).get_cluster_custom_object(GROUP, VERSION, "gpupools", pool)
    status: dict[str, Any] = obj.get("status") or {}
    return status


def allocation_exists(cluster: LocalCluster, name: str) -> bool:
    try:
        get_allocation(cluster, name)
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


@contextmanager
def allocation(cluster: LocalCluster, manifest: dict[str, Any]) -> Iterator[str]:
    """Create an allocation and delete it (and, with deletionPolicy Delete, its namespace) afterwards."""
    name = manifest["metadata"]["name"]
    create_allocation(cluster, manifest)
    try:
        yield name
    finally:
        delete_allocation(cluster, name)


def gpu_pod(name: str, namespace: str, gpus: int, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "containers": [
                {
                    "name": "train",
                    "image": "pytorch:25.01-py3",
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }
            ],
            **spec,
        },
    }


def pod_phase(cluster: LocalCluster, name: str, namespace: str) -> str | None:
    try:
        pod = client.CoreV1Api(cluster.api).read_namespaced_pod(name, namespace)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return pod.status.phase if pod.status else None


def can(cluster: LocalCluster, actor: str, namespace: str, verb: str, resource: str, subresource: str = "") -> bool:
    """`kubectl auth can-i`, as the API server's authorizer answers for that user. (A subresource goes in its own
    flag: can-i reads `pods/status` as the pod named status.)"""
    extra = ("--subresource", subresource) if subresource else ()
    result = cluster.kubectl("auth", "can-i", verb, resource, *extra, "-n", namespace, "--as", actor, check=False)
    return result.stdout.strip() == "yes"
