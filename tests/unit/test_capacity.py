from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from gpuaas.domain.capacity import AdmissionResult, AllocationDemand, admit
from gpuaas.domain.planner import AdmissionMemo

NOW = datetime(2026, 3, 1, tzinfo=UTC)
DAY = timedelta(days=1)


def demand(
    name: str,
    gpus: int,
    *,
    priority: int = 0,
    created: int = 0,
    start: int = -10,
    end: int = 100,
    granted: int = 0,
    suspended: bool = False,
    deleting: bool = False,
) -> AllocationDemand:
    """Times are in days relative to NOW."""
    return AllocationDemand(
        name=name,
        uid=f"uid-{name}",
        gpus=gpus,
        priority=priority,
        created=NOW - timedelta(days=365) + timedelta(minutes=created),
        start=NOW + start * DAY,
        end=NOW + end * DAY,
        granted_gpus=granted,
        suspended=suspended,
        deleting=deleting,
    )


def test_admits_what_fits_and_queues_the_rest_with_a_message() -> None:
    result = admit(4080, [demand("big", 4064, created=1), demand("lab", 64, created=2)], NOW)
    big, lab = result.decisions["big"], result.decisions["lab"]
    assert (big.admitted, big.phase, big.granted_gpus, big.queue_position) == (True, "Active", 4064, None)
    assert (lab.admitted, lab.phase, lab.granted_gpus, lab.queue_position) == (False, "Queued", 0, 1)
    assert lab.message == "waiting for 64 GPUs; 16 of 4080 available (queue position 1)"
    assert result.summary.granted_gpus == 4064
    assert result.summary.available_gpus == 16
    assert result.summary.queued == 1


def test_order_is_priority_then_creation_then_name() -> None:
    allocations = [
        demand("old-low", 64, priority=0, created=1),
        demand("new-high", 64, priority=5, created=9),
        demand("b-tie", 64, priority=0, created=5),
        demand("a-tie", 64, priority=0, created=5),
    ]
    result = admit(64, allocations, NOW)
    assert result.decisions["new-high"].admitted
    positions = {name: result.decisions[name].queue_position for name in ("old-low", "a-tie", "b-tie")}
    assert positions == {"old-low": 1, "a-tie": 2, "b-tie": 3}


def test_admitted_allocations_keep_their_grant_when_capacity_drops() -> None:
    allocations = [demand("held", 64, granted=64, priority=-5), demand("urgent", 8, priority=100)]
    result = admit(40, allocations, NOW)
    assert result.decisions["held"].admitted
    assert result.decisions["held"].granted_gpus == 64
    assert result.decisions["urgent"].phase == "Queued"
    assert result.summary.overcommitted_gpus == 24
    assert result.summary.available_gpus == 0


def test_backfill_admits_a_small_one_behind_a_big_waiting_one() -> None:
    allocations = [demand("held", 32, granted=32), demand("big", 64, created=1), demand("small", 16, created=2)]
    result = admit(64, allocations, NOW)
    assert result.decisions["big"].queue_position == 1
    assert result.decisions["small"].admitted
    assert result.summary.granted_gpus == 48


def test_freed_gpus_go_to_the_head_of_the_queue_first() -> None:
    allocations = [demand("big", 64, created=1), demand("small", 16, created=2)]
    result = admit(64, allocations, NOW)
    assert result.decisions["big"].admitted
    assert result.decisions["small"].queue_position == 1


def test_expired_suspended_and_deleting_allocations_free_their_gpus() -> None:
    allocations = [
        demand("gone", 64, granted=64, start=-30, end=0),
        demand("paused", 64, granted=64, suspended=True),
        demand("deleting", 64, granted=64, deleting=True),
        demand("waiting", 64, created=5),
    ]
    result = admit(64, allocations, NOW)
    assert result.decisions["gone"].phase == "Expired"
    assert result.decisions["paused"].phase == "Suspended"
    assert result.decisions["deleting"].phase == "Terminating"
    assert all(result.decisions[n].granted_gpus == 0 for n in ("gone", "paused", "deleting"))
    assert result.decisions["waiting"].admitted
    assert result.summary.granted_gpus == 64


def test_future_window_is_scheduled_against_its_own_span() -> None:
    # The pool is full now, but "current" ends before "future" starts.
    allocations = [demand("current", 64, granted=64, end=30), demand("future", 64, start=30, end=60, created=1)]
    result = admit(64, allocations, NOW)
    future = result.decisions["future"]
    assert (future.admitted, future.phase, future.granted_gpus) == (True, "Scheduled", 64)
    assert result.summary.granted_gpus == 64  # the future grant does not count now


