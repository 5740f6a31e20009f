"""One pool's reconcile pass: admission, tenant objects, exclusive nodes, expiry and status.

A single reconciler per pool is the only writer of its allocations' grants, so admission is
serialised per pool and concurrent applies can never overcommit. Every pass is level-triggered:
it starts from a snapshot of current state (kopf indexes) and corrects whatever differs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from gpuaas.api.allocation import (
    ALLOCATION_KIND,
    ALLOCATION_LABEL,
    ALLOCATION_PLURAL,
    GpuAllocationSpec,
    GpuAllocationStatus,
    is_reserved_namespace,
)
from gpuaas.api.pool import POOL_LABEL, POOL_PLURAL, GpuPoolSpec, GpuPoolStatus
from gpuaas.api.usage import GpuUsage, GpuUsageSpec, GpuUsageStatus, UsageTenant
from gpuaas.domain.capacity import AdmissionDecision, AllocationDemand, admit
from gpuaas.domain.drift import has_drifted
from gpuaas.domain.exclusive import choose_exclusive_nodes
from gpuaas.domain.ledger import GrantState
from gpuaas.domain.lifecycle import AllocationSample, ReconcileOutcome, allocation_status, is_idle, rejected_status
from gpuaas.domain.nodes import NodeInfo, taints_with, taints_without
from gpuaas.domain.pool import measure_capacity, pool_nodes, pool_status
from gpuaas.domain.tenant import (
    LIMIT_RANGE_NAME,
    OWNERS_BINDING_NAME,
    QUOTA_NAME,
    desired_namespace,
    desired_resource_quota,
    desired_tenant_objects,
    quota_open,
)
from gpuaas.k8s import objects
from gpuaas.k8s.ledger import LedgerPod, LedgerWriter
from gpuaas.k8s.resources import patch_cluster_status

logger = logging.getLogger(__name__)
RELEASE_FINALIZER = "gpuaas.io/release"
# An apply that the watch has not reflected yet is not repeated for this long.
APPLY_SETTLE = timedelta(seconds=5)


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


@dataclass(frozen=True)
class PodView:
    name: str
    namespace: str
    uid: str
    gpus: int
    running: bool
    ledger: LedgerPod


@dataclass
class PoolSnapshot:
    pool: str
    spec: Mapping[str, Any]
    generation: int | None
    status: Mapping[str, Any]
    nodes: list[NodeInfo]
    allocations: list[AllocationView]
    # (kind, namespace, name) -> observed object of the kinds gpuaas applies.
    observed: dict[tuple[str, str, str], Mapping[str, Any]]
    # namespace -> labels, for every namespace in the cluster.
    namespaces: dict[str, Mapping[str, str]]
    # namespace -> the allocations (of any pool) that target it, as (created, name).
    namespace_claims: dict[str, list[tuple[datetime, str]]]
    pods_by_namespace: dict[str, list[PodView]]
    # allocation uid -> its GpuUsage records by name.
    usage: dict[str, dict[str, GpuUsage]]
    # node name -> allocation holding it exclusively (any pool).
    exclusive_holders: dict[str, str]


def observed_key(manifest: Mapping[str, Any]) -> tuple[str, str, str]:
    metadata = manifest["metadata"]
    return (manifest["kind"], metadata.get("namespace") or "", metadata["name"])


def status_merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch from old to new status: keys that vanished are set to null."""
    patch: dict[str, Any] = dict(new)
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


@dataclass(frozen=True)
class _Job:
    view: AllocationView
    spec: GpuAllocationSpec
    demand: AllocationDemand
    grant: GrantState


@dataclass(frozen=True)
class _Cached:
    fingerprint: tuple[object, ...]
    recheck_at: datetime
    sample: AllocationSample


# Skipped allocations are still fully processed this often, so live usage counters keep moving.
METRICS_REFRESH = timedelta(seconds=15)


@dataclass(frozen=True)
class PassResult:
    pool: GpuPoolStatus
    samples: list[AllocationSample]
    processed: int = 0  # allocations that needed a full pass (not skipped as unchanged)


