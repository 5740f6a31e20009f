"""The pool pass's rules: from a snapshot, the pass's memory and `now`, the writes to make, as data.

A pass runs in this order; each step is one function here, and the executor (k8s/reconciler.py) only carries out
what it returns through the writer port:
1. `pool_taint_actions`: the pool's nodes carry (or lose) its taint.
2. `intake`: each allocation is released (being deleted), rejected (invalid spec or namespace), or becomes a demand.
3. `admit_pool`: demands are admitted against capacity minus GPUs still held beyond grants.
4. per allocation: its ledger is booked (domain/booking.py), then `plan_tenant` keeps its nodes, objects, bindings
   and pods, then `allocation_status`, `status_actions` and `idle_actions` report the outcome.
5. `plan_release`, for allocations being deleted.
Where a step's input is the outcome of an earlier write (an apply that failed), the executor feeds that back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from gpuaas.api.allocation import (
    ALLOCATION_KIND,
    ALLOCATION_LABEL,
    ALLOCATION_PLURAL,
    ConditionReason,
    ConditionType,
    GpuAllocationSpec,
    GpuAllocationStatus,
)
from gpuaas.api.pool import POOL_LABEL, GpuPoolSpec
from gpuaas.api.usage import UsageLedger
from gpuaas.domain.access import TenantBinding, allowed_subjects
from gpuaas.domain.actions import (
    Action,
    AddAllocationFinalizer,
    ApplyObject,
    DeleteNamespace,
    DeletePod,
    DeleteRoleBinding,
    PatchNode,
    PatchStatus,
    PostEvent,
    RemoveAllocationFinalizer,
    SetRoleBindingSubjects,
    SuspendAllocation,
)
from gpuaas.domain.capacity import AdmissionDecision, AdmissionResult, AllocationDemand, admit
from gpuaas.domain.downtime import GrantInForce, PoolBreakdown, pool_breakdown
from gpuaas.domain.drift import has_drifted
from gpuaas.domain.exclusive import choose_exclusive_nodes
from gpuaas.domain.ledger import GrantState
from gpuaas.domain.lifecycle import AllocationSample, ReconcileOutcome, is_idle, waiting_for_namespace_status
from gpuaas.domain.namespaces import TerminatingNamespace, namespace_problem
from gpuaas.domain.nodes import NodeInfo, taints_with, taints_without
from gpuaas.domain.reclaim import HeldPod, held_beyond_grants, holds_quota, pods_to_stop, quota_held
from gpuaas.domain.snapshot import AllocationView, ObjectKey, PodView, PoolSnapshot, observed_key
from gpuaas.domain.tenant import (
    OWNERS_BINDING_NAME,
    GpuQuotaItems,
    desired_namespace,
    desired_owner_binding,
    desired_resource_quota,
    desired_tenant_objects,
    gpu_quota_items,
    quota_open,
    tenant_object_keys,
)

RELEASE_FINALIZER = "gpuaas.io/release"
# An apply that the watch has not reflected yet is not repeated for this long.
APPLY_SETTLE = timedelta(seconds=5)
# Each repeat of the same apply waits twice as long as the last, up to this: a watch that lags in a burst is not caught
# up by more writes, which load the API server that feeds it (10,000 at once repeated 1.6 quota applies each).
APPLY_SETTLE_LONGEST = timedelta(seconds=80)
# Allocations skipped as unchanged have their usage booked again this often (in memory; nothing else of theirs is
# redone), so that live usage counters keep moving.
METRICS_REFRESH = timedelta(seconds=15)


def status_merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch from old to new status: keys that vanished are set to null."""
    patch: dict[str, Any] = dict(new)
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


