"""What gpuaas needs to know about a node, and whether it counts as healthy GPU capacity."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class NodeInfo:
    """A node reduced to the facts that pool capacity depends on."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ready: bool = False
    unschedulable: bool = False
    allocatable_gpus: int = 0
    # Taints other than the pool's own fence taint, as "key=value:Effect" strings.
    foreign_taints: tuple[str, ...] = ()

    @property
    def healthy(self) -> bool:
        """Counts towards capacity: Ready, schedulable, with GPUs, and not tainted away by someone else."""
        blocking = any(t.endswith((":NoSchedule", ":NoExecute")) for t in self.foreign_taints)
        return self.ready and not self.unschedulable and self.allocatable_gpus > 0 and not blocking


def matches_selector(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    """Equality-based label selection, as Pod.spec.nodeSelector does it."""
    return all(labels.get(key) == value for key, value in selector.items())
