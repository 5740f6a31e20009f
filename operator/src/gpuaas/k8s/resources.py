"""Reads and writes of gpuaas's own kinds."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, cast

from kubernetes import client

from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.pool import PoolConditionType
from gpuaas.k8s.client import FIELD_MANAGER, discard


def patch_cluster_status(
    plural: str, name: str, status: Mapping[str, Any], api: client.ApiClient | None = None
) -> None:
    """Merge-patch the status subresource of a cluster-scoped gpuaas object."""
    response = client.CustomObjectsApi(api).patch_cluster_custom_object_status(
        GROUP, VERSION, plural, name, {"status": dict(status)}, field_manager=FIELD_MANAGER, _preload_content=False
    )
    discard(response)


def list_pools(api: client.ApiClient) -> list[dict[str, Any]]:
    listing = cast(dict[str, Any], client.CustomObjectsApi(api).list_cluster_custom_object(GROUP, VERSION, "gpupools"))
    items: list[dict[str, Any]] = listing["items"]
    return items


def pool_settled(pool: Mapping[str, Any]) -> bool:
    """The pool's status is of its current spec, and every node it selects is healthy (condition Degraded False):
    a new cluster's nodes become healthy (Ready, schedulable, GPUs reported, no foreign taint) some time after they
    register, and totals read before then are short."""
    status = pool.get("status") or {}
    current = status.get("observedGeneration") == (pool.get("metadata") or {}).get("generation")
    degraded = next(
        (c.get("status") for c in status.get("conditions") or [] if c.get("type") == PoolConditionType.DEGRADED), None
    )
    return current and status.get("nodes", 0) > 0 and degraded == "False"


def wait_for_pool_status(api: client.ApiClient, timeout: float) -> list[dict[str, Any]]:
    """Wait until every pool is settled; raise TimeoutError naming the pools that are not."""
    deadline = time.monotonic() + timeout
    while True:
        items = list_pools(api)
        unsettled = [p["metadata"]["name"] for p in items if not pool_settled(p)]
        if items and not unsettled:
            return items
        if time.monotonic() > deadline:
            missing = ", ".join(unsettled) or "no pools exist"
            raise TimeoutError(
                f"pools without a current status or with nodes not Ready after {timeout:.0f}s: {missing}"
            )
        time.sleep(0.5)
