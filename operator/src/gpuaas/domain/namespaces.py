"""Whether an allocation may have its namespace: the one home of the namespace-claim rules, used by the admission
webhook (a clear refusal at `kubectl apply`) and by the reconcile pass (a rejection in status)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpuaas.api.allocation import ALLOCATION_LABEL, ConditionReason, is_reserved_namespace

# The namespace controller's conditions that say what keeps a namespace from going away.
BLOCKING_CONDITIONS = (
    "NamespaceFinalizersRemaining",
    "NamespaceContentRemaining",
    "NamespaceDeletionContentFailure",
    "NamespaceDeletionDiscoveryFailure",
    "NamespaceDeletionGroupVersionParsingFailure",
)


UNREPORTED = "the namespace controller has not reported what remains yet"


@dataclass(frozen=True)
class TerminatingNamespace:
    name: str
    since: str  # deletionTimestamp
    holding: str  # what keeps it, from its own status conditions

    @property
    def reported(self) -> bool:
        return self.holding != UNREPORTED

    def describe(self) -> str:
        return f"namespace {self.name} is still being deleted (since {self.since}): {self.holding}"


def terminating_namespace(namespace: Mapping[str, Any]) -> TerminatingNamespace | None:
    metadata = namespace.get("metadata") or {}
    since = metadata.get("deletionTimestamp")
    if not since:
        return None
    conditions = (namespace.get("status") or {}).get("conditions") or []
    blocking = [
        str(c.get("message") or c.get("reason") or c.get("type"))
        for c in conditions
        if c.get("type") in BLOCKING_CONDITIONS and c.get("status") == "True"
    ]
    holding = "; ".join(blocking) or UNREPORTED
    return TerminatingNamespace(str(metadata.get("name", "")), str(since), holding)


@dataclass(frozen=True, order=True)
class NamespaceClaim:
    """An allocation that names a namespace, as the index holds it; the oldest claim owns the namespace."""

    created: str  # RFC 3339, so it sorts by time
    allocation: str
    pool: str = ""
    exclusive: bool = False


def namespace_problem(
    allocation: str,
    namespace: str,
    claims: Sequence[NamespaceClaim],
    labels: Mapping[str, str] | None,
    terminating: TerminatingNamespace | None,
) -> tuple[str, str] | None:
    """(reason, message) when `allocation` may not have `namespace`; None when it may."""
    if is_reserved_namespace(namespace):
        return "ReservedNamespace", f"namespace {namespace} is a system namespace and cannot be granted"
    if terminating is not None and (labels or {}).get(ALLOCATION_LABEL) != allocation:
        return (
            ConditionReason.NAMESPACE_TERMINATING,
            f"{terminating.describe()}; it can be granted again once it is gone",
        )
    others = sorted(c for c in claims if c.allocation != allocation)
    mine = [c for c in claims if c.allocation == allocation]
    if others and (not mine or others[0] < mine[0]):
        return "NamespaceClaimed", f"namespace {namespace} already belongs to allocation {others[0].allocation}"
    if labels is not None and labels.get(ALLOCATION_LABEL) != allocation:
        owner = labels.get(ALLOCATION_LABEL)
        if owner:
            return "NamespaceClaimed", f"namespace {namespace} is managed for allocation {owner}"
        return (
            "NamespaceExists",
            f"namespace {namespace} already exists and is not managed by gpuaas; "
            "choose another spec.namespace or delete that namespace first",
        )
    return None
