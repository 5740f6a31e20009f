"""The writes a pool pass decides on, as data.

The planner (domain/planner.py) returns these; the executor (k8s/reconciler.py) hands each to the writer port
(k8s/writer.py), the only place that turns them into API calls. Tests read a pass's decisions from the list.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpuaas.api.usage import GpuPoolUsage, GpuUsage, PoolLedger, UsageLedger
from gpuaas.domain.access import TenantBinding

DEFAULT_POD_GRACE_SECONDS = 30  # Kubernetes' default terminationGracePeriodSeconds


@dataclass(frozen=True)
class ApplyObject:
    """Server-side apply of a tenant object (Namespace, ResourceQuota, LimitRange, RoleBinding)."""

    manifest: Mapping[str, Any]


@dataclass(frozen=True)
class PatchNode:
    """Strategic-merge patch of a node's labels or taints."""

    name: str
    patch: Mapping[str, Any]


@dataclass(frozen=True)
class DeletePod:
    namespace: str
    name: str
    # The pod's own terminationGracePeriodSeconds, never more than its pool allows: it may checkpoint, and its GPUs
    # are free at a bounded time.
    grace_seconds: int = DEFAULT_POD_GRACE_SECONDS


@dataclass(frozen=True)
class DeleteNamespace:
    name: str


@dataclass(frozen=True)
class DeleteRoleBinding:
    namespace: str
    name: str


@dataclass(frozen=True)
class SetRoleBindingSubjects:
    """Rewrite a tenant RoleBinding's subjects, guarded by the resourceVersion the pass saw."""

    binding: TenantBinding
    subjects: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class PatchStatus:
    """A JSON merge patch of a cluster-scoped gpuaas object's status."""

    plural: str
    name: str
    patch: Mapping[str, Any]


@dataclass(frozen=True)
class AddAllocationFinalizer:
    allocation: str
    finalizer: str
    has_any: bool  # whether the allocation has finalizers already (a JSON patch adds to the list, or creates it)


@dataclass(frozen=True)
class RemoveAllocationFinalizer:
    allocation: str
    finalizer: str
    finalizers: tuple[str, ...]  # as the pass saw them: removal is by index, guarded by a test op


@dataclass(frozen=True)
class AnnotateAllocation:
    """Set one annotation of an allocation (the grant history's delete stamp)."""

    allocation: str
    key: str
    value: str


@dataclass(frozen=True)
class SuspendAllocation:
    """Set spec.suspend, so that resuming is the documented `spec.suspend: false`."""

    allocation: str


@dataclass(frozen=True)
class PostEvent:
    kind: str
    name: str
    uid: str
    reason: str
    message: str
    event_type: str = "Normal"


@dataclass(frozen=True)
class CreateUsage:
    """Create a GpuUsage record with its first booking (one that exists already, from before a crash, is written)."""

    record: GpuUsage


@dataclass(frozen=True)
class WriteUsageLedger:
    name: str
    ledger: UsageLedger
    dropped_pods: tuple[str, ...] = ()  # watermarks pruned from the ledger: deleted from the stored record
    labels: Mapping[str, str] = field(default_factory=dict)  # set with the ledger, so a changed label heals


@dataclass(frozen=True)
class CreatePoolUsage:
    """Create a pool's month record (GpuPoolUsage) with its first booking."""

    record: GpuPoolUsage


@dataclass(frozen=True)
class WritePoolLedger:
    name: str
    ledger: PoolLedger
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReleasePod:
    """Remove a pod's usage finalizer, once its whole interval is booked: the entry at `finalizer_index` of the pod
    with `uid`, or nothing if either has changed since the pass's view (a later pass sees the change)."""

    namespace: str
    name: str
    uid: str
    finalizer_index: int


Action = (
    ApplyObject
    | PatchNode
    | DeletePod
    | DeleteNamespace
    | DeleteRoleBinding
    | SetRoleBindingSubjects
    | PatchStatus
    | AddAllocationFinalizer
    | RemoveAllocationFinalizer
    | SuspendAllocation
    | AnnotateAllocation
    | PostEvent
    | CreateUsage
    | WriteUsageLedger
    | CreatePoolUsage
    | WritePoolLedger
    | ReleasePod
)


def written_object(action: Action) -> str:
    """What a write changes, as a person would name it in a status message: `ResourceQuota gpu-quota`, `Node n1`."""
    match action:
        case ApplyObject(manifest):
            return f"{manifest.get('kind', 'object')} {manifest.get('metadata', {}).get('name', '')}"
        case PatchNode(name, _):
            return f"Node {name}"
        case DeletePod(namespace, name, _) | ReleasePod(namespace, name, _, _):
            return f"Pod {namespace}/{name}"
        case DeleteRoleBinding(namespace, name):
            return f"RoleBinding {namespace}/{name}"
        case SetRoleBindingSubjects(binding, _):
            return f"RoleBinding {binding.namespace}/{binding.name}"
        case DeleteNamespace(name):
            return f"Namespace {name}"
        case _:
            return type(action).__name__
