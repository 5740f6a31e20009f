"""Pool capacity and status, derived from the pool's nodes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from gpuaas.api.common import Condition, set_condition
from gpuaas.api.pool import GpuPoolSpec, GpuPoolStatus, PoolConditionReason, PoolConditionType
from gpuaas.domain.downtime import PoolBreakdown
from gpuaas.domain.nodes import NodeInfo, matches_selector


@dataclass(frozen=True)
class PoolCapacity:
    nodes: int
    ready_nodes: int
    healthy_nodes: int
    capacity_gpus: int
    program_gpus: int


def pool_nodes(spec: GpuPoolSpec, nodes: Iterable[NodeInfo]) -> list[NodeInfo]:
    return [node for node in nodes if matches_selector(node.labels, spec.node_selector)]


def measure_capacity(spec: GpuPoolSpec, nodes: Iterable[NodeInfo]) -> PoolCapacity:
    """Capacity counts only healthy nodes; a node never contributes more than gpusPerNode."""
    return members_capacity(spec, pool_nodes(spec, nodes))


def members_capacity(spec: GpuPoolSpec, members: list[NodeInfo]) -> PoolCapacity:
    """`measure_capacity` of nodes already selected for the pool (`pool_nodes`)."""
    healthy = [node for node in members if node.healthy]
    capacity = sum(min(node.allocatable_gpus, spec.gpus_per_node) for node in healthy)
    program = capacity if spec.program_gpus is None else min(spec.program_gpus, capacity)
    return PoolCapacity(
        nodes=len(members),
        ready_nodes=sum(1 for node in members if node.ready),
        healthy_nodes=len(healthy),
        capacity_gpus=capacity,
        program_gpus=program,
    )


def pool_status(
    spec: GpuPoolSpec,
    previous: GpuPoolStatus,
    capacity: PoolCapacity,
    generation: int | None,
    now: datetime,
    granted_gpus: int = 0,
    in_use_gpus: int = 0,
    queued: int = 0,
    held_beyond_grants: int = 0,
    breakdown: PoolBreakdown | None = None,
) -> GpuPoolStatus:
    """The pool's status for the given capacity and grants, keeping condition transition times."""
    conditions = list(previous.conditions)
    if capacity.nodes == 0:
        ready = Condition(
            type=PoolConditionType.READY,
            status="False",
            reason=PoolConditionReason.NO_NODES,
            message=f"no node matches nodeSelector {dict(spec.node_selector)}",
            last_transition_time=now,
            observed_generation=generation,
        )
    elif capacity.healthy_nodes == 0:
        ready = Condition(
            type=PoolConditionType.READY,
            status="False",
            reason=PoolConditionReason.NO_HEALTHY_NODES,
            message=f"none of {capacity.nodes} nodes is Ready and schedulable with GPUs",
            last_transition_time=now,
            observed_generation=generation,
        )
    else:
        ready = Condition(
            type=PoolConditionType.READY,
            status="True",
            reason=PoolConditionReason.NODES_HEALTHY,
            message=f"{capacity.healthy_nodes}/{capacity.nodes} nodes healthy, {capacity.capacity_gpus} GPUs",
            last_transition_time=now,
            observed_generation=generation,
        )
    conditions = set_condition(conditions, ready)
    degraded = capacity.healthy_nodes < capacity.nodes
    conditions = set_condition(
        conditions,
        Condition(
            type=PoolConditionType.DEGRADED,
            status="True" if degraded else "False",
            reason=PoolConditionReason.UNHEALTHY_NODES if degraded else PoolConditionReason.ALL_NODES_HEALTHY,
            message=(
                f"{capacity.nodes - capacity.healthy_nodes} nodes are NotReady, cordoned or without GPUs"
                if degraded
                else "every node is healthy"
            ),
            last_transition_time=now,
            observed_generation=generation,
        ),
    )
    return GpuPoolStatus(
        nodes=capacity.nodes,
        ready_nodes=capacity.ready_nodes,
        capacity_gpus=capacity.capacity_gpus,
        program_gpus=capacity.program_gpus,
        granted_gpus=granted_gpus,
        # GPUs that stopping pods still hold beyond their grants are not available yet.
        available_gpus=max(capacity.program_gpus - granted_gpus - held_beyond_grants, 0),
        in_use_gpus=in_use_gpus,
        down_gpus=breakdown.down_gpus if breakdown is not None else 0,
        credited_gpus=breakdown.credited_gpus if breakdown is not None else 0,
        queued=queued,
        conditions=conditions,
        observed_generation=generation,
    )
