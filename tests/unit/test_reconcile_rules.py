"""Pure rules used by the reconciler: drift, guards, idle, node taints, the demo program."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from gpuaas.api.allocation import GpuAllocationStatus
from gpuaas.domain.capacity import AdmissionDecision
from gpuaas.domain.drift import has_drifted, parse_quantity
from gpuaas.domain.guard import (
    Requester,
    exposure_problems,
    managed_change_problem,
    pod_change_problems,
    unfenced_pod_problems,
)
from gpuaas.domain.lifecycle import ReconcileOutcome, allocation_status, is_idle
from gpuaas.domain.nodes import NodeInfo, taints_with, taints_without
from gpuaas.domain.scenarios import SCENARIOS, demo_grants

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
OPERATOR = "system:serviceaccount:gpuaas-system:gpuaas"


@pytest.mark.parametrize(
    ("text", "value"),
    [("2Ti", Decimal(2) * 2**40), ("2048Gi", Decimal(2048) * 2**30), ("1500m", Decimal("1.5")), ("384", Decimal(384))],
)
def test_parse_quantity(text: str, value: Decimal) -> None:
    assert parse_quantity(text) == value


def test_canonicalised_quantities_are_not_drift() -> None:
    desired = {"kind": "ResourceQuota", "spec": {"hard": {"requests.memory": "2048Gi", "requests.cpu": "1500m"}}}
    observed = {"kind": "ResourceQuota", "spec": {"hard": {"requests.memory": "2Ti", "requests.cpu": "1.5"}}, "x": 1}
    assert not has_drifted(desired, observed)
    observed["spec"]["hard"]["requests.memory"] = "1Ti"  # type: ignore[index]
    assert has_drifted(desired, observed)
    assert has_drifted(desired, None)


def test_extra_labels_are_not_drift_but_missing_ones_are() -> None:
    desired = {"metadata": {"labels": {"gpuaas.io/managed": "true"}}}
    assert not has_drifted(desired, {"metadata": {"labels": {"gpuaas.io/managed": "true", "team": "x"}}})
    assert has_drifted(desired, {"metadata": {"labels": {"team": "x"}}})


def namespace(labels: dict[str, str]) -> dict[str, object]:
    return {"metadata": {"name": "lab", "labels": labels}}


def test_tenant_cannot_touch_managed_namespace_labels_or_delete_it() -> None:
    old = namespace({"gpuaas.io/managed": "true", "team": "a"})
    tenant = Requester("alice", ("system:authenticated",))
    assert managed_change_problem("Namespace", "UPDATE", old, namespace({"team": "a"}), tenant, OPERATOR)
    assert managed_change_problem("Namespace", "DELETE", old, None, tenant, OPERATOR)
    changed_other = namespace({"gpuaas.io/managed": "true", "team": "b"})
    assert managed_change_problem("Namespace", "UPDATE", old, changed_other, tenant, OPERATOR) is None


def test_operator_admins_and_control_plane_pass_the_guard() -> None:
    quota = {"metadata": {"labels": {"gpuaas.io/allocation": "lab"}}}
    for who in (
        Requester(OPERATOR),
        Requester("root", ("system:masters",)),
        Requester("system:serviceaccount:kube-system:namespace-controller"),
    ):
        assert managed_change_problem("ResourceQuota", "DELETE", quota, None, who, OPERATOR) is None
    assert managed_change_problem("ResourceQuota", "DELETE", quota, None, Requester("alice"), OPERATOR)
    # The tenant's own objects are not gpuaas's business.
    assert managed_change_problem("RoleBinding", "DELETE", {"metadata": {}}, None, Requester("alice"), OPERATOR) is None


def test_only_gpuaas_removes_the_usage_finalizer() -> None:
    booked = {"metadata": {"finalizers": ["gpuaas.io/usage-ledger"]}}
    other = {"metadata": {"finalizers": ["example.com/keep"]}}
    tenant = Requester("alice", ("system:authenticated",))
    assert pod_change_problems(booked, {"metadata": {}}, tenant, OPERATOR)
    assert pod_change_problems(booked, other, tenant, OPERATOR)
    assert pod_change_problems(booked, {"metadata": {}}, Requester(OPERATOR), OPERATOR) == []
    assert pod_change_problems(booked, {"metadata": {}}, Requester("root", ("system:masters",)), OPERATOR) == []
    # Adding or keeping it, and any other finalizer change, is the tenant's own business.
    more = {"metadata": {"finalizers": ["gpuaas.io/usage-ledger", "x/y"]}}
    assert pod_change_problems(booked, more, tenant, OPERATOR) == []
    assert pod_change_problems(other, {"metadata": {}}, tenant, OPERATOR) == []
    assert pod_change_problems(None, {"metadata": {}}, tenant, OPERATOR) == []


def test_released_namespace_pods_get_no_gpus_and_no_pool() -> None:
    pools = {"test-b200": {"gpuaas.io/pool": "test-b200"}}
    gpu = {"spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}
    assert any("released" in p for p in unfenced_pod_problems(gpu, pools))
    sneaky = {"spec": {"containers": [{"name": "c"}], "tolerations": [{"key": "gpuaas.io/pool", "operator": "Exists"}]}}
    assert unfenced_pod_problems(sneaky, pools)
    assert unfenced_pod_problems({"spec": {"containers": [{"name": "c"}]}}, pools) == []


def decision(phase: str = "Active") -> AdmissionDecision:
    return AdmissionDecision("lab", "uid", phase != "Queued", phase, 8, None, "ok")  # type: ignore[arg-type]


def outcome(in_use: int) -> ReconcileOutcome:
    return ReconcileOutcome(namespace="lab", objects_applied=True, in_use_gpus=in_use, gpu_quota=8)


def test_idle_counts_from_the_last_moment_nothing_ran() -> None:
    after = timedelta(hours=1)
    first = allocation_status(GpuAllocationStatus(), decision(), outcome(0), False, 1, NOW, after)
    assert first.idle_since == NOW
    assert not is_idle(first)
    later = allocation_status(first, decision(), outcome(0), False, 1, NOW + after, after)
    assert later.idle_since == NOW
    assert is_idle(later)
    busy = allocation_status(later, decision(), outcome(8), False, 1, NOW + 2 * after, after)
    assert busy.idle_since is None
    assert not is_idle(busy)
    queued = allocation_status(GpuAllocationStatus(), decision("Queued"), outcome(0), False, 1, NOW, after)
    assert queued.idle_since is None


def test_the_idle_condition_says_what_is_true_in_every_phase() -> None:
    after = timedelta(hours=1)

    def idle(status: GpuAllocationStatus) -> tuple[str, str, str]:
        condition = next(c for c in status.conditions if c.type == "Idle")
        return condition.status, condition.reason, condition.message

    queued = allocation_status(GpuAllocationStatus(), decision("Queued"), outcome(0), False, 1, NOW, after)
    assert idle(queued) == ("False", "NotActive", "idle time runs only while Active (phase Queued)")
    busy = allocation_status(GpuAllocationStatus(), decision(), outcome(8), False, 1, NOW, after)
    assert idle(busy) == ("False", "InUse", "8 GPUs held by pods")
    quiet = allocation_status(GpuAllocationStatus(), decision(), outcome(0), False, 1, NOW, after)
    waiting = ("False", "NoGPUsInUse", f"no GPU in use since {NOW.isoformat()} (idle.after 1:00:00)")
    assert idle(quiet) == waiting
    later = allocation_status(quiet, decision(), outcome(0), False, 1, NOW + after, after)
    assert idle(later) == ("True", *waiting[1:])


def test_ready_needs_active_applied_and_fenced() -> None:
    status = allocation_status(GpuAllocationStatus(), decision(), outcome(0), False, 3, NOW)
    assert {c.type: c.status for c in status.conditions}["Ready"] == "True"
    failed = ReconcileOutcome(namespace="lab", objects_applied=False, apply_error="500 boom")
    status = allocation_status(GpuAllocationStatus(), decision(), failed, False, 3, NOW)
    conditions = {c.type: c for c in status.conditions}
    assert conditions["Ready"].status == "False"
    assert conditions["QuotaApplied"].message == "500 boom"


def test_taint_helpers_only_write_when_needed() -> None:
    node = NodeInfo("n", taints=(("gpuaas.io/pool", "a", "NoSchedule"), ("x", "", "NoExecute")))
    assert taints_with(node, "gpuaas.io/pool", "a") is None
    moved = taints_with(node, "gpuaas.io/pool", "b")
    assert moved == [{"key": "x", "value": "", "effect": "NoExecute"}, {"key": "gpuaas.io/pool", "value": "b",
                                                                           "effect": "NoSchedule"}]  # fmt: skip
    assert taints_without(node, "absent") is None
    assert taints_without(node, "x") == [{"key": "gpuaas.io/pool", "value": "a", "effect": "NoSchedule"}]


def test_demo_program_oversubscribes_only_the_small_h200_pool() -> None:
    grants = demo_grants()
    capacity = {pool.name: pool.gpus for pool in SCENARIOS["program"].pools}
    demand: dict[str, int] = {}
    for grant in grants:
        demand[grant.pool] = demand.get(grant.pool, 0) + grant.gpus
        assert grant.gpus % 8 == 0 or not grant.exclusive
    assert len([g for g in grants if g.exclusive]) == 5
    assert demand["naver-h200-b"] > capacity["naver-h200-b"]
    assert all(demand[p] <= capacity[p] for p in capacity if p != "naver-h200-b")
    assert demo_grants() == grants  # deterministic


def test_tenants_open_no_path_outside_their_namespace() -> None:
    tenant = Requester("alice", ("system:authenticated",))
    cluster_ip = {"spec": {"type": "ClusterIP", "selector": {"app": "x"}}}
    assert exposure_problems("Service", cluster_ip, tenant, OPERATOR) == []
    bad = {"spec": {"type": "LoadBalancer", "externalIPs": ["203.0.113.10"], "loadBalancerIP": "203.0.113.11"}}
    assert len(exposure_problems("Service", bad, tenant, OPERATOR)) == 3
    assert exposure_problems("EndpointSlice", {}, tenant, OPERATOR)
    assert exposure_problems("Endpoints", {}, tenant, OPERATOR)
    controller = Requester("system:serviceaccount:kube-system:endpointslice-controller")
    assert exposure_problems("EndpointSlice", {}, controller, OPERATOR) == []
    assert exposure_problems("Service", bad, Requester(OPERATOR), OPERATOR) == []
