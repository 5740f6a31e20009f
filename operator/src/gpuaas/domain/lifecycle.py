"""An allocation's status from its admission decision and what was applied for it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from gpuaas.api.allocation import ConditionReason, ConditionType, GpuAllocationStatus, Phase
from gpuaas.api.common import Condition, set_condition
from gpuaas.domain.capacity import AdmissionDecision


@dataclass(frozen=True)
class ReconcileOutcome:
    """What the reconciler achieved for one allocation in one pass."""

    namespace: str
    objects_applied: bool
    apply_error: str = ""
    nodes: tuple[str, ...] = ()
    node_shortfall: int = 0
    in_use_gpus: int = 0
    # GPUs that pods hold in quota, Pending and scheduling-gated ones included: they keep the grant from going idle.
    held_gpus: int = 0
    gpu_quota: int = 0
    # An object was applied moments ago and the watch has not shown it yet: look again next pass.
    settling: bool = False


def _idle_since(previous: GpuAllocationStatus, phase: Phase, in_use_gpus: int, now: datetime) -> datetime | None:
    """Idle time only runs while Active with nothing in use; it survives restarts in status.idleSince."""
    if phase != "Active" or in_use_gpus > 0:
        return None
    if previous.phase == "Active" and previous.idle_since is not None:
        return previous.idle_since
    return now


def is_idle(status: GpuAllocationStatus) -> bool:
    return any(c.type == ConditionType.IDLE and c.status == "True" for c in status.conditions)


def _condition(kind: str, ok: bool, reason: str, message: str, now: datetime, generation: int | None) -> Condition:
    return Condition(
        type=kind,
        status="True" if ok else "False",
        reason=reason,
        message=message,
        last_transition_time=now,
        observed_generation=generation,
    )


def _idle_condition(
    phase: Phase,
    held: int,
    idle_since: datetime | None,
    idle: bool,
    idle_after: timedelta,
    now: datetime,
    generation: int | None,
) -> Condition:
    """Idle time runs only while Active with no GPU held by a pod; the message says which of those holds."""
    if phase != "Active":
        reason, message = ConditionReason.NOT_ACTIVE, f"idle time runs only while Active (phase {phase})"
    elif held > 0:
        reason, message = ConditionReason.IN_USE, f"{held} GPUs held by pods"
    else:
        since = idle_since.isoformat() if idle_since else now.isoformat()
        reason, message = ConditionReason.NO_GPUS_IN_USE, f"no GPU in use since {since} (idle.after {idle_after})"
    return _condition(ConditionType.IDLE, idle, reason, message, now, generation)


def allocation_status(
    previous: GpuAllocationStatus,
    decision: AdmissionDecision,
    outcome: ReconcileOutcome,
    exclusive: bool,
    generation: int | None,
    now: datetime,
    idle_after: timedelta = timedelta(hours=72),
    down_gpus: int = 0,
) -> GpuAllocationStatus:
    phase: Phase = decision.phase
    conditions = list(previous.conditions)
    admitted_reason = {"Active": ConditionReason.ADMITTED, "Scheduled": "Scheduled"}.get(phase, phase)
    conditions = set_condition(
        conditions,
        _condition(ConditionType.ADMITTED, decision.admitted, admitted_reason, decision.message, now, generation),
    )
    if outcome.objects_applied:
        quota = _condition(
            ConditionType.QUOTA_APPLIED,
            True,
            ConditionReason.QUOTA_APPLIED,
            f"GPU quota {outcome.gpu_quota} in {outcome.namespace}",
            now,
            generation,
        )
    else:
        quota = _condition(
            ConditionType.QUOTA_APPLIED, False, ConditionReason.APPLY_FAILED, outcome.apply_error, now, generation
        )
    conditions = set_condition(conditions, quota)
    fenced_ok = outcome.objects_applied and (not exclusive or phase != "Active" or outcome.node_shortfall == 0)
    if not outcome.objects_applied:
        fenced = _condition(
            ConditionType.FENCED,
            False,
            ConditionReason.APPLY_FAILED,
            "the namespace is not labelled yet",
            now,
            generation,
        )
    elif not fenced_ok:
        fenced = _condition(
            ConditionType.FENCED,
            False,
            ConditionReason.NODES_SHORT,
            f"{outcome.node_shortfall} exclusive nodes missing",
            now,
            generation,
        )
    else:
        where = f"nodes {', '.join(outcome.nodes)}" if exclusive and outcome.nodes else "its pool"
        fenced = _condition(
            ConditionType.FENCED,
            True,
            ConditionReason.FENCED,
            f"pods in {outcome.namespace} are pinned to {where}",
            now,
            generation,
        )
    conditions = set_condition(conditions, fenced)
    held = max(outcome.in_use_gpus, outcome.held_gpus)
    idle_since = _idle_since(previous, phase, held, now)
    idle = idle_since is not None and now - idle_since >= idle_after
    conditions = set_condition(conditions, _idle_condition(phase, held, idle_since, idle, idle_after, now, generation))
    ready_ok = phase == "Active" and outcome.objects_applied and fenced_ok
    ready_reason = ConditionReason.READY if ready_ok else (phase if phase != "Active" else ConditionReason.NOT_FENCED)
    ready_message = (
        f"{decision.granted_gpus} GPUs usable in namespace {outcome.namespace}" if ready_ok else decision.message
    )
    conditions = set_condition(
        conditions, _condition(ConditionType.READY, ready_ok, ready_reason, ready_message, now, generation)
    )
    conditions = set_condition(conditions, _degraded_condition(down_gpus, decision.granted_gpus, now, generation))
    return GpuAllocationStatus(
        phase=phase,
        namespace=outcome.namespace,
        granted_gpus=decision.granted_gpus,
        in_use_gpus=outcome.in_use_gpus,
        down_gpus=down_gpus,
        queue_position=decision.queue_position,
        idle_since=idle_since,
        nodes=list(outcome.nodes),
        conditions=conditions,
        observed_generation=generation,
        message=decision.message,
    )


def _degraded_condition(down_gpus: int, granted_gpus: int, now: datetime, generation: int | None) -> Condition:
    """True while granted GPUs are on hardware that is down; its lastTransitionTime is when the credit began."""
    if down_gpus > 0:
        message = (
            f"{down_gpus} of {granted_gpus} granted GPUs are on hardware that is down; "
            "the ledger credits them as downtime"
        )
        return _condition(ConditionType.DEGRADED, True, ConditionReason.GPUS_DOWN, message, now, generation)
    return _condition(
        ConditionType.DEGRADED, False, ConditionReason.GPUS_HEALTHY, "no granted GPU is down", now, generation
    )


def rejected_status(
    previous: GpuAllocationStatus, reason: str, message: str, generation: int | None, now: datetime
) -> GpuAllocationStatus:
    conditions = set_condition(
        list(previous.conditions), _condition(ConditionType.ADMITTED, False, reason, message, now, generation)
    )
    conditions = set_condition(conditions, _condition(ConditionType.READY, False, reason, message, now, generation))
    return GpuAllocationStatus(phase="Rejected", conditions=conditions, observed_generation=generation, message=message)


@dataclass(frozen=True)
class AllocationSample:
    """One allocation's numbers for the metrics exporter, taken at the end of a reconcile pass."""

    allocation: str
    tenant: str
    organization: str
    pool: str
    gpu_model: str
    provider: str
    phase: str
    granted_gpus: int
    in_use_gpus: int
    used_gpu_seconds: int
    granted_gpu_seconds: int
    idle: bool


def waiting_for_namespace_status(
    previous: GpuAllocationStatus, waiting: str, now: datetime, generation: int | None
) -> GpuAllocationStatus:
    """A deleted allocation (deletionPolicy Delete) whose namespace has not gone yet: Terminating, and why."""
    released = Condition(
        type=ConditionType.RELEASED,
        status="False",
        reason=ConditionReason.NAMESPACE_TERMINATING,
        message=waiting,
        last_transition_time=now,
        observed_generation=generation,
    )
    return previous.model_copy(
        update={
            "phase": "Terminating",
            "message": f"GPUs released; waiting for the namespace to go: {waiting}",
            "conditions": set_condition(list(previous.conditions), released),
        }
    )
