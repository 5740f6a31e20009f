"""The pool pass's rules, tested on the actions the planner returns."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from gpuaas.api.allocation import ALLOCATION_LABEL, GpuAllocationSpec, GpuAllocationStatus
from gpuaas.api.pool import POOL_LABEL, GpuPoolSpec
from gpuaas.domain import planner
from gpuaas.domain.actions import (
    ApplyObject,
    DeleteNamespace,
    DeletePod,
    DeleteRoleBinding,
    PatchNode,
    PatchStatus,
    PostEvent,
    RemoveAllocationFinalizer,
    SuspendAllocation,
)
from gpuaas.domain.capacity import AdmissionDecision
from gpuaas.domain.lifecycle import ReconcileOutcome, allocation_status
from gpuaas.domain.namespaces import NamespaceClaim, TerminatingNamespace
from gpuaas.domain.reclaim import HeldPod
from gpuaas.domain.snapshot import AllocationView, ObjectKey, observed_key
from tests.builders import NOW, POOL, SnapshotBuilder, allocation, gpu_node, gpu_pod, pool_spec

POOL_SPEC = GpuPoolSpec.model_validate(pool_spec())

NO_STATUS = GpuAllocationStatus()


def decided(view: AllocationView, phase: str = "Active", granted: int = 8) -> AdmissionDecision:
    admitted = phase in ("Active", "Scheduled")
    return AdmissionDecision(view.name, view.uid, admitted, phase, granted, None, f"{phase} now")  # type: ignore[arg-type]


def spec_of(view: AllocationView) -> GpuAllocationSpec:
    return GpuAllocationSpec.model_validate(dict(view.spec))


def kinds(actions: list[object]) -> list[str]:
    return [type(action).__name__ for action in actions]


# --- nodes -----------------------------------------------------------------------------------------


def test_pool_nodes_are_tainted_once_and_untainted_when_the_pool_says_so() -> None:
    bare = gpu_node("n1")
    tainted = replace(gpu_node("n2"), taints=((POOL_LABEL, POOL, "NoSchedule"),))
    spec = GpuPoolSpec.model_validate(pool_spec(taint=True))
    actions = planner.pool_taint_actions(POOL, spec, [bare, tainted])
    assert [a.name for a in actions] == ["n1"]
    assert actions[0].patch == {"spec": {"taints": [{"key": POOL_LABEL, "value": POOL, "effect": "NoSchedule"}]}}
    untaint = planner.pool_taint_actions(POOL, GpuPoolSpec.model_validate(pool_spec(taint=False)), [bare, tainted])
    assert [(a.name, a.patch) for a in untaint] == [("n2", {"spec": {"taints": []}})]


def test_a_rewritten_taint_list_keeps_other_taints_and_is_sent_with_the_version_it_was_read_at() -> None:
    not_ready = ("node.kubernetes.io/not-ready", "", "NoExecute")
    node = replace(gpu_node("n1"), taints=(not_ready,), resource_version="4711")
    spec = GpuPoolSpec.model_validate(pool_spec(taint=True))
    [action] = planner.pool_taint_actions(POOL, spec, [node])
    assert action.patch == {
        "metadata": {"resourceVersion": "4711"},
        "spec": {
            "taints": [
                {"key": "node.kubernetes.io/not-ready", "value": "", "effect": "NoExecute"},
                {"key": POOL_LABEL, "value": POOL, "effect": "NoSchedule"},
            ]
        },
    }
    # A label alone merges key by key: no version, so no conflict with a heartbeat.
    labelled = replace(node, taints=(not_ready, (ALLOCATION_LABEL, "excl", "NoSchedule")))
    plan = planner.exclusive_node_plan(
        "excl", decided(allocation("excl", 8, exclusiveNodes=True), granted=8), [labelled], {}, 8
    )
    assert [a.patch for a in plan.actions] == [{"metadata": {"labels": {ALLOCATION_LABEL: "excl"}}}]


def test_an_active_exclusive_grant_labels_whole_nodes_and_a_suspended_one_gives_them_back() -> None:
    view = allocation("excl", 16, exclusiveNodes=True)
    members = [gpu_node(f"n{i}") for i in range(4)]
    plan = planner.exclusive_node_plan("excl", decided(view, granted=16), members, {"n0": "other"}, 8)
    assert plan.nodes == ("n1", "n2")
    assert plan.shortfall == 0
    assert [a.patch["metadata"]["labels"] for a in plan.actions] == [{ALLOCATION_LABEL: "excl"}] * 2
    held = [gpu_node(f"n{i}", labels={ALLOCATION_LABEL: "excl"}) for i in (1, 2)]
    back = planner.exclusive_node_plan("excl", decided(view, "Suspended", 0), held, {}, 8)
    assert back.nodes == ()
    assert [a.patch["metadata"]["labels"] for a in back.actions] == [{ALLOCATION_LABEL: None}] * 2


# --- intake and admission ------------------------------------------------------------------------


def test_intake_rejects_an_invalid_spec_and_a_system_namespace_with_a_message_a_person_can_act_on() -> None:
    broken = allocation("broken", gpus=-1)
    snap = SnapshotBuilder().with_allocation(broken).build()
    with pytest.raises(ValidationError) as error:
        GpuAllocationSpec.model_validate(dict(broken.spec))
    rejection = planner.intake(broken, error.value, snap, NO_STATUS, None)
    assert isinstance(rejection, planner.Rejection)
    assert rejection.reason == "InvalidSpec"
    assert rejection.message.startswith("spec is invalid: gpus:")

    late = allocation("late", namespace="shared", created=NOW - timedelta(hours=1))
    first = allocation("first", namespace="shared")
    snap = SnapshotBuilder().with_allocation(first).with_allocation(late).build()
    snap.namespace_claims["shared"] = [
        NamespaceClaim(view.created.isoformat(), view.name, POOL) for view in (first, late)
    ]
    found = planner.intake(late, spec_of(late), snap, NO_STATUS, None)
    assert found == planner.Rejection("NamespaceClaimed", "namespace shared already belongs to allocation first")
    assert isinstance(planner.intake(first, spec_of(first), snap, NO_STATUS, None), planner.Candidate)


def test_intake_books_what_was_granted_before_this_pass_and_trusts_its_own_memory_over_the_index() -> None:
    view = allocation("a", 16)
    snap = SnapshotBuilder().with_allocation(view).build()
    status = GpuAllocationStatus.model_validate(
        {
            "phase": "Active",
            "grantedGPUs": 8,
            "conditions": [
                {
                    "type": "Admitted",
                    "status": "True",
                    "reason": "Admitted",
                    "message": "",
                    "lastTransitionTime": NOW.isoformat(),
                }
            ],
        }
    )
    from_index = planner.intake(view, spec_of(view), snap, status, None)
    remembered = planner.intake(view, spec_of(view), snap, status, 16)
    assert isinstance(from_index, planner.Candidate)
    assert isinstance(remembered, planner.Candidate)
    assert (from_index.grant.gpus, remembered.grant.gpus) == (8, 16)
    assert remembered.demand.gpus == 16


@given(
    capacity=st.integers(0, 64),
    asks=st.lists(st.integers(1, 32), min_size=1, max_size=6),
    stopping=st.integers(0, 16),
)
def test_admission_never_grants_more_than_capacity_less_the_gpus_stopping_pods_still_hold(
    capacity: int, asks: list[int], stopping: int
) -> None:
    views = [allocation(f"a{i}", gpus) for i, gpus in enumerate(asks)]
    candidates = []
    for view in views:
        found = planner.intake(view, spec_of(view), SnapshotBuilder().with_allocation(view).build(), NO_STATUS, None)
        assert isinstance(found, planner.Candidate)
        candidates.append(found)
    # One allocation, granted nothing now, still has a pod stopping with `stopping` GPUs.
    held = {"gone": [HeldPod("p", stopping, "", True, NOW - timedelta(hours=1), NOW + timedelta(seconds=30))]}
    admission = planner.admit_pool(capacity, candidates, held, NOW)
    granted = sum(d.granted_gpus for d in admission.result.decisions.values())
    assert admission.held_beyond_grants == stopping
    assert granted <= max(0, capacity - stopping)


# --- one allocation --------------------------------------------------------------------------------


def test_a_new_grant_applies_its_four_objects_and_then_waits_for_the_watch_instead_of_repeating_them() -> None:
    view = allocation("fresh")
    snap = SnapshotBuilder().with_allocation(view).build()
    plan = planner.plan_tenant(view, spec_of(view), decided(view), snap, snap.nodes, POOL_SPEC, {}, NOW)
    applied = [a for a in plan.actions if isinstance(a, ApplyObject)]
    assert [a.manifest["kind"] for a in applied] == ["Namespace", "ResourceQuota", "LimitRange", "RoleBinding"]
    assert plan.settling
    assert plan.actions == applied
    recent = {observed_key(a.manifest): planner.RecentApply(a.manifest, NOW) for a in applied}
    soon = planner.plan_tenant(
        view, spec_of(view), decided(view), snap, snap.nodes, POOL_SPEC, recent, NOW + timedelta(seconds=2)
    )
    assert soon.actions == []
    assert soon.settling
    later = planner.plan_tenant(
        view, spec_of(view), decided(view), snap, snap.nodes, POOL_SPEC, recent, NOW + planner.APPLY_SETTLE
    )
    assert len([a for a in later.actions if isinstance(a, ApplyObject)]) == 4


def test_a_plans_namespaced_applies_may_run_at_once_after_its_namespace_and_every_other_write_keeps_its_order() -> None:
    view = allocation("lab", suspend=True, exclusiveNodes=True)
    snap = SnapshotBuilder().with_allocation(view, gpu_pod("run", "lab")).build()
    active = planner.plan_tenant(view, spec_of(view), decided(view), snap, snap.nodes, POOL_SPEC, {}, NOW)
    stopping = planner.plan_tenant(
        view, spec_of(view), decided(view, "Suspended", 0), snap, snap.nodes, POOL_SPEC, {}, NOW
    )
    stages = planner.write_stages([*active.actions, *stopping.actions[-2:]])

    def shown(stage: tuple[object, ...]) -> tuple[str, ...]:
        return tuple(a.manifest["kind"] if isinstance(a, ApplyObject) else type(a).__name__ for a in stage)

    node_patches = [a for a in active.actions if isinstance(a, PatchNode)]
    assert node_patches  # the exclusive grant's nodes come first, one write each
    assert [shown(stage) for stage in stages] == [
        *[("PatchNode",)] * len(node_patches),
        ("Namespace",),
        ("ResourceQuota", "LimitRange", "RoleBinding"),
        *[shown((a,)) for a in stopping.actions[-2:]],
    ]
    assert [a for stage in stages for a in stage] == [*active.actions, *stopping.actions[-2:]]
    # A namespaced apply after any other write starts a stage of its own.
    quota = stages[-3][0]
    assert planner.write_stages([quota, stopping.actions[-1], quota]) == [(quota,), (stopping.actions[-1],), (quota,)]


def test_an_apply_the_watch_keeps_not_showing_is_repeated_ever_more_rarely_and_counts_afresh_once_shown() -> None:
    view = allocation("lagging")
    snap = SnapshotBuilder().with_allocation(view).build()  # the watch shows none of the four objects

    def applies(recent: dict[ObjectKey, planner.RecentApply], at: datetime) -> list[ApplyObject]:
        plan = planner.plan_tenant(view, spec_of(view), decided(view), snap, snap.nodes, POOL_SPEC, recent, at)
        return [a for a in plan.actions if isinstance(a, ApplyObject)]

    recent: dict[ObjectKey, planner.RecentApply] = {}
    at, waits = NOW, []
    for _ in range(7):
        for action in applies(recent, at):
            key = observed_key(action.manifest)
            recent[key] = planner.recent_apply(recent.get(key), action.manifest, at)
        settled_at = {r.settled_at for r in recent.values()}
        (next_at,) = settled_at
        assert applies(recent, next_at - timedelta(milliseconds=1)) == []
        waits.append((next_at - at).total_seconds())
        at = next_at
    assert waits == [5, 10, 20, 40, 80, 80, 80]

    # The watch shows the objects as applied: their records end, so a later drift is repaired at once.
    applied = {observed_key(a.manifest): dict(a.manifest) for a in applies({}, at)}
    shown = replace(snap, observed=applied)
    plan = planner.plan_tenant(view, spec_of(view), decided(view), shown, snap.nodes, POOL_SPEC, recent, at)
    assert set(plan.shown) == set(recent)
    assert (plan.actions, plan.settling) == ([], False)


def test_a_suspended_grant_stops_every_pod_holding_quota_and_says_so() -> None:
    view = allocation("paused", suspend=True)
    pods = [gpu_pod("run", "paused"), gpu_pod("gated", "paused", running=False, created_minute=1)]
    snap = SnapshotBuilder().with_allocation(view, *pods).build()
    plan = planner.plan_tenant(view, spec_of(view), decided(view, "Suspended", 0), snap, snap.nodes, POOL_SPEC, {}, NOW)
    stops = [a for a in plan.actions if isinstance(a, DeletePod)]
    assert {a.name for a in stops} == {"run", "gated"}
    events = [a for a in plan.actions if isinstance(a, PostEvent)]
    assert [e.reason for e in events] == ["PodsStopped"]
    assert "not in force" in events[0].message
    assert (plan.in_use_gpus, plan.held_gpus) == (8, 16)


def test_an_expired_grant_stops_its_pods_only_after_the_grace_period() -> None:
    end = NOW - timedelta(minutes=10)
    view = allocation("late", end=end, gracePeriodSeconds=3600)
    snap = SnapshotBuilder().with_allocation(view, gpu_pod("p", "late")).build()
    spec = spec_of(view)
    assert planner.expired_pod_stops(spec, snap.pods_of("late"), NOW, 300) == []
    after = NOW + timedelta(hours=1)
    assert planner.expired_pod_stops(spec, snap.pods_of("late"), after, 300) == [DeletePod("late", "p", 30)]


def test_pods_stop_with_their_own_grace_but_never_more_than_the_pool_allows() -> None:
    patient = replace(gpu_pod("patient", "lab"), grace_seconds=600)  # admitted before the pool lowered its cap
    quick = replace(gpu_pod("quick", "lab"), grace_seconds=5)
    assert patient.stop(300) == DeletePod("lab", "patient", 300)
    assert quick.stop(300) == DeletePod("lab", "quick", 5)


def test_a_tenant_binding_to_someone_who_is_not_an_owner_loses_that_subject() -> None:
    from gpuaas.domain.access import TenantBinding

    binding = TenantBinding(
        "ns", "share", "7", ({"kind": "User", "name": "alice"}, {"kind": "User", "name": "mallory"})
    )
    actions = planner.binding_actions([binding], "ns", [{"kind": "User", "name": "alice"}])
    assert [a.subjects for a in actions] == [({"kind": "User", "name": "alice"},)]
    assert planner.binding_actions([binding], "ns", None)[0].subjects == ()


def test_status_is_written_only_when_it_changed_and_a_phase_change_posts_an_event() -> None:
    view = allocation("s")
    outcome = ReconcileOutcome(namespace="s", objects_applied=True, gpu_quota=8)
    status = allocation_status(NO_STATUS, decided(view), outcome, False, 1, NOW)
    actions = planner.status_actions(view, NO_STATUS, {}, status)
    assert kinds(actions) == ["PatchStatus", "PostEvent"]
    assert isinstance(actions[1], PostEvent)
    assert (actions[1].reason, actions[1].event_type) == ("Active", "Normal")
    assert planner.status_actions(view, status, status.to_wire(), status) == []
    rejected = status.model_copy(update={"phase": "Rejected", "message": "no"})
    warning = planner.status_actions(view, status, status.to_wire(), rejected)
    assert isinstance(warning[1], PostEvent)
    assert warning[1].event_type == "Warning"
    patch = warning[0]
    assert isinstance(patch, PatchStatus)
    assert patch.patch["phase"] == "Rejected"


def test_status_patch_nulls_the_keys_that_vanished() -> None:
    assert planner.status_merge_patch({"a": 1, "b": 2}, {"a": 3}) == {"a": 3, "b": None}


def test_idle_reclaim_suspends_through_spec_and_says_why() -> None:
    view = allocation("idle", idle={"after": "1h", "action": "Reclaim"})
    spec = spec_of(view)
    outcome = ReconcileOutcome(namespace="idle", objects_applied=True, gpu_quota=8)
    earlier = allocation_status(NO_STATUS, decided(view), outcome, False, 1, NOW - timedelta(hours=2))
    now = allocation_status(earlier, decided(view), outcome, False, 1, NOW, spec.idle.after_duration)
    actions = planner.idle_actions(view, spec, earlier, now)
    assert kinds(actions) == ["PostEvent", "SuspendAllocation", "PostEvent"]
    assert actions[1] == SuspendAllocation("idle")
    assert planner.idle_actions(view, spec, now, now) == [SuspendAllocation("idle"), actions[2]]


def test_recheck_is_the_nearest_moment_that_time_alone_changes_something() -> None:
    view = allocation("r", end=NOW + timedelta(minutes=5))
    stopping = gpu_pod("p", "r", ended=NOW + timedelta(seconds=20))
    moment = planner.recheck_at(spec_of(view), NO_STATUS, [stopping], NOW + timedelta(minutes=1), NOW)
    assert moment == NOW + timedelta(seconds=20)  # the stopping pod's kill deadline comes first
    later = planner.recheck_at(spec_of(view), NO_STATUS, [], NOW + timedelta(seconds=3), NOW)
    assert later == NOW + timedelta(seconds=3)  # the ledger's next write


# --- release -------------------------------------------------------------------------------------


def released(view: AllocationView) -> AllocationView:
    return replace(view, deleting=True)


def test_release_first_stops_gpu_pods_and_keeps_the_grant_until_they_are_booked() -> None:
    view = released(allocation("bye"))
    snap = SnapshotBuilder().with_allocation(view, gpu_pod("p", "bye")).build()
    plan = planner.plan_release(view, spec_of(view), snap, snap.nodes, POOL_SPEC, NO_STATUS, {}, NOW)
    assert plan.actions == [DeletePod("bye", "p")]
    assert not plan.grant_returned
    assert not plan.done


def test_release_retains_the_namespace_closed_and_removes_the_finalizer_last() -> None:
    view = released(allocation("keep", deletionPolicy="Retain"))
    snap = SnapshotBuilder(nodes=[gpu_node("n1", labels={ALLOCATION_LABEL: "keep"})]).with_allocation(view).build()
    plan = planner.plan_release(view, spec_of(view), snap, snap.nodes, POOL_SPEC, NO_STATUS, {}, NOW)
    assert kinds(plan.actions) == [
        "PatchNode",
        "ApplyObject",
        "ApplyObject",
        "DeleteRoleBinding",
        "RemoveAllocationFinalizer",
        "PostEvent",
    ]
    namespace, quota = (a.manifest for a in plan.actions if isinstance(a, ApplyObject))
    assert namespace["metadata"]["labels"].get(ALLOCATION_LABEL) == "keep"
    assert quota["spec"]["hard"]["requests.nvidia.com/gpu"] == "0"
    assert plan.actions[3] == DeleteRoleBinding("keep", "gpuaas-owners")
    assert isinstance(plan.actions[4], RemoveAllocationFinalizer)
    assert plan.done


def test_release_with_delete_policy_waits_for_the_namespace_and_says_what_holds_it() -> None:
    view = released(allocation("del", deletionPolicy="Delete"))
    snap = SnapshotBuilder().with_allocation(view).build()
    first = planner.plan_release(view, spec_of(view), snap, snap.nodes, POOL_SPEC, NO_STATUS, {}, NOW)
    assert first.actions == [DeleteNamespace("del")]
    assert not first.done
    snap.terminating_namespaces["del"] = TerminatingNamespace("del", NOW.isoformat(), "finalizer example.com/keep")
    waiting = planner.plan_release(view, spec_of(view), snap, snap.nodes, POOL_SPEC, NO_STATUS, {}, NOW)
    assert kinds(waiting.actions) == ["PatchStatus", "PostEvent", "PostEvent"]
    assert waiting.waiting_for is not None
    assert not waiting.done
    assert waiting.status is not None
    assert waiting.status.phase == "Terminating"
    event = waiting.actions[-1]
    assert isinstance(event, PostEvent)
    assert event.reason == "NamespaceTerminating"
    assert event.event_type == "Warning"


def test_release_of_an_allocation_that_never_owned_its_namespace_leaves_that_namespace_alone() -> None:
    view = released(allocation("squat", namespace="someone-else"))
    snap = SnapshotBuilder().with_allocation(view, gpu_pod("theirs", "someone-else"), owns_namespace=False).build()
    plan = planner.plan_release(view, spec_of(view), snap, snap.nodes, POOL_SPEC, NO_STATUS, {}, NOW)
    assert kinds(plan.actions) == ["RemoveAllocationFinalizer", "PostEvent"]
    assert not any(isinstance(a, DeletePod | DeleteNamespace | PatchNode) for a in plan.actions)


def test_a_new_allocation_is_admitted_with_its_release_finalizer() -> None:
    """The mutating webhook adds it at create, which saves the first pass a write; the pass still adds it otherwise."""
    assert planner.finalizers_at_create([]) == [planner.RELEASE_FINALIZER]
    assert planner.finalizers_at_create(["example.com/keep"]) == ["example.com/keep", planner.RELEASE_FINALIZER]
    assert planner.finalizers_at_create([planner.RELEASE_FINALIZER]) is None
