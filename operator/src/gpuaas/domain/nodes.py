"""What gpuaas needs to know about a node, and whether it counts as healthy GPU capacity."""

from __future__ import annotations

from collections.abc import Collection, Mapping
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
    # Every taint as (key, value, effect), to rewrite the list when gpuaas adds or removes its own.
    taints: tuple[tuple[str, str, str], ...] = ()
    # The version `taints` was read at: a rewritten list is sent with it, so that it cannot undo a taint set since.
    # Compared like the rest: kopf keeps an index's old value when the new one is equal, and an old version would
    # have every later patch refused.
    resource_version: str = ""
    # Counts towards capacity: Ready, schedulable, with GPUs, and not tainted away by someone else. Derived once, as
    # every pass asks it of every node of the pool.
    healthy: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        blocking = any(t.endswith((":NoSchedule", ":NoExecute")) for t in self.foreign_taints)
        healthy = self.ready and not self.unschedulable and self.allocatable_gpus > 0 and not blocking
        object.__setattr__(self, "healthy", healthy)


def matches_selector(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    """Equality-based label selection, as Pod.spec.nodeSelector does it (an item-set comparison, run in C: every
    pass selects its pool's nodes from all of the cluster's)."""
    return selector.items() <= labels.items()


def _quantity_to_int(quantity: object) -> int:
    """Whole-device quantities such as "8"; anything else counts as no GPUs."""
    try:
        return int(str(quantity))
    except ValueError:
        return 0


def _section(obj: Mapping[str, object], key: str) -> Mapping[str, object]:
    value = obj.get(key)
    return value if isinstance(value, Mapping) else {}


def _items(obj: Mapping[str, object], key: str) -> list[object]:
    value = obj.get(key)
    return list(value) if isinstance(value, list) else []


def node_info_from_manifest(node: Mapping[str, object], own_taint_keys: Collection[str]) -> NodeInfo:
    """Reduce a Node object (Kubernetes JSON) to NodeInfo."""
    metadata = _section(node, "metadata")
    spec = _section(node, "spec")
    status = _section(node, "status")
    conditions = _items(status, "conditions")
    ready = any(isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    allocatable = status.get("allocatable") or {}
    gpus = _quantity_to_int(allocatable.get("nvidia.com/gpu", 0)) if isinstance(allocatable, Mapping) else 0
    taints = [
        f"{t.get('key')}={t.get('value', '')}:{t.get('effect')}"
        for t in _items(spec, "taints")
        if isinstance(t, Mapping) and t.get("key") not in own_taint_keys
    ]
    labels = metadata.get("labels") or {}
    all_taints = tuple(
        (str(t.get("key", "")), str(t.get("value", "")), str(t.get("effect", "")))
        for t in _items(spec, "taints")
        if isinstance(t, Mapping)
    )
    return NodeInfo(
        name=str(metadata.get("name", "")),
        labels=dict(labels) if isinstance(labels, Mapping) else {},
        ready=ready,
        unschedulable=bool(spec.get("unschedulable", False)),
        allocatable_gpus=gpus,
        foreign_taints=tuple(taints),
        taints=all_taints,
        resource_version=str(metadata.get("resourceVersion", "")),
    )


def taints_with(node: NodeInfo, key: str, value: str, effect: str = "NoSchedule") -> list[dict[str, str]] | None:
    """The node's taint list with key=value:effect set; None when it already is."""
    if (key, value, effect) in node.taints:
        return None
    kept = [t for t in node.taints if t[0] != key]
    return [{"key": k, "value": v, "effect": e} for k, v, e in [*kept, (key, value, effect)]]


def taints_without(node: NodeInfo, key: str) -> list[dict[str, str]] | None:
    """The node's taint list without `key`; None when it has no such taint."""
    if not any(t[0] == key for t in node.taints):
        return None
    return [{"key": k, "value": v, "effect": e} for k, v, e in node.taints if k != key]
