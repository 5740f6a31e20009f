"""The usage ledger: month splitting, exact booking, idempotent replay, release of booked pods."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from random import Random
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuaas.api.pool import POOL_LABEL
from gpuaas.api.usage import (
    ALLOCATION_LABEL,
    MONTH_LABEL,
    GpuPoolUsageList,
    GpuUsage,
    GpuUsageList,
    GpuUsageSpec,
    PodWatermark,
    UsageLedger,
    UsageTenant,
    ledger_patch,
    usage_labels,
    usage_name,
)
from gpuaas.domain.fence import USAGE_FINALIZER
from gpuaas.domain.ledger import (
    Booking,
    GrantState,
    PodInterval,
    book_up_to,
    from_epoch,
    ledger_pod,
    month_bounds,
    month_of,
    months_touched,
    pod_gpus,
    pod_interval_from_pod,
    prune,
    seconds_to_hours,
    split_by_month,
    to_epoch,
)

ZONES = ["Asia/Seoul", "UTC", "America/New_York", "Australia/Lord_Howe"]
CRD = Path(__file__).resolve().parents[2] / "crds" / "gpuusages.gpuaas.io.yaml"

# 2025-10-15 .. 2026-03-20 (UTC): crosses New York's DST end and start, and a year boundary.
DOMAIN_START = to_epoch(datetime(2025, 10, 15, tzinfo=UTC))
DOMAIN_END = to_epoch(datetime(2026, 3, 20, tzinfo=UTC))
MONTHS = ["2025-10", "2025-11", "2025-12", "2026-01", "2026-02", "2026-03"]


def _interesting_instants() -> list[int]:
    """Month starts in every zone and New York's DST switches: where off-by-one bugs live."""
    instants = {to_epoch(month_bounds(month, zone)[0]) for month in MONTHS for zone in ZONES}
    instants |= {to_epoch(datetime(2025, 11, 2, 6, tzinfo=UTC)), to_epoch(datetime(2026, 3, 8, 7, tzinfo=UTC))}
    return sorted(instant for instant in instants if DOMAIN_START <= instant <= DOMAIN_END)


INTERESTING = _interesting_instants()

instants = st.one_of(
    st.integers(DOMAIN_START, DOMAIN_END),
    st.builds(lambda base, delta: base + delta, st.sampled_from(INTERESTING), st.integers(-7200, 7200)),
).map(lambda seconds: min(max(seconds, DOMAIN_START), DOMAIN_END))
zones = st.sampled_from(ZONES)


def at(seconds: int) -> datetime:
    return from_epoch(seconds)


# --- months --------------------------------------------------------------------------------------


@given(a=instants, b=instants, zone=zones)
def test_split_by_month_sums_to_the_whole_interval(a: int, b: int, zone: str) -> None:
    start, end = min(a, b), max(a, b)
    parts = split_by_month(at(start), at(end), zone)
    assert sum(seconds for _, seconds in parts) == end - start
    assert all(seconds > 0 for _, seconds in parts)
    months = [month for month, _ in parts]
    assert months == sorted(set(months))
    if parts:
        assert months[0] == month_of(at(start), zone)
        assert months[-1] == month_of(at(end - 1), zone)


@given(instant=instants, zone=zones)
def test_month_bounds_hold_the_instant_and_follow_each_other(instant: int, zone: str) -> None:
    month = month_of(at(instant), zone)
    start, end = month_bounds(month, zone)
    assert start <= at(instant) < end
    local = start.astimezone(ZoneInfo(zone))
    assert (local.day, local.hour, local.minute) == (1, 0, 0)
    assert month_of(end, zone) != month
    assert month_bounds(month_of(end, zone), zone)[0] == end


def test_months_are_local_calendar_months() -> None:
    # 2026-09-30T15:00Z is midnight of October 1st in Seoul.
    assert month_of(datetime(2026, 9, 30, 14, 59, 59, tzinfo=UTC), "Asia/Seoul") == "2026-09"
    assert month_of(datetime(2026, 9, 30, 15, tzinfo=UTC), "Asia/Seoul") == "2026-10"
    assert split_by_month(
        datetime(2026, 9, 30, 14, tzinfo=UTC), datetime(2026, 9, 30, 17, tzinfo=UTC), "Asia/Seoul"
    ) == [
        ("2026-09", 3600),
        ("2026-10", 7200),
    ]
    # New York's November 2025 is one hour longer than 30 days: DST ended on the 2nd.
    start, end = month_bounds("2025-11", "America/New_York")
    assert (end - start) == timedelta(days=30, hours=1)
    assert month_bounds("2026-10", "UTC") == (datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("zone", "month"),
    [
        ("America/Asuncion", "2023-10"),
        ("America/Havana", "2020-11"),
        ("Africa/Cairo", "2014-08"),
        ("America/Goose_Bay", "2009-11"),
    ],
)
def test_months_that_start_in_a_dst_switch_still_partition_time(zone: str, month: str) -> None:
    # In these zones local midnight of the 1st was skipped or repeated.
    start, end = month_bounds(month, zone)
    assert all(month_of(start + timedelta(minutes=30 * step), zone) == month for step in range(6))
    assert month_of(start - timedelta(seconds=1), zone) != month
    assert month_of(end - timedelta(seconds=1), zone) == month
    wide = split_by_month(start - timedelta(days=3), end + timedelta(days=3), zone)
    assert sum(seconds for _, seconds in wide) == int((end - start + timedelta(days=6)).total_seconds())
    assert dict(wide)[month] == int((end - start).total_seconds())