def grant_in_force(spec: GpuAllocationSpec, created: datetime, status: GpuAllocationStatus, granted: int) -> GrantState:
    """The grant that held since the previous pass: window bounds are exact; phase changes and the GPUs that were
    down (the status's downGPUs) are per pass. A grant begins no earlier than its admission (the Admitted
    condition's lastTransitionTime), so time booked before it, queued or suspended, never counts as granted."""
    gpus = granted if status.phase in ("Active", "Scheduled") else 0
    active_from = max(spec.window.start, created)
    admitted = next((c for c in status.conditions if c.type == ConditionType.ADMITTED and c.status == "True"), None)
    if gpus > 0 and admitted is not None:
        active_from = max(active_from, admitted.last_transition_time)
    return GrantState(
        gpus=gpus, active_from=active_from, active_until=spec.window.end, down_gpus=min(status.down_gpus, gpus)
    )


def grant_changes(held: GrantState, decision: AdmissionDecision, down_gpus: int) -> bool:
    """Whether this pass's decision changes a grant in force. The ledger must then write what it booked up to now
    under the old grant: the next booking starts from the written watermark with the new one. A grant that begins
    needs no such write: it counts from its admission (`grant_in_force`)."""
    gpus = decision.granted_gpus if decision.phase in ("Active", "Scheduled") else 0
    return held.gpus > 0 and (gpus, min(down_gpus, gpus)) != (held.gpus, held.down_gpus)


# --- 1. the pool's nodes -------------------------------------------------------------------------


def node_patch(
    node: NodeInfo, labels: Mapping[str, str | None] | None, taints: list[dict[str, str]] | None
) -> PatchNode:
    """A patch of the node's labels and its whole taint list (empty when neither changes). A taint list is sent
    with the version it was read at: the list is replaced whole, so a taint that another controller set since
    (the node lifecycle controller's not-ready, an operator's drain) would be lost. The API server refuses the
    stale patch instead, and the next pass writes the list again from the fresh node."""
    patch: dict[str, Any] = {}
    if labels:
        patch["metadata"] = {"labels": dict(labels)}
    if taints is not None:
        patch["spec"] = {"taints": taints}
        if node.resource_version:
            patch.setdefault("metadata", {})["resourceVersion"] = node.resource_version
    return PatchNode(node.name, patch)


def pool_taint_actions(pool: str, spec: GpuPoolSpec, members: Iterable[NodeInfo]) -> list[PatchNode]:
    actions = []
    for node in members:
        taints = taints_with(node, POOL_LABEL, pool) if spec.taint else taints_without(node, POOL_LABEL)
        if taints is not None:
            actions.append(node_patch(node, None, taints))
    return actions


def unlabel_exclusive(node: NodeInfo) -> PatchNode:
    return node_patch(node, {ALLOCATION_LABEL: None}, taints_without(node, ALLOCATION_LABEL))


def release_exclusive_nodes(allocation: str, members: Iterable[NodeInfo]) -> list[PatchNode]:
    return [unlabel_exclusive(node) for node in members if node.labels.get(ALLOCATION_LABEL) == allocation]


@dataclass(frozen=True)
class ExclusiveNodes:
    actions: list[PatchNode]
    nodes: tuple[str, ...]
    shortfall: int


def exclusive_node_plan(
    allocation: str,
    decision: AdmissionDecision,
    members: list[NodeInfo],
    exclusive_holders: Mapping[str, str],
    gpus_per_node: int,
) -> ExclusiveNodes:
    """An active exclusive grant holds whole nodes, labelled and tainted for it; any other phase holds none."""
    if decision.phase != "Active":
        return ExclusiveNodes(release_exclusive_nodes(allocation, members), (), 0)
    held = [node.name for node in members if node.labels.get(ALLOCATION_LABEL) == allocation]
    others = [name for name, holder in exclusive_holders.items() if holder != allocation]
    choice = choose_exclusive_nodes(members, decision.granted_gpus, gpus_per_node, held, others, {})
    by_name = {node.name: node for node in members}
    actions = [unlabel_exclusive(by_name[name]) for name in choice.released if name in by_name]
    for name in choice.nodes:
        node = by_name[name]
        label = {ALLOCATION_LABEL: allocation} if node.labels.get(ALLOCATION_LABEL) != allocation else None
        action = node_patch(node, label, taints_with(node, ALLOCATION_LABEL, allocation))
        if action.patch:
            actions.append(action)
    return ExclusiveNodes(actions, choice.nodes, choice.shortfall)


