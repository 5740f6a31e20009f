"""This replica's role: its indexes are warm, and it leads (runs pool passes) or stands by."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import kopf

from gpuaas import metrics
from gpuaas.k8s.leadership import Leadership


@kopf.on.startup()
async def start_leader_election(memo: kopf.Memo, **_: Any) -> None:
    leadership: Leadership = memo.leadership
    memo.leadership_task = asyncio.create_task(leadership.run(), name="leader election")


@kopf.on.cleanup()
async def release_leadership(memo: kopf.Memo, **_: Any) -> None:
    """Normally released already, when the last pool daemon stopped; this covers an operator with no pools."""
    leadership: Leadership = memo.leadership
    await leadership.release()
    task: asyncio.Task[None] | None = getattr(memo, "leadership_task", None)
    if task is not None:
        task.cancel()


@kopf.on.event("", "v1", "namespaces")
async def indexes_warm(**_: Any) -> None:
    """kopf calls non-index handlers only once every index has its initial listing, and every cluster has namespaces:
    the first call means this replica's indexes are live, so it may answer admission requests."""
    if not metrics.readiness.indexes_warm:
        # What the initial listings built lives as long as the process: kept out of the collector's full passes,
        # which otherwise walk every index entry and stall every thread (gpuaas_gc_pause_max_seconds).
        gc.freeze()
    metrics.readiness.indexes_warm = True