def test_fractions_of_seconds_are_floored_and_naive_instants_refused() -> None:
    assert to_epoch(datetime(2026, 1, 1, 0, 0, 0, 999999, tzinfo=UTC)) == to_epoch(datetime(2026, 1, 1, tzinfo=UTC))
    with pytest.raises(ValueError, match="naive"):
        to_epoch(datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="YYYY-MM"):
        month_bounds("2026-13", "UTC")


# --- a reference model of the booking ------------------------------------------------------------


@dataclass(frozen=True)
class TruePod:
    uid: str
    gpus: int
    start: int
    end: int | None


@dataclass(frozen=True)
class Expected:
    used: int
    granted: int
    idle: int
    peak: int
    pods: int
    daily_used: dict[str, int]
    daily_granted: dict[str, int]


def local_midnights(month: str, zone: str) -> set[int]:
    """Every local midnight of the month, from the wall clock (a midnight in a DST gap resolves forward)."""
    year, number = int(month[:4]), int(month[5:])
    midnights = set()
    day = datetime(year, number, 1)
    while day.month == number:
        midnights.add(to_epoch(day.replace(tzinfo=ZoneInfo(zone))))
        day += timedelta(days=1)
    return midnights


def visible(pods: list[TruePod], now: int) -> list[PodInterval]:
    """What the API shows at `now`: started pods, with an end only once they have ended."""
    shown = []
    for pod in pods:
        if pod.start > now:
            continue
        ended = pod.end is not None and pod.end <= now
        shown.append(
            PodInterval(pod.uid, pod.gpus, at(pod.start), at(pod.end) if ended and pod.end is not None else None)
        )
    return shown


def reference(pods: list[TruePod], grant: GrantState | None, now: int, zone: str) -> dict[str, Expected]:
    """Brute force over elementary segments: independent of the sweep in the ledger."""
    grant_from = to_epoch(grant.active_from) if grant else 0
    grant_until = (to_epoch(grant.active_until) if grant and grant.active_until else now) if grant else 0
    expected = {}
    for month in MONTHS:
        month_start, month_end = (to_epoch(bound) for bound in month_bounds(month, zone))
        horizon = min(now, month_end)
        if horizon <= month_start:
            continue
        spans = [
            (pod.start, min(pod.end if pod.end is not None else now, now), pod.gpus) for pod in pods if pod.gpus > 0
        ]
        points = {month_start, horizon, grant_from, grant_until}
        points |= {edge for start, end, _ in spans for edge in (start, end)}
        points |= local_midnights(month, zone)
        cuts = sorted(point for point in points if month_start <= point <= horizon)
        used = granted = idle = peak = 0
        daily_used: dict[str, int] = {}
        daily_granted: dict[str, int] = {}
        for low, high in pairwise(cuts):
            day = f"{from_epoch(low).astimezone(ZoneInfo(zone)).day:02d}"
            open_gpus = sum(gpus for start, end, gpus in spans if start <= low and end >= high)
            active = grant is not None and grant_from <= low and grant_until >= high
            used += open_gpus * (high - low)
            if open_gpus:
                daily_used[day] = daily_used.get(day, 0) + open_gpus * (high - low)
            peak = max(peak, open_gpus)
            if active and grant is not None:
                granted += grant.gpus * (high - low)
                if grant.gpus:
                    daily_granted[day] = daily_granted.get(day, 0) + grant.gpus * (high - low)
                idle += (high - low) if open_gpus == 0 and grant.gpus > 0 else 0
        counted = sum(1 for start, end, _ in spans if min(end, horizon) > max(start, month_start))
        if (
            used
            or granted
            or idle
            or counted
            or (grant is not None and min(grant_until, horizon) > max(grant_from, month_start))
        ):
            expected[month] = Expected(used, granted, idle, peak, counted, daily_used, daily_granted)
    return expected


def observed(records: dict[str, UsageLedger]) -> dict[str, Expected]:
    return {
        month: Expected(
            r.used_gpu_seconds,
            r.granted_gpu_seconds,
            r.idle_seconds,
            r.peak_gpus_in_use,
            r.pod_count,
            # Days with nothing booked are absent either way.
            {day: seconds for day, seconds in r.daily_used_gpu_seconds.items() if seconds},
            {day: seconds for day, seconds in r.daily_granted_gpu_seconds.items() if seconds},
        )
        for month, r in records.items()
    }


