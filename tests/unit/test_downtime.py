"""Downtime credit and the pool identity: program = usable granted + unallocated + down."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field, replace
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpuaas.api.allocation import ALLOCATION_LABEL
from gpuaas.api.pool import GpuPoolSpec
from gpuaas.api.usage import GpuPoolUsage, GpuPoolUsageSpec, PoolLedger
from gpuaas.domain.actions import Action, CreatePoolUsage, PatchStatus, WritePoolLedger, WriteUsageLedger
from gpuaas.domain.busy import MAX_POINTS, busy_seconds, range_chunks
from gpuaas.domain.downtime import GrantInForce, PoolBreakdown, book_pool, pool_breakdown, share_shortfall
from gpuaas.domain.ledger import GrantState, book_up_to
from gpuaas.domain.pool import measure_capacity
from gpuaas.k8s.ledger import LedgerWriter
from gpuaas.k8s.pool_ledger import PoolLedgerWriter
from gpuaas.k8s.reconciler import PoolReconciler
from tests.builders import NOW, POOL, RecordingWriter, SnapshotBuilder, allocation, gpu_node, pool_spec

SPEC = GpuPoolSpec.model_validate(pool_spec())


def breakdown(nodes: list, grants: list[GrantInForce], holders: dict[str, str] | None = None) -> PoolBreakdown:
    healthy = measure_capacity(SPEC, nodes).program_gpus
    return pool_breakdown(SPEC, nodes, healthy, grants, holders or {})


HEALTHY = PoolBreakdown(program_gpus=32, healthy_gpus=32, granted_gpus=16)
NODE_DOWN = PoolBreakdown(program_gpus=32, healthy_gpus=24, granted_gpus=16)


def new_pool_ledger(writer: RecordingWriter) -> PoolLedgerWriter:
    """The month records of a pool that has none yet, flushed every minute."""
    return PoolLedgerWriter(POOL, "UTC", timedelta(seconds=60), writer, read_record=lambda name: None)


def test_a_healthy_pool_credits_nothing() -> None:
    nodes = [gpu_node(f"n{i}") for i in range(4)]
    split = breakdown(nodes, [GrantInForce("a", 16), GrantInForce("b", 8)])
    assert split.down_by_allocation == {}
    assert (split.program_gpus, split.usable_granted_gpus, split.unallocated_gpus, split.down_gpus) == (32, 24, 8, 0)


def test_a_node_down_costs_shared_grants_only_what_the_spare_capacity_cannot_cover() -> None:
    nodes = [gpu_node("n0", healthy=False), *(gpu_node(f"n{i}") for i in range(1, 4))]
    # 24 granted, 24 healthy: nobody is short, the free GPUs were the ones lost.
    assert breakdown(nodes, [GrantInForce("a", 16), GrantInForce("b", 8)]).down_by_allocation == {}
    # 32 granted, 24 healthy: 8 short, a quarter of each grant.
    split = breakdown(nodes, [GrantInForce("a", 16), GrantInForce("b", 8), GrantInForce("c", 8)])
    assert split.down_by_allocation == {"a": 4, "b": 2, "c": 2}
    # 3 short of 16 + 8 + 8: 1.5, 0.75, 0.75 in whole GPUs; the largest remainders (b, c: 0.75) get the spare two.
    three = [GrantInForce("a", 16), GrantInForce("b", 8), GrantInForce("c", 8)]
    assert share_shortfall(3, three) == {"a": 1, "b": 1, "c": 1}
    assert (split.program_gpus, split.usable_granted_gpus, split.unallocated_gpus, split.down_gpus) == (32, 24, 0, 8)
    assert split.credited_gpus == 8


def test_an_exclusive_grant_is_credited_for_its_held_node_only_when_no_spare_replaces_it() -> None:
    holders = {"n0": "fm", "n1": "fm"}
    labelled = {ALLOCATION_LABEL: "fm"}
    nodes = [gpu_node("n0", healthy=False, labels=labelled), gpu_node("n1", labels=labelled)]
    nodes += [gpu_node("n2"), gpu_node("n3")]
    # A spare is free: the grant moves there and loses nothing.
    assert breakdown(nodes, [GrantInForce("fm", 16, exclusive=True)], holders).down_by_allocation == {}
    # The spares are another tenant's exclusive nodes: 8 of fm's 16 GPUs are down, and a shared grant loses none.
    holders |= {"n2": "other", "n3": "other"}
    grants = [GrantInForce("fm", 16, exclusive=True), GrantInForce("other", 16, exclusive=True)]
    split = breakdown(nodes, grants, holders)
    assert split.down_by_allocation == {"fm": 8}
    assert (split.program_gpus, split.usable_granted_gpus, split.unallocated_gpus, split.down_gpus) == (32, 24, 0, 8)


def test_shared_grants_do_not_count_healthy_exclusive_nodes_as_theirs() -> None:
    holders = {"n0": "fm"}
    nodes = [gpu_node("n0", labels={ALLOCATION_LABEL: "fm"}), gpu_node("n1"), gpu_node("n2", healthy=False)]
    split = breakdown(nodes, [GrantInForce("fm", 8, exclusive=True), GrantInForce("lab", 16)], holders)
    assert split.down_by_allocation == {"lab": 8}  # 8 healthy GPUs outside fm's node, 16 granted


@given(
    healthy=st.lists(st.booleans(), min_size=1, max_size=12),
    grants=st.lists(st.tuples(st.integers(0, 40), st.booleans()), max_size=6),
    program=st.one_of(st.none(), st.integers(0, 120)),
)
def test_the_identity_holds_and_no_grant_is_credited_more_than_it_holds(
    healthy: list[bool], grants: list[tuple[int, bool]], program: int | None
) -> None:
    spec = GpuPoolSpec.model_validate(pool_spec(programGPUs=program) if program is not None else pool_spec())
    nodes = [gpu_node(f"n{i:02d}", healthy=up) for i, up in enumerate(healthy)]
    in_force = [GrantInForce(f"g{i}", gpus, exclusive) for i, (gpus, exclusive) in enumerate(grants)]
    holders: dict[str, str] = {}
    split = pool_breakdown(spec, nodes, measure_capacity(spec, nodes).program_gpus, in_force, holders)
    assert split.usable_granted_gpus + split.unallocated_gpus + split.down_gpus == split.program_gpus
    assert min(split.usable_granted_gpus, split.unallocated_gpus, split.down_gpus) >= 0
    for grant in in_force:
        assert 0 <= split.down_by_allocation.get(grant.name, 0) <= grant.gpus


def test_pool_seconds_split_at_the_month_boundary_and_a_replay_books_nothing() -> None:
    held = PoolBreakdown(program_gpus=32, healthy_gpus=24, granted_gpus=32, down_by_allocation={"a": 8})
    start = NOW.replace(day=30, hour=23, minute=0) - timedelta(hours=9)  # 14:00 UTC, 23:00 in Seoul
    end = start + timedelta(hours=2)  # across midnight of Nov 30 in Asia/Seoul
    booked = book_pool({}, start, end, held, "Asia/Seoul")
    assert sorted(booked) == ["2026-11", "2026-12"]
    for month in booked.values():
        assert month.program_gpu_seconds == 32 * 3600
        assert month.down_gpu_seconds == month.credited_gpu_seconds == 8 * 3600
        assert month.usable_granted_gpu_seconds == 24 * 3600
        assert month.unallocated_gpu_seconds == 0
        assert month.identity_gap == 0
    assert book_pool(booked, start, end, held, "Asia/Seoul") == {}


def test_the_allocation_ledger_books_the_credit_within_its_granted_seconds() -> None:
    grant = GrantState(16, NOW - timedelta(hours=3), down_gpus=8)
    record = book_up_to({}, [], grant, NOW, "UTC").records["2026-11"]
    assert record.granted_gpu_seconds == 16 * 3 * 3600
    assert record.down_gpu_seconds == 8 * 3 * 3600


def test_a_pass_credits_from_the_pass_that_saw_the_node_down_and_writes_the_pool_record() -> None:
    """The status carries downGPUs from the pass that saw the hardware down; the next pass books the credit."""
    writer = RecordingWriter()
    ledger = LedgerWriter(time_zone="UTC", writer=writer, read_live_pod_uids=lambda namespace: set())
    pool_ledger = PoolLedgerWriter(POOL, "UTC", timedelta(seconds=60), writer, read_record=lambda name: None)
    reconciler = PoolReconciler(pool=POOL, ledger=ledger, writer=writer, pool_ledger=pool_ledger)
    nodes = [gpu_node("node-0", healthy=False), *(gpu_node(f"node-{i}") for i in range(1, 4))]
    granted = {"phase": "Active", "grantedGPUs": 16}  # both admitted before node-0 failed: no preemption
    snap = SnapshotBuilder(nodes=nodes)
    snap.with_allocation(allocation("a", 16, status=granted)).with_allocation(allocation("b", 16, status=granted))
    result = reconciler.run_pass(snap.build(), NOW)
    assert (result.pool.down_gpus, result.pool.credited_gpus) == (8, 8)
    statuses = {p.name: p.patch for p in writer.of(PatchStatus) if p.name in ("a", "b")}
    assert statuses["a"]["downGPUs"] == statuses["b"]["downGPUs"] == 4
    degraded = next(c for c in statuses["a"]["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "GrantedGPUsDown")

    later = NOW + timedelta(seconds=90)
    writer.actions.clear()
    reconciler.run_pass(snap.build(), later)
    (created,) = writer.of(CreatePoolUsage)
    assert created.record.name == f"{POOL}-2026-11"
    assert created.record.ledger == PoolLedger(
        program_gpu_seconds=32 * 90,
        granted_gpu_seconds=32 * 90,
        credited_gpu_seconds=8 * 90,
        usable_granted_gpu_seconds=24 * 90,
        unallocated_gpu_seconds=0,
        down_gpu_seconds=8 * 90,
        booked_until=later,
    )
    assert writer.of(WritePoolLedger) == []
    # Each allocation's own record books its share of the credit over the same 90 s (created by the first pass).
    credits = {a.name: a.ledger.down_gpu_seconds for a in writer.of(WriteUsageLedger)}
    assert credits == {"a-2026-11": 4 * 90, "b-2026-11": 4 * 90}


def test_busy_range_queries_cover_the_month_once_within_prometheus_point_limit() -> None:
    month = 31 * 86400
    chunks = range_chunks(0, month, 60)
    assert chunks[0][0] == 0
    assert all(second[0] == first[1] + 60 for first, second in itertools.pairwise(chunks))  # no point twice
    assert all((last - first) // 60 + 1 <= MAX_POINTS for first, last in chunks)
    assert sum((last - first) // 60 + 1 for first, last in chunks) == month // 60  # every step once
    assert range_chunks(0, 90, 60) == [(0, 60)]  # the last point holds for the step after it
    assert busy_seconds([(0, "1.5"), (60, "0.5")], 60) == 120.0


def test_the_pool_record_is_written_when_the_hardware_changes_at_most_once_a_second() -> None:
    writer = RecordingWriter()
    ledger = new_pool_ledger(writer)
    assert ledger.book(SPEC, HEALTHY, NOW) is None
    assert ledger.book(SPEC, replace(HEALTHY, granted_gpus=24), NOW + timedelta(seconds=5)) is None  # a grant: waits
    node_down = PoolBreakdown(program_gpus=32, healthy_gpus=24, granted_gpus=24)
    handed = ledger.book(SPEC, node_down, NOW + timedelta(seconds=7))  # the hardware: written at once, up to it
    assert handed is not None
    handed.result()
    (created,) = writer.of(CreatePoolUsage)
    assert created.record.ledger.booked_until == NOW + timedelta(seconds=7)
    assert created.record.ledger.granted_gpu_seconds == 16 * 5 + 24 * 2
    assert ledger.book(SPEC, HEALTHY, NOW + timedelta(seconds=7.5)) is None  # back within the second: waits
    handed = ledger.book(SPEC, node_down, NOW + timedelta(seconds=9))
    assert handed is not None
    handed.result()
    (written,) = writer.of(WritePoolLedger)
    assert written.ledger.booked_until == NOW + timedelta(seconds=9)
    # Boundaries are whole seconds, like the allocations' records: the half second down floors away.
    assert written.ledger.down_gpu_seconds == 0
    assert written.ledger.program_gpu_seconds == 32 * 9
    assert written.ledger.identity_gap == 0


@pytest.mark.parametrize("refusal", [403, 404, 422, 500])
def test_a_refused_pool_record_write_keeps_what_memory_booked_and_the_next_pass_writes_it_whole(refusal: int) -> None:
    """Memory holds the only account of the split since the last write: a refusal (an admission policy, the record
    deleted) must not drop it for a re-read that would book the whole gap with the breakdown of its end."""
    writer = RecordingWriter()
    ledger = new_pool_ledger(writer)
    ledger.book(SPEC, HEALTHY, NOW)
    created = ledger.book(SPEC, HEALTHY, NOW + timedelta(seconds=60))
    assert created is not None
    created.result()
    writer.fail = {WritePoolLedger: refusal}
    refused = ledger.book(SPEC, NODE_DOWN, NOW + timedelta(seconds=100))  # down from 100 s
    assert refused is not None
    refused.result()
    assert ledger.failures_since_last_asked() == 1
    writer.fail = {}
    again = ledger.book(SPEC, NODE_DOWN, NOW + timedelta(seconds=110))  # at once: the flush is overdue
    assert again is not None
    again.result()
    (rewritten,) = writer.of(WritePoolLedger if refusal != 404 else CreatePoolUsage)[-1:]
    record = rewritten.ledger if refusal != 404 else rewritten.record.ledger
    assert record.booked_until == NOW + timedelta(seconds=110)
    assert (record.program_gpu_seconds, record.down_gpu_seconds) == (32 * 110, 8 * 10)
    assert record.identity_gap == 0
    ledger.stop()


def test_a_pool_record_another_replica_made_meanwhile_is_read_and_booked_on_from() -> None:
    writer = RecordingWriter(fail={CreatePoolUsage: 409})
    theirs: list[GpuPoolUsage] = []
    ledger = PoolLedgerWriter(
        POOL, "UTC", timedelta(seconds=60), writer, read_record=lambda name: theirs[0] if theirs else None
    )
    ledger.book(SPEC, HEALTHY, NOW)
    refused = ledger.book(SPEC, HEALTHY, NOW + timedelta(seconds=60))
    assert refused is not None
    refused.result()
    assert ledger.failures_since_last_asked() == 0  # not a failure: the record is there, and it is read
    made = PoolLedger(
        program_gpu_seconds=32 * 50, unallocated_gpu_seconds=32 * 50, booked_until=NOW + timedelta(seconds=50)
    )
    theirs.append(
        GpuPoolUsage(
            name=f"{POOL}-2026-11",
            spec=GpuPoolUsageSpec(pool=POOL, gpu_model="H200", provider="nhn", month="2026-11", time_zone="UTC"),
            ledger=made,
        )
    )
    writer.fail = {}
    ledger.book(SPEC, HEALTHY, NOW + timedelta(seconds=70))  # read, and booked on from its 50 s
    handed = ledger.book(SPEC, HEALTHY, NOW + timedelta(seconds=130))
    assert handed is not None
    handed.result()
    (written,) = writer.of(WritePoolLedger)
    assert written.ledger.booked_until == NOW + timedelta(seconds=130)
    assert written.ledger.program_gpu_seconds == 32 * 130  # its 50 s, then 80 s booked on: none twice
    ledger.stop()


@dataclass
class _GatedWriter(RecordingWriter):
    """Holds each write until `release` is set, as a busy API server would."""

    release: threading.Event = field(default_factory=threading.Event)

    def perform(self, action: Action) -> None:
        assert self.release.wait(timeout=30)
        super().perform(action)


def test_the_pool_record_is_written_off_the_pass_and_what_is_booked_meanwhile_is_written_by_the_next_flush() -> None:
    writer = _GatedWriter()
    ledger = new_pool_ledger(writer)
    ledger.book(SPEC, HEALTHY, NOW)
    first = ledger.book(SPEC, HEALTHY, NOW + timedelta(seconds=60))
    assert first is not None
    assert not first.done()  # the write is held; booking went on without it
    # Booked while the first write runs: no second write at once, and nothing of it is lost.
    assert ledger.book(SPEC, HEALTHY, NOW + timedelta(seconds=90)) is None
    writer.release.set()
    first.result()
    (created,) = writer.of(CreatePoolUsage)
    assert created.record.ledger.booked_until == NOW + timedelta(seconds=60)
    second = ledger.book(SPEC, HEALTHY, NOW + timedelta(seconds=120))
    assert second is not None
    second.result()
    (written,) = writer.of(WritePoolLedger)
    assert written.ledger.booked_until == NOW + timedelta(seconds=120)
    assert written.ledger.granted_gpu_seconds == 16 * 120
    ledger.stop()


def test_a_hardware_change_seen_while_a_write_runs_or_within_the_second_is_written_by_the_first_pass_after() -> None:
    """Not at the flush, a minute on: a restart books the seconds since the last write with what it finds."""
    writer = _GatedWriter()
    ledger = new_pool_ledger(writer)
    ledger.book(SPEC, HEALTHY, NOW)
    first = ledger.book(SPEC, HEALTHY, NOW + timedelta(seconds=60))
    assert first is not None
    assert ledger.book(SPEC, NODE_DOWN, NOW + timedelta(seconds=61)) is None  # the first write still runs
    writer.release.set()
    first.result()
    after_the_write = ledger.book(SPEC, NODE_DOWN, NOW + timedelta(seconds=62))
    assert after_the_write is not None
    after_the_write.result()
    assert writer.of(WritePoolLedger)[-1].ledger.booked_until == NOW + timedelta(seconds=62)
    assert ledger.book(SPEC, HEALTHY, NOW + timedelta(seconds=62.5)) is None  # back within the second
    after_the_second = ledger.book(SPEC, HEALTHY, NOW + timedelta(seconds=63.5))
    assert after_the_second is not None
    after_the_second.result()
    written = writer.of(WritePoolLedger)[-1].ledger
    assert written.booked_until == NOW + timedelta(seconds=63)
    assert (written.program_gpu_seconds, written.down_gpu_seconds) == (32 * 63, 8 * 1)  # its half second floors away
    ledger.stop()
