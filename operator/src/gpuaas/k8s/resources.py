"""Reads and writes of gpuaas's own kinds."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, cast

from kubernetes import client

from gpuaas.api.common import GROUP, VERSION
from gpuaas.k8s.client import FIELD_MANAGER, discard


def patch_cluster_status(plural: str, name: str, status: Mapping[str, Any]) -> None:
    """Merge-patch the status subresource of a cluster-scoped gpuaas object."""
    response = client.CustomObjectsApi().patch_cluster_custom_object_status(
        GROUP, VERSION, plural, name, {"status": dict(status)}, field_manager=FIELD_MANAGER, _preload_content=False
    )
    discard(response)


def list_pools(api: client.ApiClient) -> list[dict[str, Any]]:
    listing = cast(dict[str, Any], client.CustomObjectsApi(api).list_cluster_custom_object(GROUP, VERSION, "gpupools"))
    items: list[dict[str, Any]] = listing["items"]
    return items


def wait_for_pool_status(api: client.ApiClient, timeout: float) -> list[dict[str, Any]]:
    """Wait until every pool's status reflects its current generation."""
    deadline = time.monotonic() + timeout
    while True:
        items = list_pools(api)
        current = [p for p in items if (p.get("status") or {}).get("observedGeneration") == p["metadata"]["generation"]]
        if items and len(current) == len(items):
            return items
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(items) - len(current)} of {len(items)} pools have no current status")
        time.sleep(0.5)
