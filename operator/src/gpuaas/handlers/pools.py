"""GpuPool: its status follows its nodes, re-derived on a short loop from an index of all nodes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import kopf

from gpuaas import metrics
from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.pool import POOL_LABEL, POOL_PLURAL, GpuPoolSpec, GpuPoolStatus
from gpuaas.domain.nodes import NodeInfo, node_info_from_manifest
from gpuaas.domain.pool import measure_capacity, pool_status
from gpuaas.k8s.resources import patch_cluster_status


@kopf.index("", "v1", "nodes")
def nodes_by_name(*, name: str, body: kopf.Body, **_: Any) -> dict[str, NodeInfo]:
    return {name: node_info_from_manifest(body, POOL_LABEL)}


def all_nodes(index: kopf.Index[str, NodeInfo]) -> list[NodeInfo]:
    return [info for store in index.values() for info in store]


# kopf injects indexes as extra keyword arguments, which its handler Protocol cannot express.
@kopf.daemon(GROUP, VERSION, POOL_PLURAL, cancellation_timeout=5.0)  # type: ignore[arg-type]
async def keep_pool_status(
    *,
    name: str,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    stopped: kopf.DaemonStopped,
    memo: kopf.Memo,
    nodes_by_name: kopf.Index[str, NodeInfo],
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Level-triggered: whatever events were missed, the next pass derives status from current nodes."""
    written = GpuPoolStatus.model_validate(dict(status))
    while not stopped:
        pool = GpuPoolSpec.model_validate(dict(spec))
        capacity = measure_capacity(pool, all_nodes(nodes_by_name))
        desired = pool_status(pool, written, capacity, meta.get("generation"), datetime.now(UTC))
        metrics.record_pool(name, pool, desired)
        if desired != written:
            await asyncio.to_thread(patch_cluster_status, POOL_PLURAL, name, desired.to_wire())
            logger.info(
                f"pool {name}: {capacity.healthy_nodes}/{capacity.nodes} nodes healthy, {capacity.capacity_gpus} GPUs"
            )
            written = desired
        await stopped.wait(memo.options.pool_resync_seconds)
