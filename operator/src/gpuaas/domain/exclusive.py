"""Whole-node reservation for exclusiveNodes allocations.

Choices are deterministic (node names sorted) so that repeated reconciles, and a restarted
operator, pick the same nodes. Held nodes are kept as long as they are healthy: moving a tenant's
reservation would strand its running pods.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gpuaas.domain.nodes import NodeInfo


@dataclass(frozen=True)
class NodeChoice:
    nodes: tuple[str, ...]
    """The nodes the allocation should hold (label) after this decision, sorted."""
    added: tuple[str, ...]
    """Nodes newly taken."""
    released: tuple[str, ...]
    """Held nodes to unlabel: replaced because unhealthy, gone from the pool, or beyond the need."""
    shortfall: int
    """Healthy nodes still missing to reach gpus / gpusPerNode."""

    @property
    def message(self) -> str:
        if self.shortfall == 0:
            return f"{len(self.nodes)} nodes reserved"
        return f"{len(self.nodes)} nodes reserved, {self.shortfall} healthy nodes missing and none free"


def nodes_needed(gpus: int, gpus_per_node: int) -> int:
    return -(-gpus // gpus_per_node)


def choose_exclusive_nodes(
    pool_nodes: Iterable[NodeInfo],
    gpus: int,
    gpus_per_node: int,
    held: Iterable[str],
    held_by_others: Iterable[str],
    busy_gpus: Mapping[str, int] | None = None,
) -> NodeChoice:
    """Pick the nodes an exclusive allocation of `gpus` should hold.

    pool_nodes: the pool's nodes; held: nodes this allocation holds now; held_by_others: nodes
    reserved by other allocations; busy_gpus: GPUs in use per node by other tenants' pods, so that
    idle spares are preferred (ties and the rest broken by name).
    """
    need = nodes_needed(gpus, gpus_per_node)
    by_name = {node.name: node for node in pool_nodes}
    taken = set(held_by_others)
    current = sorted(set(held))
    busy = busy_gpus or {}

    healthy_held = [name for name in current if name in by_name and by_name[name].healthy]
    unhealthy_held = [name for name in current if name in by_name and not by_name[name].healthy]
    gone = [name for name in current if name not in by_name]

    keep = healthy_held[:need]
    excess = healthy_held[need:]
    missing = need - len(keep)
    spares = sorted(
        (
            node.name
            for node in by_name.values()
            if node.healthy and node.name not in taken and node.name not in current
        ),
        key=lambda name: (busy.get(name, 0) > 0, name),
    )
    added = spares[:missing]
    shortfall = missing - len(added)
    # Unhealthy nodes no spare could replace stay held: they usually come back, and keeping them
    # labelled stops them going to someone else when they do.
    kept_unhealthy = unhealthy_held[:shortfall]
    released = sorted(set(excess) | set(gone) | set(unhealthy_held[shortfall:]))
    nodes = tuple(sorted(keep + added + kept_unhealthy))
    return NodeChoice(nodes=nodes, added=tuple(sorted(added)), released=tuple(released), shortfall=shortfall)
