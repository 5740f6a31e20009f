"""API calls of the GpuUsage ledger: the report's reads, the pass's record writes and the usage finalizer's release."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.usage import USAGE_PLURAL, GpuUsage, UsageLedger, ledger_patch
from gpuaas.domain.fence import USAGE_FINALIZER
from gpuaas.k8s.client import discard

PAGE_SIZE = 500
JSON_PATCH = "application/json-patch+json"


def list_usage(api: client.ApiClient) -> list[dict[str, Any]]:
    """Every GpuUsage object (all months, including those of deleted allocations), paged."""
    objects = client.CustomObjectsApi(api)
    items: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"limit": PAGE_SIZE}
        if token:
            kwargs["_continue"] = token
        listing = cast(dict[str, Any], objects.list_cluster_custom_object(GROUP, VERSION, USAGE_PLURAL, **kwargs))
        items.extend(listing.get("items") or [])
        token = (listing.get("metadata") or {}).get("continue")
        if not token:
            return items


class UsageRecordExistsError(Exception):
    """The record to create exists already: the index has not shown it yet (another replica, or a lost response)."""


def create_usage(record: GpuUsage) -> None:
    """Create a month's record. If it exists, nothing is written: the booking was planned without the record's
    ledger, so writing it would drop what that ledger holds. The next pass books from the record itself."""
    try:
        response = client.CustomObjectsApi().create_cluster_custom_object(
            GROUP, VERSION, USAGE_PLURAL, record.to_object(), _preload_content=False
        )
        discard(response)
    except ApiException as error:
        if error.status != 409:
            raise
        raise UsageRecordExistsError(
            f"GpuUsage {record.name} exists but was not in the index yet; it is booked from on the next pass"
        ) from error


def write_usage_ledger(name: str, ledger: UsageLedger, dropped_pods: Iterable[str] = ()) -> None:
    response = client.CustomObjectsApi().patch_cluster_custom_object(
        GROUP, VERSION, USAGE_PLURAL, name, ledger_patch(ledger, dropped_pods), _preload_content=False
    )
    discard(response)


def release_pod(namespace: str, name: str) -> None:
    """Remove the usage finalizer; a test op makes a stale view fail instead of removing the wrong entry."""
    try:
        current = client.CoreV1Api().read_namespaced_pod(name, namespace)
    except ApiException as error:
        if error.status == 404:
            return
        raise
    finalizers = list((current.metadata.finalizers if current.metadata else None) or [])
    if USAGE_FINALIZER not in finalizers:
        return
    index = finalizers.index(USAGE_FINALIZER)
    path = f"/metadata/finalizers/{index}"
    try:
        client.CoreV1Api().patch_namespaced_pod(
            name,
            namespace,
            [{"op": "test", "path": path, "value": USAGE_FINALIZER}, {"op": "remove", "path": path}],
            _content_type=JSON_PATCH,
        )
    except ApiException as error:
        if error.status not in (404, 409, 422):
            raise


def live_pod_uids(namespace: str) -> set[str]:
    """A fresh read (not the index), so pruning never forgets a pod that still exists."""
    pods = client.CoreV1Api().list_namespaced_pod(namespace).items
    return {pod.metadata.uid for pod in pods if pod.metadata and pod.metadata.uid}