# --- 2. intake -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A valid allocation not being deleted: what admission weighs, and the grant booked up to now."""

    view: AllocationView
    spec: GpuAllocationSpec
    demand: AllocationDemand
    grant: GrantState


def invalid_spec_message(error: ValidationError) -> str:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    return f"spec is invalid: {problems}"


@dataclass(frozen=True)
class Rejection:
    reason: str
    message: str


def namespace_rejection(view: AllocationView, spec: GpuAllocationSpec, snap: PoolSnapshot) -> Rejection | None:
    namespace = spec.target_namespace
    problem = namespace_problem(
        view.name,
        namespace,
        snap.namespace_claims.get(namespace, []),
        snap.namespaces.get(namespace),
        snap.terminating_namespaces.get(namespace),
    )
    return Rejection(*problem) if problem is not None else None


def finalizers_at_create(finalizers: Sequence[str]) -> list[str] | None:
    """The finalizers a new allocation is admitted with: its own plus the release finalizer (None: it has it). The
    first pass adds it when the webhook could not (`finalizer_actions`)."""
    return None if RELEASE_FINALIZER in finalizers else [*finalizers, RELEASE_FINALIZER]


def finalizer_actions(view: AllocationView) -> list[Action]:
    if RELEASE_FINALIZER in view.finalizers:
        return []
    return [AddAllocationFinalizer(view.name, RELEASE_FINALIZER, has_any=bool(view.finalizers))]


def granted_so_far(status: GpuAllocationStatus, remembered: int | None) -> int:
    """GPUs granted before this pass: what this replica granted (the index may lag its writes), else the status."""
    if remembered is not None:
        return remembered
    return status.granted_gpus if status.admitted else 0


def intake(
    view: AllocationView,
    spec: GpuAllocationSpec | ValidationError,
    snap: PoolSnapshot,
    status: GpuAllocationStatus,
    remembered_grant: int | None,
) -> Candidate | Rejection:
    """An allocation not being deleted: rejected (invalid spec or namespace), or a candidate for admission."""
    if isinstance(spec, ValidationError):
        return Rejection("InvalidSpec", invalid_spec_message(spec))
    rejection = namespace_rejection(view, spec, snap)
    if rejection is not None:
        return rejection
    granted = granted_so_far(status, remembered_grant)
    demand = AllocationDemand(
        name=view.name,
        uid=view.uid,
        gpus=spec.gpus,
        priority=spec.priority,
        created=view.created,
        start=spec.window.start,
        end=spec.window.end,
        granted_gpus=granted,
        suspended=spec.suspend,
    )
    return Candidate(view, spec, demand, grant_in_force(spec, view.created, status, granted))


# --- 3. admission --------------------------------------------------------------------------------


def held_by_allocation(snap: PoolSnapshot) -> dict[str, list[HeldPod]]:
    """The GPU pods of each allocation's namespace (when the namespace is still the allocation's own)."""
    held: dict[str, list[HeldPod]] = {}
    for view in snap.allocations:
        pods = snap.pods_of(view.target_namespace)
        if pods and snap.namespace_is_of(view.target_namespace, view.name):  # no pods hold nothing
            held[view.name] = [pod.held for pod in pods]
    return held


@dataclass(frozen=True)
class PoolAdmission:
    result: AdmissionResult
    held_beyond_grants: int  # GPUs that stopping pods still hold beyond their allocations' grants


@dataclass(frozen=True)
class _Admitted:
    demands: tuple[AllocationDemand, ...]
    since: datetime
    until: datetime | None  # the next instant a window starts or ends: decisions may change there
    result: AdmissionResult

    def holds(self, demands: tuple[AllocationDemand, ...], now: datetime) -> bool:
        in_time = self.since <= now and (self.until is None or now < self.until)
        return in_time and self.demands == demands  # kept candidates are the same objects: equal at a glance