def test_future_window_overlapping_a_full_period_waits() -> None:
    allocations = [demand("current", 64, granted=64, end=31), demand("future", 64, start=30, end=60, created=1)]
    result = admit(64, allocations, NOW)
    future = result.decisions["future"]
    assert future.phase == "Queued"
    assert "throughout the window" in future.message
    assert "0 of 64 available" in future.message


def test_back_to_back_grants_do_not_overlap_at_the_handover_instant() -> None:
    allocations = [
        demand("first", 32, granted=32, end=30),
        demand("second", 32, granted=32, start=30, end=60),
        demand("long", 32, created=1, end=60),
    ]
    assert admit(64, allocations, NOW).decisions["long"].admitted


def test_a_reservation_blocks_a_new_allocation_overlapping_it() -> None:
    allocations = [demand("reserved", 48, granted=48, start=10, end=20), demand("now", 32, created=1, end=15)]
    result = admit(64, allocations, NOW)
    assert result.decisions["now"].phase == "Queued"
    assert "16 of 64 available" in result.decisions["now"].message


def test_a_reservation_granted_in_the_same_pass_blocks_a_later_allocation_overlapping_it() -> None:
    allocations = [demand("reserved", 48, start=10, end=20), demand("now", 32, created=1, end=15)]
    result = admit(64, allocations, NOW)
    assert result.decisions["reserved"].phase == "Scheduled"
    assert result.decisions["now"].phase == "Queued"
    assert "16 of 64 available" in result.decisions["now"].message


def test_shrink_takes_effect_and_growth_waits_while_keeping_the_grant() -> None:
    result = admit(64, [demand("shrunk", 16, granted=32), demand("grown", 64, granted=32)], NOW)
    assert result.decisions["shrunk"].granted_gpus == 16
    grown = result.decisions["grown"]
    assert (grown.admitted, grown.phase, grown.granted_gpus, grown.queue_position) == (True, "Active", 32, 1)
    assert "waiting for 32 more" in grown.message
    result = admit(96, [demand("shrunk", 16, granted=32), demand("grown", 64, granted=32)], NOW)
    assert result.decisions["grown"].granted_gpus == 64


def test_request_larger_than_the_pool_says_so() -> None:
    result = admit(256, [demand("huge", 1024)], NOW)
    assert "the pool can grant at most 256" in result.decisions["huge"].message


def test_no_capacity_queues_everything() -> None:
    result = admit(0, [demand("a", 8), demand("b", 8, created=1)], NOW)
    assert [result.decisions[n].queue_position for n in ("a", "b")] == [1, 2]
    assert result.summary.available_gpus == 0


# --- properties -----------------------------------------------------------------------------------

demands = st.lists(
    st.builds(
        demand,
        name=st.uuids().map(lambda u: u.hex[:8]),
        gpus=st.integers(1, 64),
        priority=st.integers(-2, 2),
        created=st.integers(0, 20),
        start=st.integers(-5, 20),
        end=st.integers(1, 40),
        granted=st.sampled_from([0, 0, 8, 64]),
        suspended=st.booleans(),
        deleting=st.just(False),
    ).filter(lambda d: d.end > d.start),
    max_size=12,
    unique_by=lambda d: d.name,
)


def load_at(result: AdmissionResult, allocations: list[AllocationDemand], instant: datetime) -> int:
    by_name = {a.name: a for a in allocations}
    return sum(
        d.granted_gpus for d in result.decisions.values() if by_name[d.name].start <= instant < by_name[d.name].end
    )


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(0, 160), allocations=demands)
def test_new_admissions_never_push_any_instant_over_capacity(
    capacity: int, allocations: list[AllocationDemand]
) -> None:
    result = admit(capacity, allocations, NOW)
    newly = [a for a in allocations if result.decisions[a.name].granted_gpus > min(a.granted_gpus, a.gpus)]
    for allocation in newly:
        instants = {max(allocation.start, NOW)} | {
            a.start for a in allocations if allocation.start < a.start < allocation.end
        }
        for instant in instants:
            if instant >= NOW:
                assert load_at(result, allocations, instant) <= capacity, (allocation.name, instant)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(0, 160), allocations=demands)
def test_the_summary_counts_the_grants_now_and_at_their_peak(
    capacity: int, allocations: list[AllocationDemand]
) -> None:
    result = admit(capacity, allocations, NOW)
    instants = {NOW} | {a.start for a in allocations if a.start > NOW}
    peak = max(load_at(result, allocations, instant) for instant in instants)
    assert result.summary.granted_gpus == load_at(result, allocations, NOW)
    assert result.summary.overcommitted_gpus == max(peak - capacity, 0)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(0, 160), allocations=demands)