def apply(records: dict[str, UsageLedger], result: Booking) -> dict[str, UsageLedger]:
    return {**records, **result.records}


@st.composite
def true_pods(draw: st.DrawFn) -> list[TruePod]:
    pods = []
    for index in range(draw(st.integers(0, 6))):
        a, b = draw(instants), draw(instants)
        running = draw(st.booleans())
        gpus = draw(st.sampled_from([0, 1, 2, 4, 8]))
        pods.append(TruePod(f"pod-{index}", gpus, min(a, b), None if running else max(a, b)))
    return pods


@st.composite
def grants(draw: st.DrawFn) -> GrantState | None:
    if draw(st.integers(0, 4)) == 0:
        return None
    a, b = draw(instants), draw(instants)
    until = None if draw(st.booleans()) else at(max(a, b))
    return GrantState(gpus=draw(st.integers(0, 64)), active_from=at(min(a, b)), active_until=until)


PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(pods=true_pods(), grant=grants(), now=instants, zone=zones)
def test_one_flush_books_exactly_what_the_reference_says(
    pods: list[TruePod], grant: GrantState | None, now: int, zone: str
) -> None:
    result = book_up_to({}, visible(pods, now), grant, at(now), zone)
    assert observed(result.records) == reference(pods, grant, now, zone)
    assert result.created == frozenset(result.records)
    assert sorted(result.records) == months_touched(visible(pods, now), grant, at(now), zone)


@PROPERTY_SETTINGS
@given(pods=true_pods(), grant=grants(), now=instants, zone=zones)
def test_flushing_again_books_nothing_more(pods: list[TruePod], grant: GrantState | None, now: int, zone: str) -> None:
    shown = visible(pods, now)
    first = book_up_to({}, shown, grant, at(now), zone)
    second = book_up_to(first.records, shown, grant, at(now), zone)
    assert second.records == {}
    assert second.created == frozenset()
    assert second.released == first.released
    # Order of pods does not matter either.
    shuffled = book_up_to({}, list(reversed(shown)), grant, at(now), zone)
    assert shuffled == first


@PROPERTY_SETTINGS
@given(
    pods=true_pods(),
    grant=grants(),
    nows=st.lists(instants, min_size=1, max_size=6),
    zone=zones,
    chooser=st.randoms(use_true_random=False),
)
def test_incremental_flushes_with_crashes_add_up_to_the_whole(
    pods: list[TruePod], grant: GrantState | None, nows: list[int], zone: str, chooser: Random
) -> None:
    """Flush at increasing instants; sometimes only some month writes land before a "crash";
    released pods disappear (their finalizer is removed). The ledger must equal the whole truth."""
    records: dict[str, UsageLedger] = {}
    gone: set[str] = set()
    for now in sorted(nows):
        alive = [pod for pod in pods if pod.uid not in gone]
        shown = visible(alive, now)
        result = book_up_to(records, shown, grant, at(now), zone)
        if chooser.random() < 0.4 and result.records:
            # Crash after writing a random subset of the months: nothing is released.
            landed = chooser.sample(sorted(result.records), chooser.randint(0, len(result.records) - 1))
            records = {**records, **{month: result.records[month] for month in landed}}
            result = book_up_to(records, shown, grant, at(now), zone)
        records = apply(records, result)
        gone |= set(result.released)
        live = {pod.uid for pod in alive if pod.uid not in gone}
        records = {month: prune(record, live) for month, record in records.items()}
    last = max(nows)
    # Pods released before the last flush vanished from the API; everything else is still visible.
    assert observed(records) == reference(pods, grant, last, zone)


@PROPERTY_SETTINGS
@given(pods=true_pods(), grant=grants(), now=instants, zone=zones)
def test_released_only_when_the_whole_interval_is_booked(
    pods: list[TruePod], grant: GrantState | None, now: int, zone: str
) -> None:
    shown = visible(pods, now)
    result = book_up_to({}, shown, grant, at(now), zone)
    records = result.records
    for pod in shown:
        if pod.end is None:
            assert pod.uid not in result.released
            continue
        assert pod.uid in result.released
        for month, seconds in split_by_month(pod.start, pod.end, zone):
            if pod.gpus == 0:
                continue
            watermark = records[month].pods[pod.uid].booked_until
            month_end = month_bounds(month, zone)[1]
            assert watermark >= min(pod.end, month_end)
            assert seconds > 0


