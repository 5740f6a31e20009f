"""API calls of the GpuUsage ledger: the report's reads, the pass's record writes and the usage finalizer's release."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from pydantic import ValidationError

from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.usage import (
    POOL_USAGE_PLURAL,
    USAGE_PLURAL,
    GpuPoolUsage,
    GpuUsage,
    PoolLedger,
    UsageLedger,
    ledger_patch,
)
from gpuaas.domain.fence import USAGE_FINALIZER
from gpuaas.k8s.client import discard, new_api_client

PAGE_SIZE = 500
JSON_PATCH = "application/json-patch+json"


# Seconds to connect to, and to read each page from, a cluster's API server before its ledger counts as unreadable.
READ_TIMEOUT = (10, 60)


def list_usage(api: client.ApiClient, plural: str = USAGE_PLURAL) -> list[dict[str, Any]]:
    """Every GpuUsage object (all months, including those of deleted allocations), or of another ledger kind, paged."""
    objects = client.CustomObjectsApi(api)
    items: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"limit": PAGE_SIZE, "_request_timeout": READ_TIMEOUT}
        if token:
            kwargs["_continue"] = token
        listing = cast(dict[str, Any], objects.list_cluster_custom_object(GROUP, VERSION, plural, **kwargs))
        items.extend(listing.get("items") or [])
        token = (listing.get("metadata") or {}).get("continue")
        if not token:
            return items


@dataclass(frozen=True)
class LedgerSource:
    """One cluster's ledger: where to read it, and the name a merged report gives its rows."""

    name: str
    kubeconfig: str | None = None
    context: str | None = None

    def describe(self) -> str:
        where = [
            f"context {self.context}" if self.context else "",
            f"kubeconfig {self.kubeconfig}" if self.kubeconfig else "",
        ]
        named = f"cluster {self.name!r}" if self.name else "the cluster"
        return f"{named} ({', '.join(part for part in where if part) or 'in-cluster or $KUBECONFIG'})"


class LedgerUnreadableError(Exception):
    """A cluster's ledger could not be read; a report without it would be silently short."""


def _pool_records(api: client.ApiClient) -> list[GpuPoolUsage]:
    """The pools' month records; none where the cluster's gpuaas predates them (no such resource)."""
    try:
        return [GpuPoolUsage.from_object(obj) for obj in list_usage(api, POOL_USAGE_PLURAL)]
    except ApiException as error:
        if error.status == 404:
            return []
        raise


def read_ledger(source: LedgerSource) -> list[GpuUsage | GpuPoolUsage]:
    """A cluster's allocation records and its pools' month records."""
    try:
        with new_api_client(source.kubeconfig, context=source.context) as api:
            records: list[GpuUsage | GpuPoolUsage] = [GpuUsage.from_object(obj) for obj in list_usage(api)]
            return records + _pool_records(api)
    except ApiException as error:
        raise LedgerUnreadableError(
            f"{source.describe()}: the API server answered {error.status} {error.reason}"
        ) from error
    except (urllib3.exceptions.HTTPError, ConfigException, OSError, ValidationError) as error:
        raise LedgerUnreadableError(f"{source.describe()}: {error}") from error


def read_ledgers(sources: Sequence[LedgerSource]) -> dict[str, list[GpuUsage | GpuPoolUsage]]:
    """Every source's records by name, read in parallel. Any unreadable source fails the whole read, naming each
    one that failed."""
    with ThreadPoolExecutor(max_workers=max(1, len(sources))) as pool:
        futures = [pool.submit(read_ledger, source) for source in sources]
    failures = [str(error) for future in futures if (error := future.exception()) is not None]
    if failures:
        raise LedgerUnreadableError("; ".join(failures))
    return {source.name: future.result() for source, future in zip(sources, futures, strict=True)}


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


def read_pool_usage(name: str) -> GpuPoolUsage | None:
    """A pool's month record as stored, or None if there is none."""
    try:
        obj = client.CustomObjectsApi().get_cluster_custom_object(GROUP, VERSION, POOL_USAGE_PLURAL, name)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return GpuPoolUsage.from_object(cast(dict[str, Any], obj))


def create_pool_usage(record: GpuPoolUsage) -> None:
    response = client.CustomObjectsApi().create_cluster_custom_object(
        GROUP, VERSION, POOL_USAGE_PLURAL, record.to_object(), _preload_content=False
    )
    discard(response)


def write_pool_ledger(name: str, ledger: PoolLedger) -> None:
    response = client.CustomObjectsApi().patch_cluster_custom_object(
        GROUP, VERSION, POOL_USAGE_PLURAL, name, {"ledger": ledger.to_wire()}, _preload_content=False
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