@dataclass
class AdmissionMemo:
    """A pool's latest admissions, for its next pass: while the demands and the capacity are the same and no window
    has started or ended, admitting again would decide the same (`admit` reads the clock only against window
    bounds). Most passes of a pool in use change no demand: their pods come and go."""

    # by capacity, at most two (the pool's, and less the GPUs held beyond grants), the latest used last
    kept: dict[int, _Admitted] = field(default_factory=dict)

    def admit(self, capacity_gpus: int, demands: tuple[AllocationDemand, ...], now: datetime) -> AdmissionResult:
        entry = self.kept.pop(capacity_gpus, None)
        if entry is None or not entry.holds(demands, now):
            until = min((t for d in demands for t in (d.start, d.end) if t > now), default=None)
            entry = _Admitted(demands, now, until, admit(capacity_gpus, demands, now))
            while len(self.kept) >= 2:
                del self.kept[next(iter(self.kept))]
        self.kept[capacity_gpus] = entry
        return entry.result


def admit_pool(
    capacity_gpus: int,
    candidates: list[Candidate],
    held: Mapping[str, list[HeldPod]],
    now: datetime,
    memo: AdmissionMemo | None = None,
) -> PoolAdmission:
    """GPUs that pods still hold beyond their grant (a suspended, shrunk or released grant whose pods are still
    stopping) are not offered to anyone until those pods are gone."""
    demands = tuple(c.demand for c in candidates)
    memo = memo if memo is not None else AdmissionMemo()
    result = memo.admit(capacity_gpus, demands, now)
    beyond = held_beyond_grants({name: d.granted_gpus for name, d in result.decisions.items()}, held, now)
    if beyond:
        result = memo.admit(capacity_gpus - beyond, demands, now)
    return PoolAdmission(result, beyond)


def breakdown_now(
    pool_spec: GpuPoolSpec,
    members: Sequence[NodeInfo],
    healthy_program_gpus: int,
    candidates: Iterable[Candidate],
    decisions: Mapping[str, AdmissionDecision],
    exclusive_holders: Mapping[str, str],
) -> PoolBreakdown:
    """The pool's program GPUs split for this pass's decisions: the Active grants and the hardware under them."""
    grants = [
        GrantInForce(c.view.name, decision.granted_gpus, c.spec.exclusive_nodes)
        for c in candidates
        if (decision := decisions[c.view.name]).phase == "Active"
    ]
    return pool_breakdown(pool_spec, members, healthy_program_gpus, grants, exclusive_holders)


# --- 4. one allocation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RecentApply:
    """A tenant object gpuaas applied moments ago: not repeated while the watch has not shown it."""

    manifest: Mapping[str, Any]
    at: datetime
    repeats: int = 0  # applies of this manifest before this one that the watch has not shown yet

    @property
    def settled_at(self) -> datetime:
        doublings = min(self.repeats, 8)  # the longest is reached before this; no huge numbers for long outages
        return self.at + min(APPLY_SETTLE * (1 << doublings), APPLY_SETTLE_LONGEST)


def recent_apply(previous: RecentApply | None, manifest: Mapping[str, Any], at: datetime) -> RecentApply:
    """An apply's record: a repeat of the same manifest counts on from the one before."""
    repeats = previous.repeats + 1 if previous is not None and previous.manifest == manifest else 0
    return RecentApply(manifest, at, repeats)


@dataclass(frozen=True)
class ObjectApplies:
    actions: list[ApplyObject]
    settling: bool  # some object drifted but was applied moments ago
    shown: tuple[ObjectKey, ...]  # objects applied before that the watch now shows as applied: their record ends


def object_apply_actions(
    desired: Iterable[Mapping[str, Any]],
    observed: Mapping[ObjectKey, Mapping[str, Any]],
    recent: Mapping[ObjectKey, RecentApply],
    now: datetime,
) -> ObjectApplies:
    """Applies of the objects that drifted, but not of those applied moments ago."""
    actions: list[ApplyObject] = []
    settling = False
    shown: list[ObjectKey] = []
    for manifest in desired:
        key = observed_key(manifest)
        last = recent.get(key)
        if not has_drifted(manifest, observed.get(key)):
            if last is not None:
                shown.append(key)
            continue
        settling = True
        if last is None or last.manifest != manifest or now >= last.settled_at:
            actions.append(ApplyObject(manifest))
    return ObjectApplies(actions, settling, tuple(shown))