def test_a_crash_between_month_writes_is_repaired_without_double_counting() -> None:
    zone = "Asia/Seoul"
    pod = PodInterval("p", 8, datetime(2026, 9, 30, 12, tzinfo=UTC), datetime(2026, 9, 30, 18, tzinfo=UTC))
    grant = GrantState(16, datetime(2026, 9, 30, 12, tzinfo=UTC))
    now = datetime(2026, 9, 30, 20, tzinfo=UTC)
    result = book_up_to({}, [pod], grant, now, zone)
    assert sorted(result.records) == ["2026-09", "2026-10"]
    assert result.released == ("p",)
    # Only September reached the API server before the crash.
    partial = {"2026-09": result.records["2026-09"]}
    replay = book_up_to(partial, [pod], grant, now, zone)
    assert sorted(replay.records) == ["2026-10"]
    assert replay.created == frozenset({"2026-10"})
    assert replay.records["2026-10"] == result.records["2026-10"]
    assert result.records["2026-09"].used_gpu_seconds == 8 * 3 * 3600
    assert result.records["2026-10"].used_gpu_seconds == 8 * 3 * 3600
    assert result.records["2026-10"].granted_gpu_seconds == 16 * 5 * 3600
    assert result.records["2026-10"].idle_seconds == 2 * 3600
    # Until October is written, the pod is not fully booked and must keep its finalizer.
    assert book_up_to(partial, [pod], grant, datetime(2026, 9, 30, 14, 30, tzinfo=UTC), zone).released == ()


def test_overlapping_pods_add_up_and_set_the_peak() -> None:
    day = datetime(2026, 10, 5, tzinfo=UTC)
    pods = [
        PodInterval("a", 8, day, day + timedelta(hours=4)),
        PodInterval("b", 4, day + timedelta(hours=1), day + timedelta(hours=2)),
        PodInterval("c", 2, day + timedelta(hours=4), None),  # starts as "a" ends: no overlap
    ]
    grant = GrantState(16, day - timedelta(hours=1))
    result = book_up_to({}, pods, grant, day + timedelta(hours=6), "UTC")
    october = result.records["2026-10"]
    assert october.used_gpu_seconds == (8 * 4 + 4 * 1 + 2 * 2) * 3600
    assert october.peak_gpus_in_use == 12
    assert october.pod_count == 3
    assert october.idle_seconds == 3600
    assert october.granted_gpu_seconds == 16 * 7 * 3600
    assert october.used_gpu_hours == "40.000"
    assert result.released == ("a", "b")


def test_a_grant_change_is_booked_by_flushing_each_state_up_to_the_change() -> None:
    start = datetime(2026, 10, 5, tzinfo=UTC)
    change = start + timedelta(hours=2)
    first = book_up_to({}, [], GrantState(8, start), change, "UTC")
    second = book_up_to(first.records, [], GrantState(16, change), change + timedelta(hours=1), "UTC")
    october = second.records["2026-10"]
    assert october.granted_gpu_seconds == (8 * 2 + 16 * 1) * 3600
    assert october.granted_gpus == 16
    assert october.idle_seconds == 3 * 3600


def test_a_clock_going_backwards_books_nothing() -> None:
    now = datetime(2026, 10, 5, tzinfo=UTC)
    grant = GrantState(8, now - timedelta(days=1))
    pods = [PodInterval("a", 1, now - timedelta(hours=3), None)]
    first = book_up_to({}, pods, grant, now, "UTC")
    assert book_up_to(first.records, pods, grant, now - timedelta(minutes=5), "UTC").records == {}


def test_prune_drops_only_pods_that_are_gone() -> None:
    moment = datetime(2026, 10, 1, tzinfo=UTC)
    record = UsageLedger(
        pods={"a": PodWatermark(gpus=1, booked_until=moment), "b": PodWatermark(gpus=2, booked_until=moment)}
    )
    assert set(prune(record, ["b", "c"]).pods) == {"b"}
    assert prune(record, ["a", "b"]) is record


# --- pods as the API server shows them -----------------------------------------------------------


def pod(
    phase: str = "Running",
    containers: list[dict[str, Any]] | None = None,
    statuses: list[dict[str, Any]] | None = None,
    **metadata: Any,
) -> dict[str, Any]:
    return {
        "metadata": {"uid": "uid-1", **metadata},
        "spec": {"containers": containers or [{"resources": {"limits": {"nvidia.com/gpu": "8"}}}]},
        "status": {"phase": phase, "startTime": "2026-10-01T00:00:00Z", "containerStatuses": statuses or []},
    }


RUNNING = [{"state": {"running": {"startedAt": "2026-10-01T00:00:05Z"}}}]
FINISHED = [
    {"state": {"terminated": {"startedAt": "2026-10-01T00:00:05Z", "finishedAt": "2026-10-01T02:00:00Z"}}},
    {"state": {"terminated": {"startedAt": "2026-10-01T00:00:07Z", "finishedAt": "2026-10-01T03:00:00Z"}}},
]


def test_a_running_pod_is_open_from_its_first_container_start() -> None:
    interval = pod_interval_from_pod(pod(statuses=RUNNING))
    assert interval == PodInterval("uid-1", 8, datetime(2026, 10, 1, 0, 0, 5, tzinfo=UTC), None)


