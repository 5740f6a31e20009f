"""Reads of the GpuUsage ledger for the monthly report."""

from __future__ import annotations

from typing import Any, cast

from kubernetes import client

from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.usage import USAGE_PLURAL

PAGE_SIZE = 500


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
