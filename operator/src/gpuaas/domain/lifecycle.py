"""An allocation's status from its admission decision and what was applied for it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from gpuaas.api.allocation import GpuAllocationStatus, Phase
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
    return any(c.type == "Idle" and c.status == "True" for c in status.conditions)


def _condition(kind: str, ok: bool, reason: str, message: str, now: datetime, generation: int | None) -> Condition:
    return Condition(
        type=kind,
        status="True" if ok else "False",
        reason=reason,
        message=message,
        last_transition_time=now,
        observed_generation=generation,
    )


def allocation_status(
    previous: GpuAllocationStatus,
    decision: AdmissionDecision,
    outcome: ReconcileOutcome,
    exclusive: bool,
    generation: int | None,
    now: datetime,
    idle_after: timedelta = timedelta(hours=72),
) -> GpuAllocationStatus:
    phase: Phase = decision.phase
    conditions = list(previous.conditions)
    admitted_reason = {"Active": "Admitted", "Scheduled": "Scheduled"}.get(phase, phase)
    conditions = set_condition(
        conditions, _condition("Admitted", decision.admitted, admitted_reason, decision.message, now, generation)
    )
    if outcome.objects_applied:
        quota = _condition(
            "QuotaApplied",
            True,
            "QuotaApplied",
            f"GPU quota {outcome.gpu_quota} in {outcome.namespace}",
            now,
            generation,
        )
    else:
        quota = _condition("QuotaApplied", False, "ApplyFailed", outcome.apply_error, now, generation)
    conditions = set_condition(conditions, quota)
    fenced_ok = outcome.objects_applied and (not exclusive or phase != "Active" or outcome.node_shortfall == 0)
    if not outcome.objects_applied:
        fenced = _condition("Fenced", False, "ApplyFailed", "the namespace is not labelled yet", now, generation)
    elif not fenced_ok:
        fenced = _condition(
            "Fenced", False, "NodesShort", f"{outcome.node_shortfall} exclusive nodes missing", now, generation
        )
    else:
        where = f"nodes {', '.join(outcome.nodes)}" if exclusive and outcome.nodes else "its pool"
        fenced = _condition(
            "Fenced", True, "Fenced", f"pods in {outcome.namespace} are pinned to {where}", now, generation
        )
    conditions = set_condition(conditions, fenced)
    idle_since = _idle_since(previous, phase, outcome.in_use_gpus, now)
    idle = idle_since is not None and now - idle_since >= idle_after
    idle_message = (
        f"no GPU in use since {idle_since.isoformat()} (idle.after {idle_after})"
        if idle and idle_since
        else "GPUs in use"
    )
    conditions = set_condition(
        conditions, _condition("Idle", idle, "NoGPUsInUse" if idle else "InUse", idle_message, now, generation)
    )
    ready_ok = phase == "Active" and outcome.objects_applied and fenced_ok
    ready_reason = "Ready" if ready_ok else (phase if phase != "Active" else "NotFenced")
    ready_message = (
        f"{decision.granted_gpus} GPUs usable in namespace {outcome.namespace}" if ready_ok else decision.message
    )
    conditions = set_condition(conditions, _condition("Ready", ready_ok, ready_reason, ready_message, now, generation))
    return GpuAllocationStatus(
        phase=phase,
        namespace=outcome.namespace,
        granted_gpus=decision.granted_gpus,
        in_use_gpus=outcome.in_use_gpus,
        queue_position=decision.queue_position,
        idle_since=idle_since,
        nodes=list(outcome.nodes),
        conditions=conditions,
        observed_generation=generation,
        message=decision.message,
    )


def rejected_status(
    previous: GpuAllocationStatus, reason: str, message: str, generation: int | None, now: datetime
) -> GpuAllocationStatus:
    conditions = set_condition(
        list(previous.conditions), _condition("Admitted", False, reason, message, now, generation)
    )
    conditions = set_condition(conditions, _condition("Ready", False, reason, message, now, generation))
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
