"""The executor and the ledger writer, with the writer port's recording fake instead of an API server."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes.client.exceptions import ApiException

from gpuaas.api.allocation import ALLOCATION_LABEL, ALLOCATION_PLURAL
from gpuaas.api.pool import POOL_LABEL, POOL_PLURAL
from gpuaas.domain.actions import (
    Action,
    ApplyObject,
    CreateUsage,
    DeletePod,
    PatchNode,
    PatchStatus,
    ReleasePod,
    RemoveAllocationFinalizer,
    WriteUsageLedger,
)
from gpuaas.domain.booking import QUIET_FLUSH_FACTOR
from gpuaas.domain.ledger import GrantState
from gpuaas.domain.planner import APPLY_SETTLE, METRICS_REFRESH
from gpuaas.domain.snapshot import PoolSnapshot, observed_key
from gpuaas.k8s.ledger import LedgerWriter
from gpuaas.k8s.pool_ledger import PoolLedgerWriter
from gpuaas.k8s.reconciler import WORKERS, PoolReconciler
from tests.builders import (
    NOW,
    POOL,
    RecordingWriter,
    SnapshotBuilder,
    allocation,
    finished,
    gpu_node,
    gpu_pod,
    pool_spec,
    usage_identity,
)


def reconciler(writer: RecordingWriter) -> PoolReconciler:
    ledger = LedgerWriter(time_zone="UTC", writer=writer, read_live_pod_uids=lambda namespace: set())
    pool_ledger = PoolLedgerWriter(POOL, "UTC", ledger.flush_interval, writer, read_record=lambda name: None)
    return PoolReconciler(pool=POOL, ledger=ledger, writer=writer, pool_ledger=pool_ledger)


def status_patches(writer: RecordingWriter, plural: str) -> list[PatchStatus]:
    return [a for a in writer.of(PatchStatus) if a.plural == plural]


def test_a_pass_grants_applies_and_reports_and_a_replay_of_it_writes_nothing() -> None:
    writer = RecordingWriter()
    snap = (
        SnapshotBuilder()
        .with_allocation(allocation("a", 16))
        .with_allocation(allocation("b", 24, created=NOW - timedelta(hours=1)))
        .with_allocation(allocation("c", 16, created=NOW - timedelta(minutes=1)))
        .build()
    )
    result = reconciler(writer).run_pass(snap, NOW)
    # 4 nodes x 8 GPUs: a first, then b does not fit whole and queues, and c, later but smaller, fits.
    assert {s.allocation: (s.phase, s.granted_gpus) for s in result.samples} == {
        "a": ("Active", 16),
        "b": ("Queued", 0),
        "c": ("Active", 16),
    }
    patches = {p.name: p.patch for p in status_patches(writer, ALLOCATION_PLURAL)}
    assert {name: patch["phase"] for name, patch in patches.items()} == {"a": "Active", "b": "Queued", "c": "Active"}
    assert len(writer.of(ApplyObject)) == 12
    (pool,) = status_patches(writer, POOL_PLURAL)
    assert (pool.patch["grantedGPUs"], pool.patch["availableGPUs"], pool.patch["queued"]) == (32, 0, 1)

    # Same snapshot, a moment later: the applies are settling and the statuses are as written.
    replay = RecordingWriter()
    again = reconciler(replay)
    again.run_pass(snap, NOW)
    replay.actions.clear()
    again.run_pass(snap, NOW + timedelta(seconds=1))
    assert replay.actions == []


def test_a_failed_apply_is_reported_in_the_status_and_ends_that_allocations_writes() -> None:
    writer = RecordingWriter(fail={ApplyObject: 500})
    snap = SnapshotBuilder().with_allocation(allocation("a", 8, suspend=True), gpu_pod("p", "a")).build()
    reconciler(writer).run_pass(snap, NOW)
    (patch,) = status_patches(writer, ALLOCATION_PLURAL)
    quota = next(c for c in patch.patch["conditions"] if c["type"] == "QuotaApplied")
    assert (quota["status"], quota["reason"], quota["message"]) == ("False", "ApplyFailed", "Namespace a: 500 Injected")
    assert writer.of(DeletePod) == []  # the pod stop came after the failed apply: the next pass retries


def test_release_books_the_last_interval_before_it_removes_the_finalizer() -> None:
    writer = RecordingWriter()
    view = allocation("gone", 8, deleting=True, deletionPolicy="Retain")
    pod = finished(gpu_pod("p", "gone"), NOW - timedelta(minutes=1))
    snap = SnapshotBuilder().with_allocation(view, pod).build()
    snap.pods_by_namespace["gone"] = [replace(pod, ledger=replace(pod.ledger, has_finalizer=False))]
    reconciler(writer).run_pass(snap, NOW)
    order = [type(a).__name__ for a in writer.actions]
    assert order.index("CreateUsage") < order.index("RemoveAllocationFinalizer")
    (create,) = writer.of(CreateUsage)
    assert create.record.ledger.used_gpu_seconds == 8 * 59 * 60
    assert writer.of(RemoveAllocationFinalizer)[0].allocation == "gone"


def test_the_ledger_writes_records_before_it_releases_a_finished_pod_and_a_replay_books_nothing() -> None:
    writer = RecordingWriter()
    ledger = LedgerWriter(time_zone="UTC", writer=writer, read_live_pod_uids=lambda namespace: set())
    pod = finished(gpu_pod("p", "t"), NOW - timedelta(minutes=30)).ledger
    grant = GrantState(8, NOW - timedelta(hours=2))
    booked = ledger.book(usage_identity(), "t", {}, [pod], grant, NOW)
    assert [type(a) for a in writer.actions] == [CreateUsage, ReleasePod]  # a new record is created booked
    assert writer.of(ReleasePod) == [ReleasePod("t", "p", pod.uid, pod.usage_finalizer_index)]
    assert booked["2026-11"].used_gpu_seconds == 8 * 30 * 60
    assert ledger.writes == 1
    assert (ledger.writes_since_last_asked(), ledger.writes_since_last_asked()) == (1, 0)  # for the metric

    # The index now shows the record; the pod, released, has no finalizer left. Booking again books nothing.
    (create,) = writer.of(CreateUsage)
    indexed = {create.record.name: create.record}
    writer.actions.clear()
    released = replace(pod, has_finalizer=False)
    assert ledger.book(usage_identity(), "t", indexed, [released], grant, NOW) == {"2026-11": create.record.ledger}
    assert writer.actions == []


def test_a_record_naming_a_pod_the_index_lacks_is_pruned_only_after_a_fresh_read_says_it_is_gone() -> None:
    writer = RecordingWriter()
    reads: list[str] = []
    live: set[str] = {"uid-p"}

    def read(namespace: str) -> set[str]:
        reads.append(namespace)
        return live

    ledger = LedgerWriter(time_zone="UTC", writer=writer, read_live_pod_uids=read)
    pod = finished(gpu_pod("p", "t"), NOW - timedelta(minutes=30)).ledger
    grant = GrantState(8, NOW - timedelta(hours=2))
    ledger.book(usage_identity(), "t", {}, [pod], grant, NOW)
    (create,) = writer.of(CreateUsage)
    indexed = {create.record.name: create.record}
    assert "uid-p" in create.record.ledger.pods

    later = NOW + ledger.flush_interval
    ledger.book(usage_identity(), "t", indexed, [], grant, later)  # the index lags: the pod still exists
    assert reads == ["t"]
    # The watermark is kept, and the rest is granted time: a quiet flush, put off (booking.QUIET_FLUSH_FACTOR).
    assert writer.of(WriteUsageLedger) == []
    live.clear()
    ledger.book(usage_identity(), "t", indexed, [], grant, later + ledger.flush_interval)
    pruned = writer.of(WriteUsageLedger)[-1]
    assert "uid-p" not in pruned.ledger.pods
    assert pruned.dropped_pods == ("uid-p",)  # the stored record loses the watermark too


def test_a_grant_that_changes_between_flushes_is_booked_under_each_state_for_its_own_time() -> None:
    """Admitted from the queue 30 s after a pass, before the ledger's flush is due: those 30 s stay ungranted, because
    the pass that changes the grant writes what the old one booked (the next booking starts from the watermark)."""
    writer = RecordingWriter()
    run = reconciler(writer)
    waiting = SnapshotBuilder(nodes=[gpu_node("node-0"), gpu_node("node-1")]).with_allocation(allocation("a", 24))
    run.run_pass(waiting.build(), NOW)
    run.run_pass(SnapshotBuilder().with_allocation(allocation("a", 24)).build(), NOW + timedelta(seconds=30))
    assert [p.patch["phase"] for p in status_patches(writer, ALLOCATION_PLURAL)] == ["Queued", "Active"]
    # Only granted time since: written with the quiet flush, ten flushes on.
    later = NOW + timedelta(seconds=30) + QUIET_FLUSH_FACTOR * run.ledger.flush_interval
    run.run_pass(SnapshotBuilder().with_allocation(allocation("a", 24)).build(), later)
    records = [a.record.ledger for a in writer.of(CreateUsage)] + [a.ledger for a in writer.of(WriteUsageLedger)]
    assert records[-1].granted_gpu_seconds == 24 * (later - NOW - timedelta(seconds=30)).total_seconds()
    assert records[-1].booked_until == later


@dataclass
class HeldWriter(RecordingWriter):
    """Holds the writes made off the pass's own thread (its workers', the pool's status) until `release` is set, as
    a loaded API server would; `crash` makes allocation status writes raise."""

    release: threading.Event = field(default_factory=threading.Event)
    crash: bool = False
    holding: threading.Event = field(default_factory=threading.Event)  # set once a write is held

    def perform(self, action: Action) -> None:
        if threading.current_thread() is not threading.main_thread():
            self.holding.set()
            assert self.release.wait(timeout=30)
        if self.crash and isinstance(action, PatchStatus) and action.plural == ALLOCATION_PLURAL:
            raise RuntimeError("injected")
        super().perform(action)


def test_writes_that_outlast_the_pass_stay_in_flight_and_their_grant_still_counts() -> None:
    writer = HeldWriter()
    run = reconciler(writer)
    first = SnapshotBuilder().with_allocation(allocation("a", 24)).build()
    result = run.run_pass(first, NOW, wait_seconds=0.05)
    assert (result.processed, result.in_flight, status_patches(writer, ALLOCATION_PLURAL)) == (1, 1, [])
    assert result.pool.granted_gpus == 24  # decided, though nothing is written yet
    assert result.waiting_seconds >= 0.05  # the pass waited its whole bound for the held writes, and reports it

    # A later allocation asks for more than is left: a's grant counts while its writes are running, and a is
    # handed no second copy of them.
    both = SnapshotBuilder().with_allocation(allocation("a", 24)).with_allocation(allocation("b", 16)).build()
    result = run.run_pass(both, NOW + timedelta(seconds=1), wait_seconds=0.05)
    assert (result.processed, result.in_flight) == (1, 2)
    assert (result.pool.granted_gpus, result.pool.queued) == (24, 1)

    writer.release.set()
    result = run.run_pass(both, NOW + timedelta(seconds=2), wait_seconds=None)
    assert result.in_flight == 0
    phases = {p.name: p.patch["phase"] for p in status_patches(writer, ALLOCATION_PLURAL)}
    assert phases == {"a": "Active", "b": "Queued"}
    namespaces = [a.manifest["metadata"]["name"] for a in writer.of(ApplyObject) if a.manifest["kind"] == "Namespace"]
    assert sorted(namespaces) == ["a", "b"]  # a's applied once, though three passes saw it
    assert {s.allocation: s.phase for s in result.samples} == {"a": "Active", "b": "Queued"}


def test_under_a_backlog_a_pass_does_not_wait_for_writes_queued_behind_the_running_ones() -> None:
    writer = HeldWriter()
    run = reconciler(writer)
    builder = SnapshotBuilder()
    for i in range(WORKERS + 1):
        builder.with_allocation(allocation(f"a{i}", 1))
    try:
        result = run.run_pass(builder.build(), NOW, wait_seconds=30)
        assert result.in_flight == WORKERS + 1
        assert result.waiting_seconds < 15  # not the bound: the held writes end only after the pass returned
    finally:
        writer.release.set()
    wait(list(run.in_flight.values()))
    # One fewer in flight than workers: the pass waits for them again (here, until they are written).
    fewer = SnapshotBuilder().with_allocation(allocation("b", 1)).build()
    writer.release.clear()
    threading.Timer(0.2, writer.release.set).start()
    result = run.run_pass(fewer, NOW + timedelta(seconds=1), wait_seconds=30)
    assert result.in_flight == 0


def test_an_apply_settles_from_when_it_was_written_not_from_when_its_pass_began() -> None:
    """In a burst a worker writes seconds after its pass began; the watch's settling time counts from the write, or
    a pass repeats applies that the watch was about to show."""
    writer = HeldWriter()
    run = reconciler(writer)
    snap = SnapshotBuilder().with_allocation(allocation("a", 8)).build()  # the watch never shows the applies
    run.run_pass(snap, NOW, wait_seconds=0.05)
    time.sleep(0.5)  # the API server is busy: the applies end at least half a second after the pass began
    writer.release.set()
    wait(list(run.in_flight.values()))
    applies = len(writer.of(ApplyObject))
    assert applies == 4

    run.run_pass(snap, NOW + APPLY_SETTLE + timedelta(seconds=0.2), wait_seconds=None)
    assert len(writer.of(ApplyObject)) == applies  # 4.7 s or less since they were written
    repeated_at = NOW + APPLY_SETTLE + timedelta(seconds=30)
    run.run_pass(snap, repeated_at, wait_seconds=None)
    assert len(writer.of(ApplyObject)) == 2 * applies  # unshown for longer: applied again
    run.run_pass(snap, repeated_at + APPLY_SETTLE + timedelta(seconds=1), wait_seconds=None)
    assert len(writer.of(ApplyObject)) == 2 * applies  # a repeat waits twice as long

    # The watch shows them: their records end.
    shown = replace(snap, observed={observed_key(a.manifest): dict(a.manifest) for a in writer.of(ApplyObject)})
    run.run_pass(shown, repeated_at + timedelta(seconds=12), wait_seconds=None)
    assert run.applied[snap.allocations[0].uid] == {}


@dataclass
class MeetingWriter(RecordingWriter):
    """Namespaced applies wait until all three of an allocation's are running at once (or fail, if they are written
    one after another); `refuse` is a kind whose apply the API server refuses."""

    meeting: threading.Barrier = field(default_factory=lambda: threading.Barrier(3, timeout=5))
    running: list[str] = field(default_factory=list)
    refuse: str | None = None

    def perform(self, action: Action) -> None:
        if isinstance(action, ApplyObject) and action.manifest["metadata"].get("namespace"):
            self.running.append(action.manifest["kind"])
            self.meeting.wait()
            if action.manifest["kind"] == self.refuse:
                raise ApiException(status=422, reason="Refused")
        elif isinstance(action, PatchStatus):
            assert len(self.running) in (0, 3)  # never while the applies run
        super().perform(action)


def test_an_allocations_quota_limit_range_and_binding_are_applied_at_once_after_its_namespace() -> None:
    writer = MeetingWriter()
    run = reconciler(writer)
    snap = SnapshotBuilder().with_allocation(allocation("a", 8)).build()
    assert run.run_pass(snap, NOW).failed == 0
    kinds = [a.manifest["kind"] for a in writer.of(ApplyObject)]
    assert kinds[0] == "Namespace"
    assert sorted(kinds[1:]) == ["LimitRange", "ResourceQuota", "RoleBinding"]
    (patch,) = status_patches(writer, ALLOCATION_PLURAL)
    assert patch.patch["phase"] == "Active"
    assert len(run.applied[snap.allocations[0].uid]) == 4  # each settles from its own write


def test_a_refused_apply_among_those_at_once_is_reported_and_the_others_still_count_as_applied() -> None:
    writer = MeetingWriter(refuse="LimitRange")
    run = reconciler(writer)
    snap = SnapshotBuilder().with_allocation(allocation("a", 8)).build()
    run.run_pass(snap, NOW)
    (patch,) = status_patches(writer, ALLOCATION_PLURAL)
    quota = next(c for c in patch.patch["conditions"] if c["type"] == "QuotaApplied")
    assert (quota["status"], quota["reason"], quota["message"]) == (
        "False",
        "ApplyFailed",
        "LimitRange gpuaas-limits: 422 Refused",
    )
    applied = run.applied[snap.allocations[0].uid]
    assert sorted(kind for kind, _, _ in applied) == ["Namespace", "ResourceQuota", "RoleBinding"]


def test_a_pool_fences_its_nodes_without_waiting_and_sends_each_node_one_patch_per_version_it_sees() -> None:
    writer = HeldWriter()  # the API server is busy: no patch ends until released
    run = reconciler(writer)
    nodes = [replace(gpu_node(f"node-{i}"), resource_version="1") for i in range(4)]
    snap = replace(SnapshotBuilder(spec=pool_spec(taint=True)).build(), nodes=nodes)
    result = run.run_pass(snap, NOW, wait_seconds=0)
    assert result.pool.capacity_gpus == 32  # the pass ended and reported while the patches are held

    run.run_pass(snap, NOW + timedelta(seconds=1), wait_seconds=0)  # the index shows no change yet
    writer.release.set()
    wait([sent for _, sent in run.fencing.values()])
    assert sorted(a.name for a in writer.of(PatchNode)) == [f"node-{i}" for i in range(4)]
    run.run_pass(snap, NOW + timedelta(seconds=2), wait_seconds=0)  # done, but the index has not shown it
    wait([sent for _, sent in run.fencing.values()])
    assert len(writer.of(PatchNode)) == 4

    # node-0 changed since (its patch was refused as stale), the others show their fence: only node-0 again.
    fenced = [replace(n, taints=((POOL_LABEL, POOL, "NoSchedule"),), resource_version="2") for n in nodes[1:]]
    changed = replace(snap, nodes=[replace(nodes[0], resource_version="2"), *fenced])
    run.run_pass(changed, NOW + timedelta(seconds=3), wait_seconds=0)
    wait([sent for _, sent in run.fencing.values()])
    again = writer.of(PatchNode)[4:]
    assert [(a.name, a.patch["metadata"]["resourceVersion"]) for a in again] == [("node-0", "2")]
    run.stop()
    assert status_patches(writer, POOL_PLURAL)  # the pool's status too, once its own held write went through


def test_a_pass_does_not_wait_for_the_pools_status_write_and_only_the_newest_status_is_sent_after_it() -> None:
    writer = HeldWriter()  # the API server is busy
    run = reconciler(writer)
    builder = SnapshotBuilder()
    for gpus, name in ((8, "a"), (16, "b"), (8, "c")):
        result = run.run_pass(builder.with_allocation(allocation(name, gpus)).build(), NOW, wait_seconds=0.05)
        assert result.waiting_seconds < 1  # bounded, though no write ends
    assert status_patches(writer, POOL_PLURAL) == []
    writer.release.set()
    run.stop()
    # The first status was being written when the next two were decided: the third replaced the second.
    assert [p.patch["grantedGPUs"] for p in status_patches(writer, POOL_PLURAL)] == [8, 32]


def test_pools_sharing_the_turn_decide_one_at_a_time_and_no_pool_holds_it_while_it_waits_for_writes() -> None:
    turn = threading.Lock()
    held = HeldWriter()
    first, second = reconciler(held), reconciler(RecordingWriter())
    first.deciding_turn = second.deciding_turn = turn
    snap = SnapshotBuilder().with_allocation(allocation("a", 8)).build()
    with ThreadPoolExecutor(max_workers=1) as other_thread:
        with turn:  # another pool is deciding
            waiting = other_thread.submit(second.run_pass, snap, NOW)
            time.sleep(0.2)
            assert not waiting.done()
        assert waiting.result(timeout=10).turn_seconds >= 0.2

        def second_pass_while_the_first_waits() -> float:
            assert held.holding.wait(timeout=10)  # the first pass has decided and waits for its writes
            result = second.run_pass(snap, NOW + timedelta(seconds=1))
            held.release.set()
            return result.turn_seconds

        meanwhile = other_thread.submit(second_pass_while_the_first_waits)
        result = first.run_pass(snap, NOW)  # waits until its writes end: they end after the second pass
        assert meanwhile.result(timeout=10) < 1
        assert result.pool.granted_gpus == 8
        assert result.in_flight == 0


def test_a_pool_status_write_that_failed_is_counted_and_sent_again_by_the_next_pass() -> None:
    writer = RecordingWriter(fail={PatchStatus: 500})
    run = reconciler(writer)
    snap = SnapshotBuilder().build()
    assert run.run_pass(snap, NOW).failed == 1
    assert run.run_pass(snap, NOW + timedelta(seconds=1)).failed == 1  # the same status: sent again
    writer.fail.clear()
    assert run.run_pass(snap, NOW + timedelta(seconds=2)).failed == 0
    (pool,) = status_patches(writer, POOL_PLURAL)
    assert pool.patch["capacityGPUs"] == 32
    run.run_pass(snap, NOW + timedelta(seconds=3))
    assert len(status_patches(writer, POOL_PLURAL)) == 1  # written: nothing to send


def test_a_fence_patch_that_failed_is_sent_again_by_the_next_pass() -> None:
    writer = RecordingWriter(fail={PatchNode: 500})
    run = reconciler(writer)
    snap = replace(SnapshotBuilder(spec=pool_spec(taint=True)).build(), nodes=[gpu_node("node-0")])
    run.run_pass(snap, NOW, wait_seconds=0)
    wait([sent for _, sent in run.fencing.values()])
    writer.fail.clear()
    run.run_pass(snap, NOW + timedelta(seconds=1), wait_seconds=0)
    wait([sent for _, sent in run.fencing.values()])
    assert [a.name for a in writer.of(PatchNode)] == ["node-0"]


def test_an_exclusive_grant_whose_node_patch_is_refused_as_stale_names_no_nodes_until_a_pass_writes_them() -> None:
    """A node patch carries the version it was planned from; a refusal (the node changed since) is a write that did
    not happen: the status must not say the tenant is fenced to nodes that carry no label or taint for it."""
    writer = RecordingWriter(fail={PatchNode: 409})
    run = reconciler(writer)
    snap = SnapshotBuilder().with_allocation(allocation("x", 16, exclusiveNodes=True)).build()
    assert run.run_pass(snap, NOW).failed == 0  # reported in the status, not a crashed write
    (refused,) = status_patches(writer, ALLOCATION_PLURAL)
    conditions = {c["type"]: c for c in refused.patch["conditions"]}
    assert refused.patch.get("nodes", []) == []
    assert (conditions["Fenced"]["status"], conditions["Ready"]["status"]) == ("False", "False")
    assert conditions["QuotaApplied"]["message"] == (
        "Node node-0 changed since it was read (409 Injected); written again from its new version"
    )

    writer.fail.clear()
    run.run_pass(snap, NOW + timedelta(seconds=1))
    labelled = [a.name for a in writer.of(PatchNode) if a.patch.get("metadata", {}).get("labels")]
    assert len(labelled) == 2
    written = status_patches(writer, ALLOCATION_PLURAL)[-1].patch
    assert sorted(written["nodes"]) == sorted(labelled)


def test_a_node_patch_written_is_not_sent_again_from_the_version_it_was_planned_from() -> None:
    """Until the index shows the patched node, a pass plans the same patch from the old version: sending it again
    would be refused as stale, and the grant would read as unfenced though its nodes are labelled."""
    nodes = [replace(gpu_node(f"node-{i}"), resource_version="1") for i in range(4)]
    snap = SnapshotBuilder(nodes=nodes).with_allocation(allocation("x", 16, exclusiveNodes=True)).build()
    writer = RecordingWriter()
    run = reconciler(writer)
    run.run_pass(snap, NOW)
    first = writer.of(PatchNode)
    assert [a.patch["metadata"]["resourceVersion"] for a in first] == ["1", "1"]

    run.run_pass(snap, NOW + timedelta(seconds=1))  # the index has not shown the patches yet
    assert writer.of(PatchNode) == first
    (status,) = status_patches(writer, ALLOCATION_PLURAL)  # nothing changed: no second status write
    assert sorted(status.patch["nodes"]) == sorted(a.name for a in first)

    # Someone took the label and taint off one node since: the index shows it at a new version, and it is patched again.
    stripped = replace(snap, nodes=[replace(nodes[0], resource_version="3"), *nodes[1:]])
    run.run_pass(stripped, NOW + timedelta(seconds=2))
    again = writer.of(PatchNode)[len(first) :]
    assert [(a.name, a.patch["metadata"]["resourceVersion"]) for a in again] == [("node-0", "3")]


def test_a_release_whose_node_unlabel_is_refused_keeps_its_finalizer_for_the_next_pass() -> None:
    """Removing the finalizer with the nodes still labelled and tainted for the allocation would leave them reserved
    for a grant that no longer exists."""
    held = [gpu_node(f"node-{i}", labels={ALLOCATION_LABEL: "gone"}) for i in range(2)]
    view = allocation("gone", 16, deleting=True, exclusiveNodes=True, deletionPolicy="Retain")
    snap = SnapshotBuilder(nodes=[*held, gpu_node("node-2"), gpu_node("node-3")]).with_allocation(view).build()
    writer = RecordingWriter(fail={PatchNode: 409})
    run = reconciler(writer)
    assert run.run_pass(snap, NOW).failed == 1
    assert writer.of(RemoveAllocationFinalizer) == []

    writer.fail.clear()
    assert run.run_pass(snap, NOW + timedelta(seconds=1)).failed == 0
    assert sorted(a.name for a in writer.of(PatchNode)) == ["node-0", "node-1"]
    assert [a.allocation for a in writer.of(RemoveAllocationFinalizer)] == ["gone"]


def test_a_pass_reports_how_long_after_their_write_the_index_showed_an_allocations_objects() -> None:
    writer = RecordingWriter()
    run = reconciler(writer)
    snap = SnapshotBuilder().with_allocation(allocation("a", 8)).build()
    assert run.run_pass(snap, NOW).shown_after == ()
    shown = replace(snap, observed={observed_key(a.manifest): dict(a.manifest) for a in writer.of(ApplyObject)})
    result = run.run_pass(shown, NOW + timedelta(seconds=3))
    assert sorted(kind for kind, _ in result.shown_after) == ["LimitRange", "Namespace", "ResourceQuota", "RoleBinding"]
    assert all(2.5 < seconds <= 3 for _, seconds in result.shown_after)
    assert run.run_pass(shown, NOW + timedelta(seconds=4)).shown_after == ()  # each is reported once


def test_writes_that_fail_are_counted_and_handed_out_again_by_the_next_pass() -> None:
    writer = HeldWriter(crash=True)
    writer.release.set()
    run = reconciler(writer)
    snap = SnapshotBuilder().with_allocation(allocation("a", 8)).build()
    assert run.run_pass(snap, NOW).failed == 1
    writer.crash = False
    result = run.run_pass(snap, NOW + timedelta(seconds=1))
    assert (result.failed, result.processed) == (0, 1)
    assert [p.patch["phase"] for p in status_patches(writer, ALLOCATION_PLURAL)] == ["Active"]


def test_stop_waits_for_the_writes_running_and_then_closes_the_pools_client() -> None:
    writer = HeldWriter()
    run = reconciler(writer)
    writes_when_closed: list[int] = []
    run.on_stop = lambda: writes_when_closed.append(len(status_patches(writer, ALLOCATION_PLURAL)))
    run.run_pass(SnapshotBuilder().with_allocation(allocation("a", 8)).build(), NOW, wait_seconds=0)
    stopping = threading.Thread(target=run.stop)
    stopping.start()
    stopping.join(timeout=0.2)
    assert stopping.is_alive()  # held by a's writes
    assert writes_when_closed == []
    writer.release.set()
    stopping.join(timeout=10)
    assert not stopping.is_alive()
    assert [p.patch["phase"] for p in status_patches(writer, ALLOCATION_PLURAL)] == ["Active"]
    assert writes_when_closed == [1]  # closed once, after a's status was written


def test_the_pool_is_woken_when_its_workers_run_low_on_writes_and_when_the_last_end() -> None:
    writer = HeldWriter()
    run = reconciler(writer)
    calls: list[str] = []
    run.low_water = 2
    run.on_work_done = lambda: calls.append("woken")
    snap = SnapshotBuilder()
    for name in ("a", "b", "c"):
        snap.with_allocation(allocation(name, 8))
    assert run.run_pass(snap.build(), NOW, wait_seconds=0).in_flight == 3
    writer.release.set()
    run.stop()
    assert calls == ["woken", "woken"]  # at one left (below the low water of 2) and at none; not at two


def test_a_record_whose_only_news_is_granted_time_is_written_ten_flushes_apart_and_when_its_month_ends() -> None:
    writer = RecordingWriter()
    ledger = LedgerWriter(time_zone="UTC", writer=writer, read_live_pod_uids=lambda namespace: set())
    start = datetime(2026, 11, 30, 23, 40, tzinfo=UTC)
    grant = GrantState(8, start - timedelta(hours=2))
    flush = ledger.flush_interval
    ledger.book(usage_identity(), "t", {}, [], grant, start)
    ledger.book(usage_identity(), "t", {}, [], grant, start + flush)
    (created,) = writer.of(CreateUsage)  # a record to create is news
    indexed = {created.record.name: created.record}
    for flushes in range(2, 11):  # granted time alone: put off, and the pass is told when it is due
        ledger.book(usage_identity(), "t", indexed, [], grant, start + flushes * flush)
        assert ledger.next_due("uid-t", start + flushes * flush) == start + (1 + QUIET_FLUSH_FACTOR) * flush
    assert writer.of(WriteUsageLedger) == []
    booked = ledger.book(usage_identity(), "t", indexed, [], grant, start + 11 * flush)
    (written,) = writer.of(WriteUsageLedger)
    assert written.ledger.granted_gpu_seconds == booked["2026-11"].granted_gpu_seconds == 8 * 3600 * 2 + 8 * 11 * 60
    indexed[written.name] = indexed[written.name].model_copy(update={"ledger": written.ledger})

    # The month ends 9 minutes after that write: its record is closed at the next due flush, not 10 flushes later.
    writer.actions.clear()
    ledger.book(usage_identity(), "t", indexed, [], grant, datetime(2026, 12, 1, 0, 0, 30, tzinfo=UTC))
    (closed,) = writer.of(WriteUsageLedger)
    assert closed.ledger.booked_until == datetime(2026, 12, 1, tzinfo=UTC)


def test_a_running_pods_time_is_written_ten_flushes_apart_and_a_pod_that_starts_at_the_next_flush() -> None:
    writer = RecordingWriter()
    ledger = LedgerWriter(time_zone="UTC", writer=writer, read_live_pod_uids=lambda namespace: {"uid-p", "uid-q"})
    start = datetime(2026, 11, 10, 12, tzinfo=UTC)
    grant = GrantState(8, start - timedelta(hours=2))
    flush = ledger.flush_interval
    running = gpu_pod("p", "t", started=start - timedelta(hours=1)).ledger
    ledger.book(usage_identity(), "t", {}, [running], grant, start)
    ledger.book(usage_identity(), "t", {}, [running], grant, start + flush)
    (created,) = writer.of(CreateUsage)  # a record to create, with the pod's first watermark, is news
    indexed = {created.record.name: created.record}
    for flushes in range(2, 11):  # the same pod running on: its time follows from the pod and the watermark
        ledger.book(usage_identity(), "t", indexed, [running], grant, start + flushes * flush)
        assert ledger.next_due("uid-t", start + flushes * flush) == start + (1 + QUIET_FLUSH_FACTOR) * flush
    assert writer.of(WriteUsageLedger) == []
    booked = ledger.book(usage_identity(), "t", indexed, [running], grant, start + 11 * flush)
    (written,) = writer.of(WriteUsageLedger)
    assert written.ledger.used_gpu_seconds == booked["2026-11"].used_gpu_seconds == 8 * (3600 + 11 * 60)
    assert written.ledger.pods["uid-p"].booked_until == start + 11 * flush
    indexed[written.name] = indexed[written.name].model_copy(update={"ledger": written.ledger})

    # A second pod starts: its watermark is news, written at the next flush interval, not ten later.
    writer.actions.clear()
    second = gpu_pod("q", "t", gpus=2, started=start + 11 * flush + timedelta(seconds=5)).ledger
    ledger.book(usage_identity(), "t", indexed, [running, second], grant, start + 12 * flush)
    (news,) = writer.of(WriteUsageLedger)
    assert news.ledger.pods.keys() == {"uid-p", "uid-q"}
    assert news.ledger.used_gpu_seconds == 8 * (3600 + 12 * 60) + 2 * 55


def settled_pool(run: PoolReconciler, writer: RecordingWriter, count: int) -> tuple[SnapshotBuilder, PoolSnapshot]:
    """`count` 1-GPU allocations with a running pod each, decided, applied and shown by the watch at NOW + 1 s: from
    then on only their usage refreshes come due."""
    builder = SnapshotBuilder(nodes=[gpu_node(f"node-{i}") for i in range(8)])  # room for every one
    for index in range(count):
        builder.with_allocation(allocation(f"a{index}", 1), gpu_pod(f"p{index}", f"a{index}"))
    snap = builder.build()
    run.run_pass(snap, NOW)
    settled = replace(snap, observed={observed_key(a.manifest): a.manifest for a in writer.of(ApplyObject)})
    run.run_pass(settled, NOW + timedelta(seconds=1))
    return builder, settled


def test_usage_refreshes_go_out_as_one_batch_behind_new_work_and_the_rest_with_a_later_pass() -> None:
    writer = RecordingWriter()
    run = reconciler(writer)
    run.refresh_batch = 8
    builder, settled = settled_pool(run, writer, 12)
    due = NOW + timedelta(seconds=1) + METRICS_REFRESH
    newcomer = allocation("new", 1)
    with_newcomer = replace(builder.with_allocation(newcomer).build(), observed=settled.observed)
    writer.actions.clear()
    result = run.run_pass(with_newcomer, due)
    assert result.processed == 1 + 8  # the new allocation, and one batch of refreshes
    assert [p.name for p in status_patches(writer, ALLOCATION_PLURAL)] == ["new"]  # decided
    assert len(result.samples) == 13  # those not refreshed keep their last sample
    shown = {**settled.observed, **{observed_key(a.manifest): a.manifest for a in writer.of(ApplyObject)}}
    rest = run.run_pass(replace(with_newcomer, observed=shown), due + timedelta(seconds=1))
    assert rest.processed == 1 + 4  # the newcomer, which sees its objects now, and the remaining refreshes


def test_an_unchanged_allocations_usage_counters_move_every_refresh_and_nothing_is_written() -> None:
    writer = RecordingWriter()
    run = reconciler(writer)
    snap = SnapshotBuilder().with_allocation(allocation("a", 8), gpu_pod("p", "a")).build()
    run.run_pass(snap, NOW)
    settled = replace(snap, observed={observed_key(a.manifest): a.manifest for a in writer.of(ApplyObject)})
    run.run_pass(settled, NOW + timedelta(seconds=1))  # the objects are seen: nothing depends on the clock now
    writer.actions.clear()

    within = run.run_pass(settled, NOW + timedelta(seconds=10))
    assert within.processed == 0
    later = run.run_pass(settled, NOW + timedelta(seconds=1) + METRICS_REFRESH)
    assert later.processed == 1
    assert writer.actions == []  # no apply, no status, and no ledger write due yet
    (before,), (after,) = within.samples, later.samples
    assert after.used_gpu_seconds == 8 * (3600 + 16)  # the pod has run since an hour before NOW
    assert after.granted_gpu_seconds - before.granted_gpu_seconds == 8 * 15
    assert replace(after, used_gpu_seconds=0, granted_gpu_seconds=0) == replace(
        before, used_gpu_seconds=0, granted_gpu_seconds=0
    )


def test_a_batch_of_refreshes_is_not_waited_for_nor_wakes_the_pool_and_the_next_pass_takes_in_its_counters() -> None:
    """Refreshes only move counters. A pass that waited for them, or was woken when they ended, would come again as
    soon as they had: a steady pool's passes came one after another, for nothing but counters."""
    writer = RecordingWriter()
    run = reconciler(writer)
    _, settled = settled_pool(run, writer, WORKERS + 4)
    woken: list[str] = []
    run.on_work_done = lambda: woken.append("woken")
    held = {"a0", "a1"}  # the batch refreshes these last, once released
    released = threading.Event()
    refresh = run._refresh_usage

    def refresh_some_late(c: Any, *args: Any) -> Any:
        if c.view.name in held:
            assert released.wait(timeout=30)
        return refresh(c, *args)

    run._refresh_usage = refresh_some_late  # type: ignore[method-assign]
    run.refresh_batch = WORKERS
    due = NOW + timedelta(seconds=1) + METRICS_REFRESH
    result = run.run_pass(settled, due, wait_seconds=30)
    assert result.processed == WORKERS  # one batch of refreshes, a0 and a1 among them
    assert result.waiting_seconds < 30  # not waited for
    assert result.in_flight == 0  # not writes in flight: the pool sleeps until something happens
    assert {view.name for view in settled.allocations if view.uid in run.in_flight} >= held  # no decision meanwhile
    again = run.run_pass(settled, due + timedelta(seconds=1), wait_seconds=30)
    assert again.processed == 0  # the other 4 due wait: one batch at a time
    released.set()
    run._refreshes.result(timeout=30)  # type: ignore[union-attr]
    assert woken == []
    later = run.run_pass(settled, due + timedelta(seconds=2))  # unbounded: waits for its refreshes too
    assert later.processed == 4
    assert run.in_flight == {}
    used = sorted(sample.used_gpu_seconds for sample in later.samples)
    assert used == [8 * (3600 + 16)] * WORKERS + [8 * (3600 + 18)] * 4  # the batch's counters taken in, and the rest


def test_stopping_leaves_the_rest_of_a_batch_of_refreshes() -> None:
    """Another replica may lead once `stop` returns: it does not wait for hundreds of counters to move."""
    writer = RecordingWriter()
    run = reconciler(writer)
    _, settled = settled_pool(run, writer, 4)
    started, released = threading.Event(), threading.Event()
    refresh = run._refresh_usage

    def refresh_held(c: Any, *args: Any) -> Any:
        started.set()
        assert released.wait(timeout=30)
        return refresh(c, *args)

    run._refresh_usage = refresh_held  # type: ignore[method-assign]
    run.run_pass(settled, NOW + timedelta(seconds=1) + METRICS_REFRESH, wait_seconds=0)
    assert started.wait(timeout=30)
    threading.Timer(0.2, released.set).start()
    run.stop()
    ended = [future for future in run.in_flight.values() if not future.cancelled()]
    assert len(ended) == 1  # the refresh running when it stopped; the other three never ran
    assert ended[0].result().used_gpu_seconds == 8 * (3600 + 16)
