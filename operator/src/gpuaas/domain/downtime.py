"""Downtime credit: which granted GPUs could not be used because the hardware under them was down.

At each pass the pool's program GPUs split, like Slurm's `sreport cluster utilization`, into

    program = usable granted + unallocated + down

- program: the GPUs the program holds in the pool (spec.programGPUs, else every member node's gpusPerNode, healthy
  or not);
- down: program GPUs not on healthy nodes (program - healthy, where healthy is what admission may grant);
- usable granted: GPUs of grants in force that their tenants could use;
- unallocated: healthy program GPUs under no usable grant.

The granted GPUs that could not be used are each grant's downtime credit:
- an exclusive grant is short of the healthy nodes it needs and no spare replaces them (its unhealthy nodes stay
  held, `domain/exclusive.py`);
- shared grants are short when the healthy GPUs outside exclusive nodes are fewer than they hold together; the
  shortfall is shared pro rata to their grants (largest remainder, ties by name), since any of their pods could
  have been the one left without a GPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from gpuaas.api.pool import GpuPoolSpec
from gpuaas.api.usage import PoolLedger
from gpuaas.domain.exclusive import choose_exclusive_nodes
from gpuaas.domain.ledger import TimeZoneLike, from_epoch, month_bounds, split_by_month, to_epoch
from gpuaas.domain.nodes import NodeInfo


@dataclass(frozen=True)
class GrantInForce:
    """A grant whose window contains now, as admission decided it in this pass."""

    name: str
    gpus: int
    exclusive: bool = False


@dataclass(frozen=True)
class PoolBreakdown:
    """One instant of the pool: what its program GPUs were, in GPUs (not seconds)."""

    program_gpus: int
    healthy_gpus: int
    granted_gpus: int
    down_by_allocation: Mapping[str, int] = field(default_factory=dict)

    @property
    def credited_gpus(self) -> int:
        """Granted GPUs that could not be used (the sum of the grants' downtime credit)."""
        return sum(self.down_by_allocation.values())

    @property
    def usable_granted_gpus(self) -> int:
        # Never more than the healthy program GPUs: when the program is a part of a bigger pool, exclusive nodes may
        # hold healthy GPUs outside it; the identity counts the program's only.
        return min(self.granted_gpus - self.credited_gpus, self.healthy_gpus)

    @property
    def unallocated_gpus(self) -> int:
        return self.healthy_gpus - self.usable_granted_gpus

    @property
    def down_gpus(self) -> int:
        return self.program_gpus - self.healthy_gpus


def nominal_program_gpus(spec: GpuPoolSpec, members: Sequence[NodeInfo]) -> int:
    """The program's GPUs in the pool whether healthy or not: the pool's programGPUs, else every member node full."""
    if spec.program_gpus is not None:
        return spec.program_gpus
    return len(members) * spec.gpus_per_node


def _node_gpus(node: NodeInfo, gpus_per_node: int) -> int:
    """What a healthy node adds to capacity (domain/pool.py counts it the same way)."""
    return min(node.allocatable_gpus, gpus_per_node) if node.healthy else 0


def share_shortfall(shortfall: int, grants: Sequence[GrantInForce]) -> dict[str, int]:
    """Split `shortfall` GPUs over the grants in proportion to their GPUs, in whole GPUs (largest remainder)."""
    total = sum(g.gpus for g in grants)
    shortfall = min(shortfall, total)
    if shortfall <= 0:
        return {}
    shares = {g.name: shortfall * g.gpus // total for g in grants}
    left = shortfall - sum(shares.values())
    by_remainder = sorted(grants, key=lambda g: (-(shortfall * g.gpus % total), g.name))
    for grant in by_remainder[:left]:
        shares[grant.name] += 1
    return {name: down for name, down in shares.items() if down > 0}


def pool_breakdown(
    spec: GpuPoolSpec,
    members: Sequence[NodeInfo],
    healthy_program_gpus: int,
    grants: Iterable[GrantInForce],
    exclusive_holders: Mapping[str, str],
) -> PoolBreakdown:
    """Split the pool's program GPUs for this instant. `healthy_program_gpus` is what admission grants from
    (PoolCapacity.program_gpus); `exclusive_holders` maps nodes to the allocation holding them."""
    program = max(nominal_program_gpus(spec, members), healthy_program_gpus)
    in_force = [g for g in grants if g.gpus > 0]
    by_name = {node.name: node for node in members}
    down: dict[str, int] = {}
    exclusive_healthy = 0
    for grant in (g for g in in_force if g.exclusive):
        held = [name for name, holder in exclusive_holders.items() if holder == grant.name]
        others = [name for name, holder in exclusive_holders.items() if holder != grant.name]
        choice = choose_exclusive_nodes(members, grant.gpus, spec.gpus_per_node, held, others)
        healthy = sum(_node_gpus(by_name[name], spec.gpus_per_node) for name in choice.nodes if name in by_name)
        exclusive_healthy += healthy
        if healthy < grant.gpus:
            down[grant.name] = grant.gpus - healthy
    shared = sorted((g for g in in_force if not g.exclusive), key=lambda g: g.name)
    shared_capacity = max(healthy_program_gpus - exclusive_healthy, 0)
    down.update(share_shortfall(sum(g.gpus for g in shared) - shared_capacity, shared))
    return PoolBreakdown(
        program_gpus=program,
        healthy_gpus=healthy_program_gpus,
        granted_gpus=sum(g.gpus for g in in_force),
        down_by_allocation=down,
    )


def book_pool(
    records: Mapping[str, PoolLedger], since: datetime, now: datetime, held: PoolBreakdown, tz: TimeZoneLike
) -> dict[str, PoolLedger]:
    """Book the pool's breakdown that held over [since, now) into its month records. Returns the records that
    changed, by month; a month missing from `records` starts empty. Booking again to the same `now` adds nothing,
    because each record's bookedUntil is its watermark."""
    changed: dict[str, PoolLedger] = {}
    for month, _ in split_by_month(since, now, tz):
        record = records.get(month) or PoolLedger()
        month_start, month_end = month_bounds(month, tz)
        start = max(since, month_start, record.booked_until or month_start)
        end = min(now, month_end)
        seconds = to_epoch(end) - to_epoch(start)
        if seconds <= 0:
            continue
        changed[month] = PoolLedger(
            program_gpu_seconds=record.program_gpu_seconds + held.program_gpus * seconds,
            granted_gpu_seconds=record.granted_gpu_seconds + held.granted_gpus * seconds,
            credited_gpu_seconds=record.credited_gpu_seconds + held.credited_gpus * seconds,
            usable_granted_gpu_seconds=record.usable_granted_gpu_seconds + held.usable_granted_gpus * seconds,
            unallocated_gpu_seconds=record.unallocated_gpu_seconds + held.unallocated_gpus * seconds,
            down_gpu_seconds=record.down_gpu_seconds + held.down_gpus * seconds,
            booked_until=from_epoch(to_epoch(end)),
        )
    return changed