def binding_actions(
    bindings: Iterable[TenantBinding], namespace: str, owners: list[dict[str, Any]] | None
) -> list[SetRoleBindingSubjects]:
    """Tenant RoleBindings keep only owners and the namespace's ServiceAccounts; none once released."""
    actions = []
    for binding in bindings:
        kept = allowed_subjects(binding.subjects, owners, namespace)
        if len(kept) != len(binding.subjects):
            actions.append(SetRoleBindingSubjects(binding, tuple(kept)))
    return actions


def expired_pod_stops(
    spec: GpuAllocationSpec, pods: Iterable[PodView], now: datetime, max_grace_seconds: int
) -> list[DeletePod]:
    """GPU pods (Pending and gated ones too) get the grace period after window.end, then are deleted; the
    namespace and PVCs stay."""
    if now < spec.window.end + timedelta(seconds=spec.grace_period_seconds):
        return []
    return [pod.stop(max_grace_seconds) for pod in pods if holds_quota(pod.held)]


def beyond_grant_stops(
    view: AllocationView, decision: AdmissionDecision, pods: list[PodView], max_grace_seconds: int
) -> list[Action]:
    """Suspension, idle reclaim and a smaller grant take GPUs away: the pods holding them stop now."""
    by_name = {pod.name: pod for pod in pods}
    stopping = pods_to_stop(decision.phase, decision.granted_gpus, [pod.held for pod in pods])
    if not stopping:
        return []
    actions: list[Action] = [by_name[held.name].stop(max_grace_seconds) for held in stopping]
    names = ", ".join(pod.name for pod in stopping)
    reason = "not in force" if decision.phase != "Active" else f"granted {decision.granted_gpus}"
    actions.append(PostEvent(ALLOCATION_KIND, view.name, view.uid, "PodsStopped", f"GPUs {reason}: stopping {names}"))
    return actions


@dataclass(frozen=True)
class TenantPlan:
    """The writes that keep one allocation's nodes, objects, bindings and pods as its decision says."""

    actions: list[Action]
    settling: bool
    nodes: tuple[str, ...]
    node_shortfall: int
    in_use_gpus: int
    held_gpus: int
    shown: tuple[ObjectKey, ...] = ()  # ObjectApplies.shown


def write_stages(actions: Sequence[Action]) -> list[tuple[Action, ...]]:
    """The plan's writes in order, grouped into stages whose writes may run at once: consecutive applies of
    namespaced objects (each needs only its Namespace, applied in a stage before them). Every other write is a stage of
    its own: node patches, binding changes and pod stops keep the plan's order."""
    stages: list[tuple[Action, ...]] = []
    for action in actions:
        if _namespaced_apply(action) and stages and _namespaced_apply(stages[-1][-1]):
            stages[-1] = (*stages[-1], action)
        else:
            stages.append((action,))
    return stages


def _namespaced_apply(action: Action) -> bool:
    return isinstance(action, ApplyObject) and bool(action.manifest.get("metadata", {}).get("namespace"))


def gpu_quota_items_of(pool_spec: GpuPoolSpec, snap: PoolSnapshot) -> GpuQuotaItems:
    dra_class = pool_spec.dra.device_class_name if pool_spec.dra else None
    return gpu_quota_items(dra_class, snap.other_pools_device_classes)


