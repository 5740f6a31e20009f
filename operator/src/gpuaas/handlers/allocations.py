"""Admission webhooks for GpuAllocations: they stamp who changed or deleted one (rules in domain/history.py), and
give a new one its release finalizer (domain/planner.py), which saves the first pass a write.

The create and update stamp runs on the event loop (a coroutine that never awaits, see handlers/fence.py); the delete
stamp writes to the API server, so it stays a plain function, which kopf runs in its thread pool."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from gpuaas.api.allocation import ALLOCATION_PLURAL
from gpuaas.api.common import GROUP, VERSION
from gpuaas.domain.actions import AnnotateAllocation
from gpuaas.domain.history import DELETE_REQUESTED_ANNOTATION, delete_stamp, needs_delete_stamp, stamp_annotations
from gpuaas.domain.planner import finalizers_at_create
from gpuaas.k8s.writer import cluster_writer

logger = logging.getLogger("gpuaas.history")


@kopf.on.mutate(GROUP, VERSION, ALLOCATION_PLURAL, id="mutate-allocations", operations=["CREATE", "UPDATE"])
async def stamp_allocation_change(
    *, body: kopf.Body, userinfo: kopf.UserInfo, memo: kopf.Memo, patch: kopf.Patch, **kwargs: Any
) -> None:
    old: kopf.Body | None = kwargs.get("old")  # None on CREATE
    by = str(userinfo.get("username", ""))
    stamps = stamp_annotations(
        dict(old) if old is not None else None, dict(body), by, by == memo.operator_username, datetime.now(UTC)
    )
    if stamps:
        patch.setdefault("metadata", {}).setdefault("annotations", {}).update(stamps)
    if old is None:
        finalizers = finalizers_at_create(body.get("metadata", {}).get("finalizers") or [])
        if finalizers is not None:
            patch.setdefault("metadata", {})["finalizers"] = finalizers


# Its own registration: kopf skips DELETE for handlers that also take other operations.
@kopf.on.validate(
    GROUP, VERSION, ALLOCATION_PLURAL, id="stamp-allocation-deletes", operations=["DELETE"], side_effects=True
)
def stamp_allocation_delete(
    *, name: str | None, annotations: kopf.Annotations, userinfo: kopf.UserInfo, dryrun: bool, **_: Any
) -> None:
    """Record who asked before the API server marks the allocation deleted; never blocks the delete."""
    by = str(userinfo.get("username", ""))
    if dryrun or not name or not needs_delete_stamp(annotations, by):
        return
    stamp = delete_stamp(by, datetime.now(UTC))
    try:
        cluster_writer().perform(AnnotateAllocation(name, DELETE_REQUESTED_ANNOTATION, stamp))
    except ApiException as error:
        logger.warning(f"allocation {name}: could not stamp who deleted it: {error.status} {error.reason}")
