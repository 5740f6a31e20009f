"""Builders for pool-pass inputs, and a recording writer: unit tests of the planner and the executor share them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes.client.exceptions import ApiException

from gpuaas.api.allocation import ALLOCATION_LABEL
from gpuaas.api.pool import POOL_LABEL
from gpuaas.api.usage import GpuUsageSpec, UsageTenant
from gpuaas.domain.actions import Action
from gpuaas.domain.ledger import LedgerPod, PodInterval
from gpuaas.domain.namespaces import NamespaceClaim
from gpuaas.domain.nodes import NodeInfo
from gpuaas.domain.planner import RELEASE_FINALIZER
from gpuaas.domain.snapshot import AllocationView, PodView, PoolSnapshot

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)
POOL = "h200-a"


def gpu_node(name: str, *, pool: str = POOL, healthy: bool = True, labels: dict[str, str] | None = None) -> NodeInfo:
    return NodeInfo(
        name=name,
        labels={POOL_LABEL: pool, **(labels or {})},
        ready=healthy,
        allocatable_gpus=8,
    )


def pool_spec(**overrides: Any) -> dict[str, Any]:
    return {"gpuModel": "H200", "provider": "naver", "nodeSelector": {POOL_LABEL: POOL}, "taint": False, **overrides}


def allocation(
    name: str,
    gpus: int = 8,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    created: datetime | None = None,
    finalizers: tuple[str, ...] = (RELEASE_FINALIZER,),
    deleting: bool = False,
    status: dict[str, Any] | None = None,
    **spec: Any,
) -> AllocationView:
    body = {
        "tenant": {"name": name, "organization": "KAIST"},
        "pool": POOL,
        "gpus": gpus,
        "window": {
            "start": (start or NOW - timedelta(days=1)).isoformat(),
            "end": (end or NOW + timedelta(days=30)).isoformat(),
        },
        "owners": [{"kind": "User", "name": "alice"}],
        **spec,
    }
    return AllocationView(
        name=name,
        uid=str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
        created=created or NOW - timedelta(days=2),
        generation=1,
        resource_version="1",
        deleting=deleting,
        finalizers=finalizers,
        spec=body,
        status=status or {},
    )


def gpu_pod(
    name: str,
    namespace: str,
    gpus: int = 8,
    *,
    started: datetime | None = None,
    ended: datetime | None = None,
    running: bool = True,
    finished: bool = False,
    created_minute: int = 0,
) -> PodView:
    start = started if started is not None else (NOW - timedelta(hours=1) if running or finished else None)
    interval = PodInterval(uid=f"uid-{name}", gpus=gpus, start=start, end=ended) if start is not None else None
    ledger = LedgerPod(name, namespace, f"uid-{name}", interval, has_finalizer=True, finished=finished)
    created = (NOW - timedelta(hours=2) + timedelta(minutes=created_minute)).isoformat()
    return PodView(name, namespace, f"uid-{name}", gpus, running and not finished, ledger, created)


@dataclass
class SnapshotBuilder:
    """A pool snapshot whose allocations own their namespaces, unless told otherwise."""

    nodes: list[NodeInfo] = field(default_factory=lambda: [gpu_node(f"node-{i}") for i in range(4)])
    spec: dict[str, Any] = field(default_factory=pool_spec)
    allocations: list[AllocationView] = field(default_factory=list)
    pods: dict[str, list[PodView]] = field(default_factory=dict)
    unowned: set[str] = field(default_factory=set)
    status: dict[str, Any] = field(default_factory=dict)

    def with_allocation(self, view: AllocationView, *pods: PodView, owns_namespace: bool = True) -> SnapshotBuilder:
        self.allocations.append(view)
        self.pods.setdefault(view.target_namespace, []).extend(pods)
        if not owns_namespace:
            self.unowned.add(view.name)
        return self

    def build(self) -> PoolSnapshot:
        namespaces: dict[str, dict[str, str]] = {}
        for view in self.allocations:  # the first allocation added owns a shared namespace
            if view.name not in self.unowned:
                namespaces.setdefault(view.target_namespace, {ALLOCATION_LABEL: view.name})
        claims = {
            view.target_namespace: [NamespaceClaim(view.created.isoformat(), view.name, POOL)]
            for view in self.allocations
        }
        return PoolSnapshot(
            pool=POOL,
            spec=self.spec,
            generation=1,
            status=self.status,
            nodes=self.nodes,
            allocations=self.allocations,
            observed={},
            namespaces=dict(namespaces),
            namespace_claims=claims,
            pods_by_namespace=self.pods,
            usage={},
            exclusive_holders={},
        )


@dataclass
class RecordingWriter:
    """The writer port's fake: records every action; `fail` makes the first action of a type raise."""

    actions: list[Action] = field(default_factory=list)
    fail: dict[type, int] = field(default_factory=dict)

    def perform(self, action: Action) -> None:
        status = self.fail.get(type(action))
        if status is not None:
            raise ApiException(status=status, reason="Injected")
        self.actions.append(action)

    def of(self, kind: type) -> list[Any]:
        return [action for action in self.actions if isinstance(action, kind)]


def finished(pod: PodView, at: datetime) -> PodView:
    """The pod as it is once its containers terminated at `at`."""
    assert pod.ledger.interval is not None
    interval = replace(pod.ledger.interval, end=at)
    return replace(pod, running=False, ledger=replace(pod.ledger, interval=interval, finished=True))


def usage_identity(time_zone: str = "UTC") -> GpuUsageSpec:
    """The record spec (without its month) of allocation `t` on the builders' pool, as the ledger writer takes it."""
    return GpuUsageSpec(
        allocation="t",
        allocation_uid="uid-t",
        tenant=UsageTenant(name="t", organization="KAIST"),
        pool=POOL,
        gpu_model="H200",
        provider="naver",
        month="1970-01",
        time_zone=time_zone,
    )