def plan_tenant(
    view: AllocationView,
    spec: GpuAllocationSpec,
    decision: AdmissionDecision,
    snap: PoolSnapshot,
    members: list[NodeInfo],
    pool_spec: GpuPoolSpec,
    recent: Mapping[ObjectKey, RecentApply],
    now: datetime,
) -> TenantPlan:
    namespace = spec.target_namespace
    pods = snap.pods_of(namespace)
    actions: list[Action] = []
    nodes = ExclusiveNodes([], (), 0)
    if spec.exclusive_nodes:
        nodes = exclusive_node_plan(view.name, decision, members, snap.exclusive_holders, pool_spec.gpus_per_node)
        actions.extend(nodes.actions)
    applies = object_apply_actions(
        desired_tenant_objects(view.name, spec, decision.phase, gpu_quota_items_of(pool_spec, snap)),
        snap.observed,
        recent,
        now,
    )
    actions.extend(applies.actions)
    owners = desired_owner_binding(view.name, spec)["subjects"]
    actions.extend(binding_actions(snap.tenant_bindings.get(namespace, []), namespace, owners))
    if decision.phase == "Expired":
        actions.extend(expired_pod_stops(spec, pods, now, pool_spec.max_termination_grace_period_seconds))
    actions.extend(beyond_grant_stops(view, decision, pods, pool_spec.max_termination_grace_period_seconds))
    return TenantPlan(
        actions=actions,
        settling=applies.settling,
        shown=applies.shown,
        nodes=nodes.nodes,
        node_shortfall=nodes.shortfall,
        in_use_gpus=sum(pod.gpus for pod in pods if pod.running),
        held_gpus=quota_held(pod.held for pod in pods),
    )


def status_actions(
    view: AllocationView, previous: GpuAllocationStatus, old_wire: Mapping[str, Any], status: GpuAllocationStatus
) -> list[Action]:
    """The status patch (when it changed), and an event when the phase did (or the allocation started queueing)."""
    wire = status.to_wire()
    if wire == old_wire:
        return []
    actions: list[Action] = [PatchStatus(ALLOCATION_PLURAL, view.name, status_merge_patch(old_wire, wire))]
    if status.phase != previous.phase or (status.phase == "Queued" and previous.queue_position is None):
        event_type = "Warning" if status.phase == "Rejected" else "Normal"
        message = status.message or f"phase {status.phase}"
        actions.append(PostEvent(ALLOCATION_KIND, view.name, view.uid, status.phase, message, event_type))
    return actions


def idle_actions(
    view: AllocationView, spec: GpuAllocationSpec, previous: GpuAllocationStatus, status: GpuAllocationStatus
) -> list[Action]:
    """An event when the allocation turns idle; idle reclaim suspends it (resuming is `spec.suspend: false`)."""
    actions: list[Action] = []
    idle = is_idle(status)
    if idle and not is_idle(previous):
        actions.append(
            PostEvent(
                ALLOCATION_KIND, view.name, view.uid, ConditionType.IDLE, status.conditions_message(ConditionType.IDLE)
            )
        )
    if idle and spec.idle.action == "Reclaim" and status.phase == "Active":
        message = f"idle for {spec.idle.after}: GPUs returned to the pool"
        actions.append(SuspendAllocation(view.name))
        actions.append(PostEvent(ALLOCATION_KIND, view.name, view.uid, "Reclaimed", message))
    return actions


def allocation_sample(
    pool: str,
    pool_spec: GpuPoolSpec,
    view: AllocationView,
    spec: GpuAllocationSpec,
    status: GpuAllocationStatus,
    records: Mapping[str, UsageLedger],
) -> AllocationSample:
    """The allocation's metric sample; `records` are its month records' ledgers as booked up to now."""
    sample = AllocationSample(
        allocation=view.name,
        tenant=spec.tenant.name,
        organization=spec.tenant.organization,
        pool=pool,
        gpu_model=pool_spec.gpu_model,
        provider=pool_spec.provider,
        phase=status.phase,
        granted_gpus=status.granted_gpus,
        in_use_gpus=status.in_use_gpus,
        used_gpu_seconds=0,
        granted_gpu_seconds=0,
        idle=is_idle(status),
    )
    return with_usage(sample, records)