def test_a_restarted_container_counts_from_its_first_run() -> None:
    restarted = [
        {
            "state": {"running": {"startedAt": "2026-10-01T01:00:00Z"}},
            "lastState": {"terminated": {"startedAt": "2026-10-01T00:00:02Z", "finishedAt": "2026-10-01T00:59:00Z"}},
        }
    ]
    interval = pod_interval_from_pod(pod(statuses=restarted))
    assert interval is not None
    assert interval.start == datetime(2026, 10, 1, 0, 0, 2, tzinfo=UTC)
    assert interval.end is None


def test_a_finished_pod_ends_at_its_last_container_finish() -> None:
    interval = pod_interval_from_pod(pod("Succeeded", statuses=FINISHED))
    assert interval is not None
    assert interval.end == datetime(2026, 10, 1, 3, tzinfo=UTC)


# Deletion requested at 05:00:00 with the default grace of 30 s: the kubelet kills at 05:00:30.
REQUESTED = datetime(2026, 10, 1, 5, tzinfo=UTC)
DEADLINE = "2026-10-01T05:00:30Z"
STARTED = datetime(2026, 10, 1, 0, 0, 5, tzinfo=UTC)


def terminated(finished: str) -> list[dict[str, Any]]:
    return [{"state": {"terminated": {"startedAt": "2026-10-01T00:00:05Z", "finishedAt": finished, "exitCode": 137}}}]


def used_and_released(
    shown: dict[str, Any], now: datetime, records: dict[str, UsageLedger] | None = None
) -> tuple[dict[str, UsageLedger], int, tuple[str, ...]]:
    """Flush one pod as the API shows it at `now`: the records after, the pod's GPU-seconds, released uids."""
    interval = pod_interval_from_pod(shown)
    assert interval is not None
    result = book_up_to(records or {}, [interval], None, now, "UTC")
    after = {**(records or {}), **result.records}
    return after, sum(record.used_gpu_seconds for record in after.values()), result.released


def test_a_deleted_pod_ends_when_its_gpus_are_released() -> None:
    """It holds its GPUs until its containers terminate (here 20 s of cleanup after SIGTERM), not until
    deletion was asked for; the kubelet's final delete (grace 0, deletionTimestamp moved back to its own
    moment) does not move the end."""
    while_terminating = pod(
        statuses=terminated("2026-10-01T05:00:20Z"), deletionTimestamp=DEADLINE, deletionGracePeriodSeconds=30
    )
    interval = pod_interval_from_pod(while_terminating)
    assert interval == PodInterval("uid-1", 8, STARTED, datetime(2026, 10, 1, 5, 0, 20, tzinfo=UTC))
    terminal = pod(
        "Failed", statuses=terminated("2026-10-01T05:00:20Z"), deletionTimestamp=DEADLINE, deletionGracePeriodSeconds=30
    )
    assert pod_interval_from_pod(terminal) == interval
    finally_deleted = pod(
        "Failed",
        statuses=terminated("2026-10-01T05:00:20Z"),
        deletionTimestamp="2026-10-01T05:00:21Z",
        deletionGracePeriodSeconds=0,
    )
    assert pod_interval_from_pod(finally_deleted) == interval


def test_a_pod_ignoring_sigterm_is_booked_until_it_is_killed() -> None:
    deleting = pod(statuses=RUNNING, deletionTimestamp=DEADLINE, deletionGracePeriodSeconds=30)
    # Ten seconds after the request it still runs: booked up to now, and its finalizer stays.
    records, used, released = used_and_released(deleting, REQUESTED + timedelta(seconds=10))
    assert used == 8 * (to_epoch(REQUESTED) + 10 - to_epoch(STARTED))
    assert released == ()
    # SIGKILL at the deadline: the kubelet reports the finish, then deletes the pod for good (grace 0),
    # which moves the deletionTimestamp back to that moment. Either view ends it at the kill.
    killed = pod("Failed", statuses=terminated(DEADLINE), deletionTimestamp=DEADLINE, deletionGracePeriodSeconds=30)
    final = pod(
        "Failed", statuses=terminated(DEADLINE), deletionTimestamp="2026-10-01T05:00:31Z", deletionGracePeriodSeconds=0
    )
    assert pod_interval_from_pod(killed) == pod_interval_from_pod(final)
    records, used, released = used_and_released(final, REQUESTED + timedelta(seconds=32), records)
    assert used == 8 * (to_epoch(REQUESTED) + 30 - to_epoch(STARTED))
    assert released == ("uid-1",)
    # Flushing the other view again books nothing twice.
    assert used_and_released(killed, REQUESTED + timedelta(seconds=40), records)[1:] == (used, ("uid-1",))
    # A finishedAt past the deadline (the kill lands late in its second) is capped to the deadline.
    late = pod(
        "Failed", statuses=terminated("2026-10-01T05:00:31Z"), deletionTimestamp=DEADLINE, deletionGracePeriodSeconds=30
    )
    assert pod_interval_from_pod(late) == pod_interval_from_pod(killed)