def grant_in_force(spec: GpuAllocationSpec, created: datetime, granted: int, phase: str) -> GrantState:
    """The grant that held since the previous pass: window bounds are exact, phase changes are per pass."""
    gpus = granted if phase in ("Active", "Scheduled") else 0
    return GrantState(gpus=gpus, active_from=max(spec.window.start, created), active_until=spec.window.end)


@dataclass
class PoolReconciler:
    pool: str
    ledger: LedgerWriter
    # uid -> GPUs this reconciler granted; authoritative while it runs (the index may lag its writes).
    granted: dict[str, int] = field(default_factory=dict)
    # uid -> the status this reconciler last wrote.
    written: dict[str, dict[str, Any]] = field(default_factory=dict)
    # (uid, object key) -> (desired manifest, when applied), to not repeat applies the watch has not shown yet.
    applied: dict[tuple[str, tuple[str, str, str]], tuple[dict[str, Any], datetime]] = field(default_factory=dict)
    pool_written: dict[str, Any] | None = None
    cache: dict[str, _Cached] = field(default_factory=dict)
    specs: dict[str, tuple[int | None, GpuAllocationSpec]] = field(default_factory=dict)
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=16))

    def run_pass(self, snap: PoolSnapshot, now: datetime) -> PassResult:
        pool_spec = GpuPoolSpec.model_validate(dict(snap.spec))
        capacity = measure_capacity(pool_spec, snap.nodes)
        members = pool_nodes(pool_spec, snap.nodes)
        self._keep_pool_taints(pool_spec, members)

        jobs: list[_Job] = []
        for view in snap.allocations:
            job = self._intake(view, snap, members, pool_spec, now)
            if job is not None:
                jobs.append(job)
        live_uids = {view.uid for view in snap.allocations}
        for uid in set(self.cache) - live_uids:
            self.cache.pop(uid, None)
        for uid in set(self.specs) - live_uids:
            self.specs.pop(uid, None)
        for uid in set(self.granted) - live_uids:
            self.granted.pop(uid, None)
            self.written.pop(uid, None)
            self.ledger.forget(uid)

        result = admit(capacity.program_gpus, [job.demand for job in jobs], now)
        for job in jobs:
            self.granted[job.view.uid] = result.decisions[job.view.name].granted_gpus
        samples: list[AllocationSample] = []
        changed: list[tuple[_Job, tuple[object, ...]]] = []
        for job in jobs:
            fingerprint = self._fingerprint(job, result.decisions[job.view.name], snap)
            cached = self.cache.get(job.view.uid)
            if cached is not None and cached.fingerprint == fingerprint and now < cached.recheck_at:
                samples.append(cached.sample)  # nothing it depends on changed, and nothing is due
            else:
                changed.append((job, fingerprint))
        samples.extend(
            self.executor.map(
                lambda item: self._process(
                    item[0], result.decisions[item[0].view.name], item[1], snap, members, pool_spec, now
                ),
                changed,
            )
        )

        written_pool = GpuPoolStatus.model_validate(self.pool_written or dict(snap.status))
        new_pool = pool_status(
            pool_spec,
            written_pool,
            capacity,
            snap.generation,
            now,
            granted_gpus=result.summary.granted_gpus,
            in_use_gpus=sum(sample.in_use_gpus for sample in samples),
            queued=result.summary.queued,
        )
        if new_pool != written_pool or self.pool_written is None:
            wire = new_pool.to_wire()
            patch_cluster_status(POOL_PLURAL, self.pool, status_merge_patch(self.pool_written or {}, wire))
            self.pool_written = wire
        return PassResult(pool=new_pool, samples=samples, processed=len(changed))

    def _intake(
        self, view: AllocationView, snap: PoolSnapshot, members: list[NodeInfo], pool_spec: GpuPoolSpec, now: datetime
    ) -> _Job | None:
        """Release deleted allocations, reject invalid ones, and turn the rest into admission demands."""
        if view.deleting:
            self._release(view, snap, members, pool_spec, now)
            return None
        if RELEASE_FINALIZER not in view.finalizers:
            objects.add_allocation_finalizer(view.name, RELEASE_FINALIZER, has_any=bool(view.finalizers))
        rejection = self._rejection(view, snap)
        if rejection is not None:
            self._write_rejected(view, *rejection, now)
            return None
        spec = self._parsed_spec(view)
        status = GpuAllocationStatus.model_validate(self.written.get(view.uid) or dict(view.status))
        granted = self.granted.get(view.uid, status.granted_gpus if status.admitted else 0)
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
        return _Job(view, spec, demand, grant_in_force(spec, view.created, granted, status.phase))

    def _process(
        self,
        job: _Job,
        decision: AdmissionDecision,
        fingerprint: tuple[object, ...],
        snap: PoolSnapshot,
        members: list[NodeInfo],
        pool_spec: GpuPoolSpec,
        now: datetime,
    ) -> AllocationSample:
        """Book the grant that held until now, then apply the new decision and report it."""
        view, spec = job.view, job.spec
        booked = self._book(view, spec, pool_spec, snap, job.grant, now)
        outcome = self._reconcile_tenant(view, spec, decision, snap, members, now)
        previous = GpuAllocationStatus.model_validate(self.written.get(view.uid) or dict(view.status))
        status = allocation_status(
            previous, decision, outcome, spec.exclusive_nodes, view.generation, now, spec.idle.after_duration
        )
        self._write_status(view, previous, status)
        idle = is_idle(status)
        if idle and not is_idle(previous):
            objects.post_event(ALLOCATION_KIND, view.name, view.uid, "Idle", status.conditions_message("Idle"))
        if idle and spec.idle.action == "Reclaim" and status.phase == "Active":
            # Suspension goes through spec, so resuming is the documented `spec.suspend: false`.
            objects.suspend_allocation(view.name)
            objects.post_event(
                ALLOCATION_KIND,
                view.name,
                view.uid,
                "Reclaimed",
                f"idle for {spec.idle.after}: GPUs returned to the pool",
            )
        records = {r.spec.month: r.status for r in snap.usage.get(view.uid, {}).values()}
        records.update(booked)
        sample = AllocationSample(
            allocation=view.name,
            tenant=spec.tenant.name,
            organization=spec.tenant.organization,
            pool=self.pool,
            gpu_model=pool_spec.gpu_model,
            provider=pool_spec.provider,
            phase=status.phase,
            granted_gpus=status.granted_gpus,
            in_use_gpus=status.in_use_gpus,
            used_gpu_seconds=sum(r.used_gpu_seconds for r in records.values()),
            granted_gpu_seconds=sum(r.granted_gpu_seconds for r in records.values()),
            idle=idle,
        )
        if outcome.objects_applied and not outcome.settling and not spec.exclusive_nodes:  # exclusive: node health
            pods = snap.pods_by_namespace.get(spec.target_namespace, [])
            self.cache[view.uid] = _Cached(fingerprint, self._recheck_at(view.uid, spec, status, pods, now), sample)
        return sample

    def _fingerprint(self, job: _Job, decision: AdmissionDecision, snap: PoolSnapshot) -> tuple[object, ...]:
        """Everything a full pass of one allocation reads, except the clock."""
        namespace = job.spec.target_namespace
        pods = tuple(
            sorted(
                (p.uid, p.running, p.ledger.finished, p.ledger.has_finalizer, p.ledger.interval)
                for p in snap.pods_by_namespace.get(namespace, [])
            )
        )
        versions = tuple(
            (snap.observed.get(key) or {}).get("metadata", {}).get("resourceVersion")
            for key in self._object_keys(job.view.name, job.spec)
        )
        return (job.view.resource_version, job.grant, decision, pods, versions)

    @staticmethod
    def _object_keys(name: str, spec: GpuAllocationSpec) -> list[tuple[str, str, str]]:
        namespace = spec.target_namespace
        return [
            ("Namespace", "", namespace),
            ("ResourceQuota", namespace, QUOTA_NAME),
            ("LimitRange", namespace, LIMIT_RANGE_NAME),
            ("RoleBinding", namespace, OWNERS_BINDING_NAME),
        ]

    def _recheck_at(
        self, uid: str, spec: GpuAllocationSpec, status: GpuAllocationStatus, pods: list[PodView], now: datetime
    ) -> datetime:
        """The next moment time alone changes something: window edges, the idle threshold, a due ledger
        flush, the kill deadline of a pod being deleted (booked and released once it passes), and a
        metrics refresh."""
        moments = [now + METRICS_REFRESH, self.ledger.next_due(uid, now)]
        for pod in pods:
            interval = pod.ledger.interval
            if interval is not None and interval.end is not None and interval.end > now:
                moments.append(interval.end)
        for edge in (
            spec.window.start,
            spec.window.end,
            spec.window.end + timedelta(seconds=spec.grace_period_seconds),
        ):
            if edge > now:
                moments.append(edge)
        if status.idle_since is not None:
            moments.append(max(now, status.idle_since + spec.idle.after_duration))
        return min(moments)

    # --- ledger ------------------------------------------------------------------------------

    def _book(
        self,
        view: AllocationView,
        spec: GpuAllocationSpec,
        pool_spec: GpuPoolSpec,
        snap: PoolSnapshot,
        grant: GrantState | None,
        now: datetime,
        force: bool = False,
    ) -> dict[str, GpuUsageStatus]:
        namespace = spec.target_namespace
        identity = GpuUsageSpec(
            allocation=view.name,
            allocation_uid=view.uid,
            tenant=UsageTenant.model_validate(spec.tenant.model_dump()),
            pool=self.pool,
            gpu_model=pool_spec.gpu_model,
            provider=pool_spec.provider,
            month="1970-01",
            time_zone=self.ledger.time_zone,
        )
        pods = [pod.ledger for pod in snap.pods_by_namespace.get(namespace, [])]
        return self.ledger.book(identity, namespace, snap.usage.get(view.uid, {}), pods, grant, now, force=force)

    # --- allocations -------------------------------------------------------------------------

    def _parsed_spec(self, view: AllocationView) -> GpuAllocationSpec:
        """Specs only change with the generation; parsing 600 of them every pass would be the pass's cost."""
        cached = self.specs.get(view.uid)
        if cached is None or cached[0] != view.generation:
            cached = (view.generation, GpuAllocationSpec.model_validate(dict(view.spec)))
            self.specs[view.uid] = cached
        return cached[1]

    def _rejection(self, view: AllocationView, snap: PoolSnapshot) -> tuple[str, str] | None:
        try:
            spec = self._parsed_spec(view)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            return "InvalidSpec", f"spec is invalid: {problems}"
        namespace = spec.target_namespace
        if is_reserved_namespace(namespace):
            return "ReservedNamespace", f"namespace {namespace} is a system namespace and cannot be granted"
        claims = sorted(snap.namespace_claims.get(namespace, []))
        if claims and claims[0][1] != view.name:
            return "NamespaceClaimed", f"namespace {namespace} already belongs to allocation {claims[0][1]}"
        labels = snap.namespaces.get(namespace)
        if labels is not None and labels.get(ALLOCATION_LABEL) != view.name:
            owner = labels.get(ALLOCATION_LABEL)
            if owner:
                return "NamespaceClaimed", f"namespace {namespace} is managed for allocation {owner}"
            return (
                "NamespaceExists",
                f"namespace {namespace} already exists and is not managed by gpuaas; "
                "choose another spec.namespace or delete that namespace first",
            )
        return None

    def _write_rejected(self, view: AllocationView, reason: str, message: str, now: datetime) -> None:
        previous = GpuAllocationStatus.model_validate(self.written.get(view.uid) or dict(view.status))
        self.granted[view.uid] = 0
        self._write_status(view, previous, rejected_status(previous, reason, message, view.generation, now))

    def _write_status(self, view: AllocationView, previous: GpuAllocationStatus, status: GpuAllocationStatus) -> None:
        wire = status.to_wire()
        old = self.written.get(view.uid) or dict(view.status)
        if wire == old:
            return
        patch_cluster_status(ALLOCATION_PLURAL, view.name, status_merge_patch(old, wire))
        self.written[view.uid] = wire
        if status.phase != previous.phase or (status.phase == "Queued" and previous.queue_position is None):
            warning = status.phase in {"Rejected"}
            objects.post_event(
                ALLOCATION_KIND,
                view.name,
                view.uid,
                status.phase,
                status.message or f"phase {status.phase}",
                "Warning" if warning else "Normal",
            )

    def _reconcile_tenant(
        self,
        view: AllocationView,
        spec: GpuAllocationSpec,
        decision: AdmissionDecision,
        snap: PoolSnapshot,
        members: list[NodeInfo],
        now: datetime,
    ) -> ReconcileOutcome:
        namespace = spec.target_namespace
        pods = snap.pods_by_namespace.get(namespace, [])
        in_use = sum(pod.gpus for pod in pods if pod.running)
        nodes: tuple[str, ...] = ()
        shortfall = 0
        try:
            if spec.exclusive_nodes:
                nodes, shortfall = self._keep_exclusive_nodes(view, spec, decision, snap, members)
            desired = desired_tenant_objects(view.name, spec, decision.phase)
            settling = False
            for manifest in desired:
                settling |= self._apply_if_drifted(view.uid, manifest, snap, now)
            if decision.phase == "Expired":
                self._stop_expired_pods(spec, pods, now)
        except ApiException as error:
            logger.warning("allocation %s: apply failed: %s %s", view.name, error.status, error.reason)
            return ReconcileOutcome(
                namespace=namespace,
                objects_applied=False,
                apply_error=f"{error.status} {error.reason}",
                in_use_gpus=in_use,
            )
        quota = decision.granted_gpus if quota_open(decision.phase) else 0
        return ReconcileOutcome(
            namespace=namespace,
            objects_applied=True,
            nodes=nodes,
            node_shortfall=shortfall,
            in_use_gpus=in_use,
            gpu_quota=quota,
            settling=settling,
        )

    def _apply_if_drifted(self, uid: str, manifest: dict[str, Any], snap: PoolSnapshot, now: datetime) -> bool:
        """Apply when the observed object differs; True when that was deferred because gpuaas applied
        it moments ago and the watch has not caught up yet."""
        key = observed_key(manifest)
        if not has_drifted(manifest, snap.observed.get(key)):
            return False
        recent = self.applied.get((uid, key))
        if recent is not None and recent[0] == manifest and now - recent[1] < APPLY_SETTLE:
            return True
        objects.apply(manifest)
        self.applied[(uid, key)] = (manifest, now)
        return True

    def _stop_expired_pods(self, spec: GpuAllocationSpec, pods: list[PodView], now: datetime) -> None:
        """GPU pods get the grace period after window.end, then are deleted; the namespace and PVCs stay."""
        if now < spec.window.end + timedelta(seconds=spec.grace_period_seconds):
            return
        for pod in pods:
            if pod.running and pod.gpus > 0:
                logger.info("window ended: stopping GPU pod %s/%s", pod.namespace, pod.name)
                objects.delete_pod(pod.name, pod.namespace)

    def _release(
        self, view: AllocationView, snap: PoolSnapshot, members: list[NodeInfo], pool_spec: GpuPoolSpec, now: datetime
    ) -> None:
        """Deletion: GPU pods stop and are booked, GPUs go to 0, owners lose access, the namespace stays
        (Retain) or goes (Delete). The finalizer goes last, so no usage of the allocation is lost."""
        if RELEASE_FINALIZER not in view.finalizers:
            return
        try:
            spec = GpuAllocationSpec.model_validate(dict(view.spec))
        except ValidationError:
            spec = None
        ours = False
        if spec is not None:
            namespace = spec.target_namespace
            ours = (snap.namespaces.get(namespace) or {}).get(ALLOCATION_LABEL) == view.name
            status = GpuAllocationStatus.model_validate(self.written.get(view.uid) or dict(view.status))
            granted = self.granted.get(view.uid, status.granted_gpus if status.admitted else 0)
            grant = grant_in_force(spec, view.created, granted, status.phase)
            self._book(view, spec, pool_spec, snap, grant, now, force=True)
            pods = snap.pods_by_namespace.get(namespace, []) if ours else []
            for pod in pods:
                if pod.gpus > 0 and not pod.ledger.finished:
                    objects.delete_pod(pod.name, pod.namespace)
            if any(pod.ledger.has_finalizer for pod in pods):
                return  # booked and released by the next passes; then the allocation goes
        self.granted.pop(view.uid, None)
        if spec is not None and ours:
            if spec.deletion_policy == "Delete":
                objects.delete_namespace(namespace)
            else:
                objects.apply(desired_namespace(view.name, spec, released=True))
                objects.apply(desired_resource_quota(view.name, spec, is_open=False))
                objects.delete_role_binding(OWNERS_BINDING_NAME, namespace)
        for node in members:
            if node.labels.get(ALLOCATION_LABEL) == view.name:
                self._unlabel_exclusive(node)
        objects.remove_allocation_finalizer(view.name, RELEASE_FINALIZER, list(view.finalizers))
        objects.post_event(
            ALLOCATION_KIND,
            view.name,
            view.uid,
            "Released",
            f"GPUs released; namespace {'deleted' if spec and spec.deletion_policy == 'Delete' else 'retained'}",
        )
        self.written.pop(view.uid, None)

    # --- nodes -------------------------------------------------------------------------------

    def _keep_pool_taints(self, spec: GpuPoolSpec, members: list[NodeInfo]) -> None:
        patches = []
        for node in members:
            taints = taints_with(node, POOL_LABEL, self.pool) if spec.taint else taints_without(node, POOL_LABEL)
            if taints is not None:
                patches.append((node.name, {"spec": {"taints": taints}}))
        if patches:  # a new pool of 510 nodes is tainted in parallel, not one node after another
            list(self.executor.map(lambda patch: objects.patch_node(*patch), patches))

    def _keep_exclusive_nodes(
        self,
        view: AllocationView,
        spec: GpuAllocationSpec,
        decision: AdmissionDecision,
        snap: PoolSnapshot,
        members: list[NodeInfo],
    ) -> tuple[tuple[str, ...], int]:
        pool_spec = GpuPoolSpec.model_validate(dict(snap.spec))
        held = [node.name for node in members if node.labels.get(ALLOCATION_LABEL) == view.name]
        if decision.phase != "Active":
            for node in members:
                if node.name in held:
                    self._unlabel_exclusive(node)
            return (), 0
        others = [name for name, holder in snap.exclusive_holders.items() if holder != view.name]
        busy: dict[str, int] = {}
        choice = choose_exclusive_nodes(members, decision.granted_gpus, pool_spec.gpus_per_node, held, others, busy)
        by_name = {node.name: node for node in members}
        for name in choice.released:
            if name in by_name:
                self._unlabel_exclusive(by_name[name])
        for name in choice.nodes:
            node = by_name[name]
            taints = taints_with(node, ALLOCATION_LABEL, view.name)
            patch: dict[str, Any] = {}
            if node.labels.get(ALLOCATION_LABEL) != view.name:
                patch["metadata"] = {"labels": {ALLOCATION_LABEL: view.name}}
            if taints is not None:
                patch["spec"] = {"taints": taints}
            if patch:
                objects.patch_node(name, patch)
        return choice.nodes, choice.shortfall

    def _unlabel_exclusive(self, node: NodeInfo) -> None:
        patch: dict[str, Any] = {"metadata": {"labels": {ALLOCATION_LABEL: None}}}
        taints = taints_without(node, ALLOCATION_LABEL)
        if taints is not None:
            patch["spec"] = {"taints": taints}
        objects.patch_node(node.name, patch)