def with_usage(sample: AllocationSample, records: Mapping[str, UsageLedger]) -> AllocationSample:
    """The sample with its usage counters from `records`, booked up to now; the rest as it was."""
    return replace(
        sample,
        used_gpu_seconds=sum(r.used_gpu_seconds for r in records.values()),
        granted_gpu_seconds=sum(r.granted_gpu_seconds for r in records.values()),
    )


def pass_inputs(
    view: AllocationView, snap: PoolSnapshot, written_status: Mapping[str, Any] | None, remembered_grant: int | None
) -> tuple[object, ...]:
    """Everything one allocation's `intake` and `snapshot_reads` read, besides its spec (which follows from the view):
    while these compare equal, both give what they gave. The indexes hand out the same objects while nothing
    changes, so for an unchanged allocation the comparison is one of identities, not of contents. Whatever `intake`
    or `snapshot_reads` comes to read must be added here (tests/unit/test_steady_pass.py changes each input)."""
    namespace = view.target_namespace
    return (
        view,
        written_status,
        remembered_grant,
        tuple(snap.namespace_claims.get(namespace, ())),
        snap.namespaces.get(namespace),
        snap.terminating_namespaces.get(namespace),
        tuple(snap.pods_of(namespace)),
        tuple(snap.departed_by_namespace.get(namespace, ())),
        tuple(snap.observed.get(key) for key in tenant_object_keys(namespace)),
        snap.generation,
        snap.other_pools_device_classes,
    )


def snapshot_reads(c: Candidate, snap: PoolSnapshot) -> tuple[object, ...]:
    """What a full pass of one allocation reads from the snapshot beyond its intake, in short."""
    namespace = c.spec.target_namespace
    pods = tuple(sorted((p.uid, p.running) for p in snap.pods_of(namespace)))
    ledger_pods = tuple(
        sorted((p.uid, p.finished, p.has_finalizer, p.departed, p.interval) for p in snap.ledger_pods_of(namespace))
    )
    versions = tuple(
        (snap.observed.get(key) or {}).get("metadata", {}).get("resourceVersion")
        for key in tenant_object_keys(namespace)
    )
    # The pool's spec and the other pools' GPU classes shape the quota.
    pool = (snap.generation, snap.other_pools_device_classes)
    return (pods, ledger_pods, versions, pool)


def fingerprint(c: Candidate, decision: AdmissionDecision, reads: tuple[object, ...]) -> tuple[object, ...]:
    """Everything a full pass of one allocation reads, except the clock: while it is unchanged and nothing is due
    (`recheck_at`), the allocation's last sample stands and nothing is written. `reads`: `snapshot_reads`."""
    return (c.view.resource_version, c.grant, decision, *reads)


def recheck_at(
    spec: GpuAllocationSpec, status: GpuAllocationStatus, pods: Iterable[PodView], ledger_due: datetime, now: datetime
) -> datetime:
    """The next moment time alone changes something: window edges, the idle threshold, the ledger's next due write,
    and the kill deadline of a pod being deleted (booked and released once it passes). The usage counters move too,
    but refreshing them takes no full pass (`METRICS_REFRESH`)."""
    moments = [ledger_due]
    for pod in pods:
        interval = pod.ledger.interval
        if interval is not None and interval.end is not None and interval.end > now:
            moments.append(interval.end)
    for edge in (spec.window.start, spec.window.end, spec.window.end + timedelta(seconds=spec.grace_period_seconds)):
        if edge > now:
            moments.append(edge)
    if status.idle_since is not None:
        moments.append(max(now, status.idle_since + spec.idle.after_duration))
    return min(moments)


# --- 5. release ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleasePlan:
    """Deletion: GPU pods stop and are booked, GPUs go to 0, owners lose access, the namespace stays (Retain) or goes
    (Delete). The finalizer goes last, so no usage of the allocation is lost."""

    actions: list[Action]
    grant_returned: bool = True  # False while GPU pods still hold the usage finalizer (booked by later passes)
    waiting_for: TerminatingNamespace | None = None  # Delete policy: the namespace is still being deleted
    status: GpuAllocationStatus | None = None  # the status written meanwhile (saying what holds the namespace)
    done: bool = False  # the release finalizer is removed