def test_a_deleting_pod_reporting_its_finish_is_booked_to_it() -> None:
    deleting = pod(statuses=RUNNING, deletionTimestamp=DEADLINE, deletionGracePeriodSeconds=30)
    records, _, released = used_and_released(deleting, REQUESTED + timedelta(seconds=10))
    assert released == ()
    # The job's own cleanup ends it at 05:00:25, before the kill: booked to there, not to the deadline.
    finished = pod(
        "Failed", statuses=terminated("2026-10-01T05:00:25Z"), deletionTimestamp=DEADLINE, deletionGracePeriodSeconds=30
    )
    _, used, released = used_and_released(finished, REQUESTED + timedelta(seconds=26), records)
    assert used == 8 * (to_epoch(REQUESTED) + 25 - to_epoch(STARTED))
    assert released == ("uid-1",)


def test_a_deleting_pod_never_reporting_a_finish_is_booked_to_its_deadline() -> None:
    """A node that never reports a finish (lost, or KWOK's): the pod holds its GPUs (and finalizer) until
    the kill deadline, then is booked to it."""
    deleting = pod(statuses=RUNNING, deletionTimestamp=DEADLINE, deletionGracePeriodSeconds=30)
    interval = pod_interval_from_pod(deleting)
    assert interval is not None
    assert interval.end == datetime(2026, 10, 1, 5, 0, 30, tzinfo=UTC)
    records, used, released = used_and_released(deleting, REQUESTED + timedelta(seconds=29))
    assert (used, released) == (8 * (to_epoch(REQUESTED) + 29 - to_epoch(STARTED)), ())
    assert records["2026-10"].pods["uid-1"].booked_until == REQUESTED + timedelta(seconds=29)
    records, used, released = used_and_released(deleting, REQUESTED + timedelta(minutes=5), records)
    assert (used, released) == (8 * (to_epoch(REQUESTED) + 30 - to_epoch(STARTED)), ("uid-1",))
    # Flushing again (a restart, a replay) books nothing more.
    assert used_and_released(deleting, REQUESTED + timedelta(minutes=6), records)[1:] == (used, ("uid-1",))


def test_a_pod_exiting_on_sigterm_is_booked_to_its_real_finish() -> None:
    # Asked at 05:00:00.9, exited 0.2 s later: finishedAt 05:00:01, long before the deadline.
    exited = pod(
        "Succeeded",
        statuses=terminated("2026-10-01T05:00:01Z"),
        deletionTimestamp=DEADLINE,
        deletionGracePeriodSeconds=30,
    )
    interval = pod_interval_from_pod(exited)
    assert interval is not None
    assert interval.end == datetime(2026, 10, 1, 5, 0, 1, tzinfo=UTC)
    _, used, released = used_and_released(exited, REQUESTED + timedelta(seconds=2))
    assert (used, released) == (8 * (to_epoch(REQUESTED) + 1 - to_epoch(STARTED)), ("uid-1",))


def test_a_force_deleted_pod_ends_at_the_request() -> None:
    forced = pod(statuses=RUNNING, deletionTimestamp="2026-10-01T05:00:00Z", deletionGracePeriodSeconds=0)
    interval = pod_interval_from_pod(forced)
    assert interval is not None
    assert interval.end == REQUESTED
    _, used, released = used_and_released(forced, REQUESTED)
    assert (used, released) == (8 * (to_epoch(REQUESTED) - to_epoch(STARTED)), ("uid-1",))
    # The kubelet kills it two seconds later and says so: the end does not move.
    killed = pod(
        "Failed",
        statuses=terminated("2026-10-01T05:00:02Z"),
        deletionTimestamp="2026-10-01T05:00:00Z",
        deletionGracePeriodSeconds=0,
    )
    assert pod_interval_from_pod(killed) == interval


def test_terminated_containers_end_only_a_pod_being_deleted() -> None:
    """A running pod's crashed container is restarted: it stays open until its phase is terminal."""
    crashed = pod("Running", statuses=terminated("2026-10-01T04:00:00Z"))
    interval = pod_interval_from_pod(crashed)
    assert interval is not None
    assert interval.end is None
    # A sidecar init container still running keeps a deleting pod's GPUs held.
    sidecar = pod(
        statuses=terminated("2026-10-01T05:00:01Z"), deletionTimestamp=DEADLINE, deletionGracePeriodSeconds=30
    )
    sidecar["status"]["initContainerStatuses"] = [{"state": {"running": {"startedAt": "2026-10-01T00:00:01Z"}}}]
    interval = pod_interval_from_pod(sidecar)
    assert interval is not None
    assert interval.end == datetime(2026, 10, 1, 5, 0, 30, tzinfo=UTC)


