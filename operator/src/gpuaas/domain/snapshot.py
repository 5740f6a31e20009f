"""What one pool pass reads: a consistent copy of the indexes, taken at the start of the pass."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

from gpuaas.api.allocation import ALLOCATION_LABEL
from gpuaas.api.usage import GpuUsage
from gpuaas.domain.access import TenantBinding
from gpuaas.domain.actions import DEFAULT_POD_GRACE_SECONDS, DeletePod
from gpuaas.domain.ledger import LedgerPod
from gpuaas.domain.namespaces import NamespaceClaim, TerminatingNamespace
from gpuaas.domain.nodes import NodeInfo
from gpuaas.domain.reclaim import HeldPod

ObjectKey = tuple[str, str, str]  # (kind, namespace, name)


@dataclass(frozen=True)
class AllocationView:
    """An allocation as the index holds it."""

    name: str
    uid: str
    created: datetime
    generation: int | None
    resource_version: str
    deleting: bool
    finalizers: tuple[str, ...]
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    # The grant-history annotations the webhooks stamp (domain/history.py), and when the deletion was requested.
    history_stamps: Mapping[str, str] = field(default_factory=dict)
    deletion_timestamp: datetime | None = None

    @cached_property  # the index hands out the same view while the allocation is unchanged: once per change
    def target_namespace(self) -> str:
        """The namespace the (possibly invalid) spec names: spec.namespace, else the tenant's name."""
        return str(self.spec.get("namespace") or (self.spec.get("tenant") or {}).get("name", ""))


@dataclass(frozen=True)
class PodView:
    """A GPU pod (or one still holding the usage finalizer) of a tenant namespace."""

    name: str
    namespace: str
    uid: str
    gpus: int
    running: bool
    ledger: LedgerPod
    created: str = ""
    grace_seconds: int = DEFAULT_POD_GRACE_SECONDS  # its terminationGracePeriodSeconds

    def stop(self, max_grace_seconds: int) -> DeletePod:
        """Delete it with its own grace, never more than its pool allows (pods admitted before a lower cap)."""
        return DeletePod(self.namespace, self.name, min(self.grace_seconds, max_grace_seconds))

    @cached_property
    def held(self) -> HeldPod:
        """Made once per pod state: every pass's admission reads it for every pod of the pool."""
        interval = self.ledger.interval
        return HeldPod(
            name=self.name,
            gpus=self.gpus,
            created=self.created,
            finished=self.ledger.finished,
            started=interval.start if interval else None,
            released_at=interval.end if interval else None,
        )


@dataclass
class PoolSnapshot:
    pool: str
    spec: Mapping[str, Any]
    generation: int | None
    status: Mapping[str, Any]
    nodes: list[NodeInfo]
    allocations: list[AllocationView]
    # The observed objects of the kinds gpuaas applies.
    observed: dict[ObjectKey, Mapping[str, Any]]
    # namespace -> labels, for every namespace in the cluster.
    namespaces: dict[str, Mapping[str, str]]
    # namespace -> the allocations (of any pool) that target it.
    namespace_claims: dict[str, list[NamespaceClaim]]
    pods_by_namespace: dict[str, list[PodView]]
    # allocation uid -> its GpuUsage records by name.
    usage: dict[str, dict[str, GpuUsage]]
    # node name -> allocation holding it exclusively (any pool).
    exclusive_holders: dict[str, str]
    # namespace -> RoleBindings there that gpuaas did not write.
    tenant_bindings: dict[str, list[TenantBinding]] = field(default_factory=dict)
    # namespace -> what keeps it from going away, for namespaces being deleted.
    terminating_namespaces: dict[str, TerminatingNamespace] = field(default_factory=dict)
    # namespace -> GPU pods whose objects are gone, as their DELETED events left them (domain/departed.py).
    departed_by_namespace: dict[str, list[LedgerPod]] = field(default_factory=dict)
    # The DRA DeviceClasses that other pools name for their GPUs (held at 0 in this pool's quotas).
    other_pools_device_classes: frozenset[str] = frozenset()

    def pods_of(self, namespace: str) -> list[PodView]:
        return self.pods_by_namespace.get(namespace, [])

    def ledger_pods_of(self, namespace: str) -> list[LedgerPod]:
        """What the ledger books in the namespace: its GPU pods, and those that departed (unless the index, which
        may lag a deletion, still shows them)."""
        pods = [pod.ledger for pod in self.pods_of(namespace)]
        present = {pod.uid for pod in pods}
        return pods + [pod for pod in self.departed_by_namespace.get(namespace, []) if pod.uid not in present]

    def namespace_is_of(self, namespace: str, allocation: str) -> bool:
        """Whether the namespace exists and is labelled as the allocation's own."""
        return (self.namespaces.get(namespace) or {}).get(ALLOCATION_LABEL) == allocation


def observed_key(manifest: Mapping[str, Any]) -> ObjectKey:
    metadata = manifest["metadata"]
    return (manifest["kind"], metadata.get("namespace") or "", metadata["name"])