def plan_release(
    view: AllocationView,
    spec: GpuAllocationSpec | None,
    snap: PoolSnapshot,
    members: list[NodeInfo],
    pool_spec: GpuPoolSpec,
    previous: GpuAllocationStatus,
    old_wire: Mapping[str, Any],
    now: datetime,
) -> ReleasePlan:
    """`spec` is None when the spec no longer parses: nothing was granted, so only the finalizer goes. The
    executor books the allocation (forced) before carrying out the plan."""
    if RELEASE_FINALIZER not in view.finalizers:
        return ReleasePlan([], grant_returned=False)
    actions: list[Action] = []
    namespace = spec.target_namespace if spec is not None else ""
    ours = spec is not None and snap.namespace_is_of(namespace, view.name)
    if spec is not None:
        pods = snap.pods_of(namespace) if ours else []
        max_grace = pool_spec.max_termination_grace_period_seconds
        actions.extend(pod.stop(max_grace) for pod in pods if pod.gpus > 0 and not pod.ledger.finished)
        if any(pod.ledger.has_finalizer for pod in pods):
            return ReleasePlan(actions, grant_returned=False)
    actions.extend(release_exclusive_nodes(view.name, members))
    if spec is not None and ours:
        if spec.deletion_policy == "Delete":
            terminating = snap.terminating_namespaces.get(namespace)
            if terminating is None:
                actions.append(DeleteNamespace(namespace))
                return ReleasePlan(actions)  # deletion just requested: the namespace controller has not started yet
            # Released only once the namespace is gone: until then, say what holds it.
            status = waiting_for_namespace_status(previous, terminating.describe(), now, view.generation)
            actions.extend(status_actions(view, previous, old_wire, status))
            if terminating.reported and previous.conditions_message(
                ConditionType.RELEASED
            ) != status.conditions_message(ConditionType.RELEASED):
                actions.append(
                    PostEvent(
                        ALLOCATION_KIND,
                        view.name,
                        view.uid,
                        ConditionReason.NAMESPACE_TERMINATING,
                        terminating.describe(),
                        "Warning",
                    )
                )
            return ReleasePlan(actions, waiting_for=terminating, status=status)
        actions.append(ApplyObject(desired_namespace(view.name, spec, released=True)))
        gpu_items = gpu_quota_items_of(pool_spec, snap)
        actions.append(ApplyObject(desired_resource_quota(view.name, spec, is_open=False, gpu_items=gpu_items)))
        actions.append(DeleteRoleBinding(namespace, OWNERS_BINDING_NAME))
        actions.extend(binding_actions(snap.tenant_bindings.get(namespace, []), namespace, None))
    actions.append(RemoveAllocationFinalizer(view.name, RELEASE_FINALIZER, view.finalizers))
    kept = "deleted" if spec and spec.deletion_policy == "Delete" else "retained"
    actions.append(
        PostEvent(ALLOCATION_KIND, view.name, view.uid, ConditionType.RELEASED, f"GPUs released; namespace {kept}")
    )
    return ReleasePlan(actions, done=True)


def tenant_outcome(
    namespace: str, plan: TenantPlan, decision: AdmissionDecision, apply_error: str | None
) -> ReconcileOutcome:
    """What carrying out `plan` achieved: all of it, or (`apply_error`) not all of it."""
    if apply_error is not None:
        return ReconcileOutcome(
            namespace=namespace,
            objects_applied=False,
            apply_error=apply_error,
            in_use_gpus=plan.in_use_gpus,
            held_gpus=plan.held_gpus,
        )
    return ReconcileOutcome(
        namespace=namespace,
        objects_applied=True,
        nodes=plan.nodes,
        node_shortfall=plan.node_shortfall,
        in_use_gpus=plan.in_use_gpus,
        held_gpus=plan.held_gpus,
        gpu_quota=decision.granted_gpus if quota_open(decision.phase) else 0,
        settling=plan.settling,
    )