def test_a_pod_that_never_ran_books_nothing() -> None:
    assert pod_interval_from_pod(pod("Pending")) is None
    waiting = [{"state": {"waiting": {"reason": "ContainerCreating"}}}]
    assert pod_interval_from_pod(pod("Pending", statuses=waiting, deletionTimestamp="2026-10-01T05:00:00Z")) is None
    never = [{"state": {"terminated": {"reason": "ContainerStatusUnknown", "exitCode": 137}}}]
    assert pod_interval_from_pod(pod("Failed", statuses=never)) is None


def test_a_running_pod_without_container_times_falls_back_to_its_start_time() -> None:
    interval = pod_interval_from_pod(pod("Running", statuses=[{"state": {"running": {}}}]))
    assert interval is not None
    assert interval.start == datetime(2026, 10, 1, tzinfo=UTC)


def test_effective_gpu_request_follows_the_scheduler() -> None:
    def container(gpus: int, key: str = "requests", **extra: Any) -> dict[str, Any]:
        return {"resources": {key: {"nvidia.com/gpu": str(gpus)}}, **extra}

    assert pod_gpus({"containers": [container(2), container(3, "limits"), {"resources": {}}]}) == 5
    assert pod_gpus({"containers": [container(2)], "initContainers": [container(8)]}) == 8
    assert pod_gpus({"containers": [container(2)], "initContainers": [container(1)]}) == 2
    sidecar = container(1, restartPolicy="Always")
    assert pod_gpus({"containers": [container(2)], "initContainers": [sidecar, container(4)]}) == 5
    assert pod_gpus({"containers": [{"name": "cpu-only"}]}) == 0


# --- the API model and its CRD -------------------------------------------------------------------


def test_ledger_wire_names_and_round_trip() -> None:
    status = UsageLedger(
        used_gpu_seconds=7200,
        granted_gpu_seconds=14400,
        granted_gpus=2,
        peak_gpus_in_use=1,
        booked_until=datetime(2026, 10, 1, tzinfo=UTC),
        pods={"u": PodWatermark(gpus=1, booked_until=datetime(2026, 10, 1, tzinfo=UTC))},
        used_gpu_hours=str(seconds_to_hours(7200)),
    )
    wire = status.to_wire()
    assert {"usedGPUSeconds", "grantedGPUSeconds", "grantedGPUs", "peakGPUsInUse", "usedGPUHours"} <= set(wire)
    assert wire["bookedUntil"] == "2026-10-01T00:00:00Z"
    assert UsageLedger.model_validate(wire) == status


def test_the_crd_schema_knows_every_field_of_the_model() -> None:
    crd = yaml.safe_load(CRD.read_text())
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]["properties"]
    spec_fields = {field.alias for field in GpuUsageSpec.model_fields.values()}
    ledger_fields = {field.alias for field in UsageLedger.model_fields.values()}
    assert spec_fields == set(schema["spec"]["properties"])
    assert ledger_fields == set(schema["ledger"]["properties"])
    # No status subresource: the ledger is written with the record, and a restore that drops status keeps it.
    assert "subresources" not in version
    assert schema["status"]["x-kubernetes-preserve-unknown-fields"] is True
    assert crd["spec"]["names"]["shortNames"] == ["gu"]
    assert [column["name"] for column in version["additionalPrinterColumns"]] == [
        "Allocation",
        "Tenant",
        "Month",
        "Used-GPU-h",
        "Granted-GPU-h",
        "Peak",
        "Pods",
        "Age",
    ]


def test_a_record_object_round_trips_with_its_name_and_labels() -> None:
    spec = GpuUsageSpec(
        allocation="snu-ai-lab",
        allocation_uid="1234",
        tenant=UsageTenant(name="서울대학교 AI연구실", organization="서울대학교"),
        pool="nhn-b200-a",
        gpu_model="B200",
        provider="nhn",
        month="2026-10",
    )
    record = GpuUsage(name=usage_name(spec.allocation, spec.month), spec=spec)
    body = record.to_object()
    assert body["metadata"] == {
        "name": "snu-ai-lab-2026-10",
        "labels": {"gpuaas.io/allocation": "snu-ai-lab", "gpuaas.io/month": "2026-10", "gpuaas.io/pool": "nhn-b200-a"},
    }
    assert GpuUsage.from_object(body) == record


def test_a_record_from_before_the_ledger_field_is_read_from_its_status_and_moved_on_its_next_write() -> None:
    spec = GpuUsageSpec(
        allocation="a", tenant=UsageTenant(name="a"), pool="p", gpu_model="H200", provider="naver", month="2026-10"
    )
    ledger = UsageLedger(
        used_gpu_seconds=3600, pods={"u": PodWatermark(gpus=1, booked_until=datetime(2026, 10, 2, tzinfo=UTC))}
    )
    legacy = {**GpuUsage(name="a-2026-10", spec=spec).to_object(), "status": ledger.to_wire()}
    del legacy["ledger"]
    assert GpuUsage.from_object(legacy).ledger == ledger
    pruned = ledger.model_copy(update={"pods": {}})
    assert ledger_patch(pruned, ["u"]) == {"ledger": {**pruned.to_wire(), "pods": {"u": None}}, "status": None}


