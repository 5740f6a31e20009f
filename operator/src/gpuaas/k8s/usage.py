"""API calls of the GpuUsage ledger: the pass's record writes and the usage finalizer's release (the report's reads
are in ledger_reader.py)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.usage import (
    POOL_USAGE_PLURAL,
    USAGE_PLURAL,
    GpuPoolUsage,
    GpuUsage,
    PoolLedger,
    UsageLedger,
    ledger_patch,
    pool_ledger_patch,
)
from gpuaas.domain.fence import USAGE_FINALIZER
from gpuaas.k8s.client import discard

JSON_PATCH = "application/json-patch+json"


class UsageRecordExistsError(Exception):
    """The record to create exists already: the index has not shown it yet (another replica, or a lost response)."""


def create_usage(record: GpuUsage, api: client.ApiClient | None = None) -> None:
    """Create a month's record. If it exists, nothing is written: the booking was planned without the record's
    ledger, so writing it would drop what that ledger holds. The next pass books from the record itself."""
    try:
        response = client.CustomObjectsApi(api).create_cluster_custom_object(
            GROUP, VERSION, USAGE_PLURAL, record.to_object(), _preload_content=False
        )
        discard(response)
    except ApiException as error:
        if error.status != 409:
            raise
        raise UsageRecordExistsError(
            f"GpuUsage {record.name} exists but was not in the index yet; it is booked from on the next pass"
        ) from error


def write_usage_ledger(
    name: str,
    ledger: UsageLedger,
    dropped_pods: Iterable[str] = (),
    labels: Mapping[str, str] | None = None,
    api: client.ApiClient | None = None,
) -> None:
    response = client.CustomObjectsApi(api).patch_cluster_custom_object(
        GROUP, VERSION, USAGE_PLURAL, name, ledger_patch(ledger, dropped_pods, labels), _preload_content=False
    )
    discard(response)


def read_pool_usage(name: str) -> GpuPoolUsage | None:
    """A pool's month record as stored, or None if there is none."""
    try:
        obj = client.CustomObjectsApi().get_cluster_custom_object(GROUP, VERSION, POOL_USAGE_PLURAL, name)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return GpuPoolUsage.from_object(cast(dict[str, Any], obj))


def create_pool_usage(record: GpuPoolUsage, api: client.ApiClient | None = None) -> None:
    response = client.CustomObjectsApi(api).create_cluster_custom_object(
        GROUP, VERSION, POOL_USAGE_PLURAL, record.to_object(), _preload_content=False
    )
    discard(response)


def write_pool_ledger(
    name: str, ledger: PoolLedger, labels: Mapping[str, str] | None = None, api: client.ApiClient | None = None
) -> None:
    response = client.CustomObjectsApi(api).patch_cluster_custom_object(
        GROUP, VERSION, POOL_USAGE_PLURAL, name, pool_ledger_patch(ledger, labels), _preload_content=False
    )
    discard(response)


def release_pod(namespace: str, name: str, uid: str, finalizer_index: int, api: client.ApiClient | None = None) -> None:
    """Remove the usage finalizer at the index the pass saw, with no read first. The test ops make a stale view
    (the finalizers moved, or a new pod took the name) fail instead of removing another entry or another pod's."""
    path = f"/metadata/finalizers/{finalizer_index}"
    patch = [
        {"op": "test", "path": "/metadata/uid", "value": uid},
        {"op": "test", "path": path, "value": USAGE_FINALIZER},
        {"op": "remove", "path": path},
    ]
    try:
        response = client.CoreV1Api(api).patch_namespaced_pod(
            name, namespace, patch, _content_type=JSON_PATCH, _preload_content=False
        )
    except ApiException as error:
        # Gone, or no longer as the pass saw it: the next pass releases from the newer view, if it is still held.
        if error.status not in (404, 409, 422):
            raise
        return
    discard(response)


def live_pod_uids(namespace: str) -> set[str]:
    """A fresh read (not the index), so pruning never forgets a pod that still exists."""
    pods = client.CoreV1Api().list_namespaced_pod(namespace).items
    return {pod.metadata.uid for pod in pods if pod.metadata and pod.metadata.uid}