def test_grants_are_never_taken_away_from_live_allocations(capacity: int, allocations: list[AllocationDemand]) -> None:
    result = admit(capacity, allocations, NOW)
    for a in allocations:
        decision = result.decisions[a.name]
        if a.granted_gpus and not a.suspended and a.end > NOW:
            assert decision.admitted
            assert decision.granted_gpus >= min(a.granted_gpus, a.gpus)
        assert decision.granted_gpus <= a.gpus


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(0, 160), allocations=demands)
def test_queue_positions_follow_priority_then_creation(capacity: int, allocations: list[AllocationDemand]) -> None:
    result = admit(capacity, allocations, NOW)
    by_name = {a.name: a for a in allocations}
    queued = sorted(
        (d for d in result.decisions.values() if d.queue_position is not None), key=lambda d: d.queue_position or 0
    )
    assert [d.queue_position for d in queued] == list(range(1, len(queued) + 1))
    keys = [by_name[d.name].queue_key for d in queued]
    assert keys == sorted(keys)
    assert result.summary.queued == len(queued)


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(0, 160), allocations=demands)
def test_feeding_grants_back_is_stable(capacity: int, allocations: list[AllocationDemand]) -> None:
    """Level-triggered: applying the decisions and recomputing changes nothing."""
    first = admit(capacity, allocations, NOW)
    fed_back = [replace(a, granted_gpus=first.decisions[a.name].granted_gpus) for a in allocations]
    second = admit(capacity, fed_back, NOW)
    assert {n: (d.phase, d.granted_gpus, d.queue_position) for n, d in first.decisions.items()} == {
        n: (d.phase, d.granted_gpus, d.queue_position) for n, d in second.decisions.items()
    }


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 160), sizes=st.lists(st.integers(1, 64), min_size=1, max_size=10))
def test_without_windows_or_grants_the_head_is_admitted_first(capacity: int, sizes: list[int]) -> None:
    allocations = [demand(f"a{i:02d}", size, created=i) for i, size in enumerate(sizes)]
    result = admit(capacity, allocations, NOW)
    head = allocations[0]
    assert result.decisions[head.name].admitted == (head.gpus <= capacity)
    # Greedy in order: each queued one did not fit next to those admitted before it.
    used = 0
    for allocation in allocations:
        if result.decisions[allocation.name].admitted:
            used += allocation.gpus
        else:
            assert used + allocation.gpus > capacity
    assert used <= capacity


_windows = st.tuples(st.integers(-3, 3), st.integers(1, 4)).map(lambda w: (w[0], w[0] + w[1]))


@settings(max_examples=150, deadline=None)
@given(
    windows=st.lists(st.tuples(_windows, st.integers(1, 40), st.integers(0, 40)), min_size=1, max_size=6),
    capacities=st.lists(st.sampled_from([32, 48, 64]), min_size=1, max_size=3),
    steps=st.lists(st.integers(0, 36), min_size=1, max_size=12),
)
def test_the_admission_memo_decides_as_admission_would_at_every_instant(
    windows: list[tuple[tuple[int, int], int, int]], capacities: list[int], steps: list[int]
) -> None:
    """Instants step by hours across windows that start and end on whole days, so some passes cross a bound and
    most do not; the demands are the same objects pass after pass, as a pool's kept candidates are."""
    demands = tuple(
        demand(f"a{i}", gpus, created=i, start=start, end=end, granted=min(granted, gpus))
        for i, ((start, end), gpus, granted) in enumerate(windows)
    )
    memo = AdmissionMemo()
    now = NOW - 3 * DAY
    for hours in steps:
        now += timedelta(hours=hours)
        for capacity in capacities:
            assert memo.admit(capacity, demands, now) == admit(capacity, demands, now)


def test_the_admission_memo_decides_again_when_a_demand_changes() -> None:
    memo = AdmissionMemo()
    first = memo.admit(64, (demand("a", 32), demand("b", 32)), NOW)
    assert memo.admit(64, (demand("a", 32), demand("b", 32)), NOW + timedelta(minutes=1)) is first  # equal: kept
    grown = memo.admit(64, (demand("a", 48), demand("b", 32)), NOW + timedelta(minutes=2))
    assert (grown.decisions["a"].granted_gpus, grown.decisions["b"].phase) == (48, "Queued")