def test_a_list_page_parsed_from_its_bytes_gives_the_records_that_from_object_gives() -> None:
    """The report parses each list response in one pass (GpuUsageList.model_validate_json); it must read every
    record as the operator's index reads it, the legacy `status` ledger included, whatever else the server adds."""
    spec = GpuUsageSpec(
        allocation="a", tenant=UsageTenant(name="a"), pool="p", gpu_model="H200", provider="naver", month="2026-10"
    )
    ledger = UsageLedger(
        used_gpu_seconds=3600,
        daily_used_gpu_seconds={"02": 3600},
        pods={"u": PodWatermark(gpus=1, booked_until=datetime(2026, 10, 2, tzinfo=UTC))},
    )
    current = GpuUsage(name="a-2026-10", spec=spec, ledger=ledger).to_object()
    current["metadata"] |= {"uid": "1", "managedFields": [{"manager": "gpuaas", "fieldsV1": {"f:ledger": {}}}]}
    legacy = {**GpuUsage(name="b-2026-10", spec=spec.model_copy(update={"allocation": "b"})).to_object()}
    legacy["status"] = legacy.pop("ledger") | {"usedGPUSeconds": 60}
    empty = {**GpuUsage(name="c-2026-10", spec=spec.model_copy(update={"allocation": "c"})).to_object()}
    del empty["ledger"]
    objects = [current, legacy, empty]
    page = {"apiVersion": "gpuaas.io/v1alpha1", "items": objects, "kind": "GpuUsageList", "metadata": {}}
    parsed = GpuUsageList.model_validate_json(json.dumps(page).encode())
    assert parsed.records() == [GpuUsage.from_object(obj) for obj in objects]
    assert [record.ledger.used_gpu_seconds for record in parsed.records()] == [3600, 60, 0]
    assert parsed.metadata.continue_token == ""
    pool_page = {"items": [], "metadata": {"continue": "abc", "resourceVersion": "9"}}
    assert GpuPoolUsageList.model_validate_json(json.dumps(pool_page)).metadata.continue_token == "abc"


def test_a_ledger_write_sets_the_records_labels_so_a_changed_label_heals() -> None:
    ledger = UsageLedger(used_gpu_seconds=1)
    spec = GpuUsageSpec(
        allocation="a", tenant=UsageTenant(name="a"), pool="p", gpu_model="H200", provider="naver", month="2026-10"
    )
    patch = ledger_patch(ledger, (), usage_labels(spec))
    assert patch["metadata"] == {"labels": {ALLOCATION_LABEL: "a", MONTH_LABEL: "2026-10", POOL_LABEL: "p"}}
    assert "metadata" not in ledger_patch(ledger)


def test_a_pod_whose_finish_never_comes_is_billed_to_its_deadline_and_counted_once() -> None:
    lost = pod(statuses=RUNNING, deletionTimestamp=DEADLINE, deletionGracePeriodSeconds=30)
    records, used, released = used_and_released(lost, REQUESTED + timedelta(seconds=10))
    assert sum(r.pods_billed_to_deadline for r in records.values()) == 0  # still inside its grace
    records, used, released = used_and_released(lost, REQUESTED + timedelta(seconds=60), records)
    assert used == 8 * (to_epoch(REQUESTED) + 30 - to_epoch(STARTED))
    assert released == ("uid-1",)
    assert sum(r.pods_billed_to_deadline for r in records.values()) == 1
    records, _, _ = used_and_released(lost, REQUESTED + timedelta(seconds=90), records)
    assert sum(r.pods_billed_to_deadline for r in records.values()) == 1  # a replay counts nothing more
    reported = pod("Failed", statuses=terminated("2026-10-01T05:00:25Z"), deletionTimestamp=DEADLINE)
    records, _, _ = used_and_released(reported, REQUESTED + timedelta(seconds=60))
    assert sum(r.pods_billed_to_deadline for r in records.values()) == 0


def test_the_ledger_view_of_a_pod_says_where_its_usage_finalizer_is() -> None:
    """The release removes that entry with no read: it must be the usage finalizer's own place in the list."""
    meta = {"name": "p", "namespace": "t", "uid": "u", "finalizers": ["example.com/keep", USAGE_FINALIZER]}
    held = ledger_pod(meta, None, "Running")
    assert (held.has_finalizer, held.usage_finalizer_index) == (True, 1)
    assert not ledger_pod({**meta, "finalizers": ["example.com/keep"]}, None, "Running").has_finalizer
