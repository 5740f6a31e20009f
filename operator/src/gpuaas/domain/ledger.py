"""Exact, idempotent booking of GPU usage into monthly ledger records.

Usage ends when a pod's GPUs are released, not when someone asks: a pod being deleted holds its GPUs
until its containers have terminated, at the latest until its deletionTimestamp (the kubelet's kill
deadline), and it is booked only up to now until then.

All instants are whole seconds since the epoch inside this module: Kubernetes timestamps have
second precision, and integer arithmetic makes sums exact. Month boundaries are local midnights of
the first day in the ledger's time zone, converted to UTC instants, so DST never bends a sum.

Every month record carries its own watermarks (one per pod, one for the allocation), so booking the
same interval twice books it once, and a crash between writing two month records is repaired by
simply booking again.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from gpuaas.api.usage import MONTH_PATTERN, PodWatermark, UsageLedger
from gpuaas.domain.dra import recorded_claim_devices, recorded_shared_claims
from gpuaas.domain.fence import USAGE_FINALIZER
from gpuaas.domain.fence import pod_gpus as fenced_pod_gpus

TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_SECOND = timedelta(seconds=1)
_HOURS_QUANTUM = Decimal("0.001")

TimeZoneLike = str | ZoneInfo


# --- instants and months ---------------------------------------------------------------------------


def to_epoch(instant: datetime) -> int:
    """Whole seconds since the epoch, flooring any fraction. Naive datetimes are refused."""
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"naive datetime {instant!r}: ledger instants must be timezone-aware")
    return (instant - _EPOCH) // _ONE_SECOND


def from_epoch(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


@lru_cache(maxsize=64)
def _zone_named(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _zone(tz: TimeZoneLike) -> ZoneInfo:
    return tz if isinstance(tz, ZoneInfo) else _zone_named(tz)


def parse_month(month: str) -> tuple[int, int]:
    """("2026-10") -> (2026, 10); anything else is a ValueError."""
    if not re.fullmatch(MONTH_PATTERN, month):
        raise ValueError(f"month {month!r} is not YYYY-MM")
    return int(month[:4]), int(month[5:7])


def _format_month(year: int, month: int) -> str:
    return f"{year:04d}-{month:02d}"


def _next_month(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def _previous_month(year: int, month: int) -> tuple[int, int]:
    return (year - 1, 12) if month == 1 else (year, month - 1)


@lru_cache(maxsize=1024)
def _month_start(year: int, month: int, zone: ZoneInfo) -> int:
    return to_epoch(datetime(year, month, 1, tzinfo=zone))


# zone -> ((year, month), start, end) of the month last looked up: nearly every booking falls in the current one.
# A lookup replaces the whole tuple, so threads that book at once read one month's bounds or another's, never a mix.
_last_month: dict[ZoneInfo, tuple[tuple[int, int], int, int]] = {}


def _month_of_epoch(seconds: int, zone: ZoneInfo) -> tuple[int, int]:
    last = _last_month.get(zone)
    if last is not None and last[1] <= seconds < last[2]:
        return last[0]
    local = from_epoch(seconds).astimezone(zone)
    year, month = local.year, local.month
    # Guard zones whose month starts fall into a DST gap: the bounds, not the wall clock, decide.
    if seconds < _month_start(year, month, zone):
        year, month = _previous_month(year, month)
    elif seconds >= _month_start(*_next_month(year, month), zone):
        year, month = _next_month(year, month)
    _last_month[zone] = ((year, month), _month_start(year, month, zone), _month_start(*_next_month(year, month), zone))
    return year, month


def month_of(instant: datetime, tz: TimeZoneLike) -> str:
    """The calendar month, "YYYY-MM", that holds `instant` in time zone `tz`."""
    return _format_month(*_month_of_epoch(to_epoch(instant), _zone(tz)))


def month_bounds(month: str, tz: TimeZoneLike) -> tuple[datetime, datetime]:
    """The half-open span [start, end) of `month` in `tz`, as UTC datetimes (safe to subtract)."""
    zone = _zone(tz)
    year, number = parse_month(month)
    return from_epoch(_month_start(year, number, zone)), from_epoch(_month_start(*_next_month(year, number), zone))


def _months_spanning(start: int, end: int, zone: ZoneInfo) -> list[tuple[str, int, int]]:
    """(month, month_start, month_end) for every month overlapping [start, end); empty if end <= start."""
    if end <= start:
        return []
    year, month = _month_of_epoch(start, zone)
    spans: list[tuple[str, int, int]] = []
    month_start = _month_start(year, month, zone)
    while month_start < end:
        following = _next_month(year, month)
        month_end = _month_start(*following, zone)
        spans.append((_format_month(year, month), month_start, month_end))
        (year, month), month_start = following, month_end
    return spans


@lru_cache(maxsize=1024)
def _day_start(day: date, zone: ZoneInfo) -> int:
    return to_epoch(datetime(day.year, day.month, day.day, tzinfo=zone))


# zone -> the last day `_days_spanning` found ("DD", start, end): most bookings fall within today. Replaced whole,
# like `_last_month`.
_last_day: dict[ZoneInfo, tuple[str, int, int]] = {}


def _days_spanning(start: int, end: int, zone: ZoneInfo) -> list[tuple[str, int, int]]:
    """(day of the month "DD", day_start, day_end) for every local day overlapping [start, end)."""
    if end <= start:
        return []
    last = _last_day.get(zone)
    if last is not None and last[1] <= start and end <= last[2]:
        return [last]
    day = from_epoch(start).astimezone(zone).date()
    day_start = _day_start(day, zone)
    if day_start > start:  # a midnight in a DST gap: the bounds, not the wall clock, decide
        day -= timedelta(days=1)
        day_start = _day_start(day, zone)
    spans: list[tuple[str, int, int]] = []
    while day_start < end:
        following = day + timedelta(days=1)
        day_end = _day_start(following, zone)
        spans.append((f"{day.day:02d}", day_start, day_end))
        day, day_start = following, day_end
    _last_day[zone] = spans[-1]
    return spans


def _add_by_day(daily: dict[str, int], start: int, end: int, weight: int, zone: ZoneInfo) -> None:
    """Add weight x the seconds of [start, end) to each local day they fall on; the parts sum to the whole."""
    for day, day_start, day_end in _days_spanning(start, end, zone):
        seconds = min(end, day_end) - max(start, day_start)
        if seconds > 0:
            daily[day] = daily.get(day, 0) + weight * seconds


def split_by_month(start: datetime, end: datetime, tz: TimeZoneLike) -> list[tuple[str, int]]:
    """Seconds of [start, end) in each month it touches; they sum to exactly end - start (whole seconds)."""
    first, last = to_epoch(start), to_epoch(end)
    return [
        (month, min(last, month_end) - max(first, month_start))
        for month, month_start, month_end in _months_spanning(first, last, _zone(tz))
    ]


def seconds_to_hours(seconds: int) -> Decimal:
    """Hours with 3 decimals, rounded half up: the one rounding rule of the ledger and the report."""
    return (Decimal(seconds) / 3600).quantize(_HOURS_QUANTUM, rounding=ROUND_HALF_UP)


# --- inputs and outputs of book_up_to -------------------------------------------------------------------


@dataclass(frozen=True)
class PodInterval:
    """One GPU pod: `gpus` held from `start` until `end` (None while it still runs).

    `end` may lie after now: a pod being deleted whose containers have not terminated yet ends at the
    latest at its kill deadline. `book_up_to` books such a pod only up to now and does not release it.
    """

    uid: str
    gpus: int
    start: datetime
    end: datetime | None = None
    # The end is the pod's kill deadline (deletion request + the grace it was allowed) because the kubelet has not
    # reported a finish. Booked to there, such a pod is counted in the record. Not part of the interval's identity.
    end_is_deadline: bool = field(default=False, compare=False)
    # False for the stretch of a claim that pods share (`shared_claim_spans`): billed, but not counted as a pod.
    is_pod: bool = field(default=True, compare=False)


@dataclass(frozen=True)
class GrantState:
    """The allocation's grant: `gpus` granted from `active_from` until `active_until` (None: still active).

    A grant that changes (resize, suspend, expiry) is booked by flushing the old state up to the moment
    of change, then flushing the new state from then on; the watermarks make the seam exact. A
    suspended grant is GrantState(0, ...): it books no granted and no idle time.
    """

    gpus: int
    active_from: datetime
    active_until: datetime | None = None
    # Of `gpus`, those on hardware that was down (domain/downtime.py): booked as the grant's downtime credit.
    down_gpus: int = 0


@dataclass(frozen=True)
class Booking:
    records: dict[str, UsageLedger]
    """The month records that changed, by month; write each one back (they are independent)."""
    created: frozenset[str]
    """Months in `records` that had no record yet: create them rather than update."""
    released: tuple[str, ...]
    """Uids of ended pods whose whole interval is booked in every month it touches.

    A pod whose end is still ahead of now (being deleted, not yet terminated) is never among them.
    Remove their finalizers only after every record in `records` is written: until then the booking
    exists only in memory.
    """


@dataclass(frozen=True)
class _Span:
    uid: str
    gpus: int
    start: int
    end: int | None
    booked_to: int
    """End of what may be booked now: the pod's end, or now while it runs (never past now)."""
    end_is_deadline: bool = False
    is_pod: bool = True


def _spans(pods: Iterable[PodInterval], now: int) -> list[_Span]:
    spans = []
    for pod in pods:
        start = to_epoch(pod.start)
        end = None if pod.end is None else max(start, to_epoch(pod.end))
        booked_to = now if end is None else min(end, now)
        spans.append(_Span(pod.uid, pod.gpus, start, end, max(start, booked_to), pod.end_is_deadline, pod.is_pod))
    return spans


def _grant_span(grant: GrantState | None, now: int) -> tuple[int, int] | None:
    if grant is None:
        return None
    start = to_epoch(grant.active_from)
    end = now if grant.active_until is None else min(now, to_epoch(grant.active_until))
    return (start, end) if end > start else None


def months_touched(pods: Sequence[PodInterval], grant: GrantState | None, now: datetime, tz: TimeZoneLike) -> list[str]:
    """The months `book_up_to` may book into: pass every existing record of these months to it."""
    zone = _zone(tz)
    now_epoch = to_epoch(now)
    months: set[str] = set()
    grant_span = _grant_span(grant, now_epoch)
    if grant_span is not None:
        months.update(month for month, _, _ in _months_spanning(*grant_span, zone))
    for span in _spans(pods, now_epoch):
        if span.gpus > 0:
            months.update(month for month, _, _ in _months_spanning(span.start, span.booked_to, zone))
    return sorted(months)


# --- sweeps ----------------------------------------------------------------------------------------


def _clip(intervals: Iterable[tuple[int, int]], low: int, high: int) -> list[tuple[int, int]]:
    return [(max(start, low), min(end, high)) for start, end in intervals if min(end, high) > max(start, low)]


def _covered_seconds(intervals: Iterable[tuple[int, int]], low: int, high: int) -> int:
    """Length of the union of `intervals` inside [low, high)."""
    covered = 0
    reach = low
    for start, end in sorted(_clip(intervals, low, high)):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


def _peak(weighted: Iterable[tuple[int, int, int]], low: int, high: int) -> int:
    """Largest sum of weights of half-open intervals open at one instant inside [low, high)."""
    events: list[tuple[int, int]] = []
    for start, end, weight in weighted:
        clipped_start, clipped_end = max(start, low), min(end, high)
        if clipped_end > clipped_start:
            events.append((clipped_start, weight))
            events.append((clipped_end, -weight))
    # At equal instants closings sort first (negative weights), so [a, b) and [b, c) never overlap.
    events.sort()
    peak = running = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


# --- booking ---------------------------------------------------------------------------------------


def _copy_to_book(ledger: UsageLedger) -> UsageLedger:
    """A copy that booking may change: the containers it changes are copied (a deep copy took a third of the
    booking's time); watermarks are replaced, never changed, and the history is not touched."""
    return ledger.model_copy(
        update={
            "pods": dict(ledger.pods),
            "daily_used_gpu_seconds": dict(ledger.daily_used_gpu_seconds),
            "daily_granted_gpu_seconds": dict(ledger.daily_granted_gpu_seconds),
        }
    )


def _book_month(
    previous: UsageLedger | None,
    month_start: int,
    month_end: int,
    spans: Sequence[_Span],
    grant: GrantState | None,
    grant_span: tuple[int, int] | None,
    now: int,
    zone: ZoneInfo,
) -> UsageLedger:
    status = UsageLedger() if previous is None else _copy_to_book(previous)
    window_end = min(now, month_end)

    # (a) and (e): each pod from its own watermark in this month.
    for span in spans:
        start, end = max(span.start, month_start), min(span.booked_to, month_end)
        if end <= start:
            continue
        watermark = status.pods.get(span.uid)
        if watermark is None:
            status.pod_count += span.is_pod
            booked_from = start
        else:
            booked_from = max(start, to_epoch(watermark.booked_until))
        if end > booked_from:
            status.used_gpu_seconds += span.gpus * (end - booked_from)
            _add_by_day(status.daily_used_gpu_seconds, booked_from, end, span.gpus, zone)
            status.pods[span.uid] = PodWatermark(gpus=span.gpus, booked_until=from_epoch(end))
            if span.end_is_deadline and end == span.end:  # the watermark reaches the end once: counted once
                status.pods_billed_to_deadline += 1

    # (b) and (c): granted and idle time from the allocation's watermark in this month.
    booked_until = month_start if status.booked_until is None else max(month_start, to_epoch(status.booked_until))
    if window_end > booked_until:
        if grant is not None and grant_span is not None:
            active_start, active_end = max(booked_until, grant_span[0]), min(window_end, grant_span[1])
            if active_end > active_start:
                active = active_end - active_start
                status.granted_gpu_seconds += grant.gpus * active
                _add_by_day(status.daily_granted_gpu_seconds, active_start, active_end, grant.gpus, zone)
                status.granted_gpus = grant.gpus
                status.down_gpu_seconds += min(grant.down_gpus, grant.gpus) * active
                if grant.gpus > 0:  # a grant of nothing (suspended) cannot sit idle
                    busy = _covered_seconds(((span.start, span.booked_to) for span in spans), active_start, active_end)
                    status.idle_seconds += active - busy
        status.booked_until = from_epoch(window_end)

    # (d): a maximum, so re-sweeping time already seen is harmless.
    status.peak_gpus_in_use = max(
        status.peak_gpus_in_use,
        _peak(((span.start, span.booked_to, span.gpus) for span in spans), month_start, window_end),
    )
    status.used_gpu_hours = str(seconds_to_hours(status.used_gpu_seconds))
    status.granted_gpu_hours = str(seconds_to_hours(status.granted_gpu_seconds))
    return status


def _fully_booked(span: _Span, final: Mapping[str, UsageLedger], zone: ZoneInfo) -> bool:
    if span.end is None or span.booked_to < span.end:
        return False
    for month, _, month_end in _months_spanning(span.start, span.end, zone):
        record = final.get(month)
        if record is None:
            return False
        owed_until = min(span.end, month_end)
        watermark = record.pods.get(span.uid)
        if watermark is None or to_epoch(watermark.booked_until) < owed_until:
            return False
        if record.booked_until is None or to_epoch(record.booked_until) < owed_until:
            return False
    return True


def book_up_to(
    records: Mapping[str, UsageLedger],
    pods: Sequence[PodInterval],
    grant: GrantState | None,
    now: datetime,
    tz: TimeZoneLike,
) -> Booking:
    """Book everything owed up to `now` into the month records of one allocation.

    `records` must hold every existing record of the allocation for the months `months_touched`
    names; a month missing from it is taken as never booked. `pods` are the allocation's pods that
    still exist; an end after `now` is booked up to `now` and stays open (the pod is not released).
    `grant` is None once the allocation is gone. Per month it books (a) each pod's
    GPU-seconds past its watermark, (b) granted GPU-seconds and (c) idle seconds past the
    allocation's watermark, (d) the peak of GPUs in use and (e) the count of pods seen. Flushing again
    with the returned records books nothing more.
    """
    zone = _zone(tz)
    now_epoch = to_epoch(now)
    spans = [span for span in _spans(pods, now_epoch) if span.gpus > 0]
    grant_span = _grant_span(grant, now_epoch)

    changed: dict[str, UsageLedger] = {}
    created: set[str] = set()
    final: dict[str, UsageLedger] = dict(records)
    for month in months_touched(pods, grant, now, zone):
        year, number = parse_month(month)
        month_start, month_end = _month_start(year, number, zone), _month_start(*_next_month(year, number), zone)
        previous = records.get(month)
        booked = _book_month(previous, month_start, month_end, spans, grant, grant_span, now_epoch, zone)
        final[month] = booked
        if previous is None:
            created.add(month)
            changed[month] = booked
        elif booked != previous:
            changed[month] = booked

    released = []
    for span in _spans(pods, now_epoch):
        ended = span.end is not None and span.booked_to >= span.end
        if (span.gpus <= 0 and ended) or (span.gpus > 0 and _fully_booked(span, final, zone)):
            released.append(span.uid)
    return Booking(records=changed, created=frozenset(created), released=tuple(sorted(released)))


def prune(record: UsageLedger, live_uids: Iterable[str]) -> UsageLedger:
    """The record without watermarks of pods that no longer exist (their intervals are fully booked).

    Call it only with uids from a fresh read of the API: a pod pruned while it still exists would be
    booked again from its start.
    """
    live = set(live_uids)
    kept = {uid: watermark for uid, watermark in record.pods.items() if uid in live}
    if len(kept) == len(record.pods):
        return record
    return record.model_copy(update={"pods": kept})


# --- pods ------------------------------------------------------------------------------------------


def parse_timestamp(value: object) -> datetime | None:
    """A Kubernetes timestamp (or a datetime) as an aware datetime; None when absent."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        parsed = datetime.fromisoformat(value)
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    return None


def pod_gpus(spec: Mapping[str, Any]) -> int:
    """Effective GPU request of a pod spec, as the fence counts it; a malformed quantity books nothing
    (the fence refuses such pods at admission)."""
    try:
        return fenced_pod_gpus({"spec": spec})
    except ValueError:
        return 0


def billed_pod_gpus(pod: Mapping[str, Any]) -> int:
    """The pod's GPUs as the ledger bills them: nvidia.com/gpu, plus the DRA devices recorded at its admission."""
    return pod_gpus(pod.get("spec") or {}) + sum(recorded_claim_devices(pod.get("metadata") or {}).values())


def _container_statuses(status: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]


def _states(container_status: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [container_status.get("state") or {}, container_status.get("lastState") or {}]


def _pod_start(status: Mapping[str, Any]) -> datetime | None:
    starts = []
    for container_status in _container_statuses(status):
        for state in _states(container_status):
            for kind in ("running", "terminated"):
                started = parse_timestamp((state.get(kind) or {}).get("startedAt"))
                if started is not None:
                    starts.append(started)
    if starts:
        return min(starts, key=to_epoch)
    if status.get("phase") == "Running":
        return parse_timestamp(status.get("startTime"))
    return None


def _pod_finish(status: Mapping[str, Any]) -> datetime | None:
    finishes = []
    for container_status in _container_statuses(status):
        for state in _states(container_status):
            finished = parse_timestamp((state.get("terminated") or {}).get("finishedAt"))
            if finished is not None:
                finishes.append(finished)
    if finishes:
        return max(finishes, key=to_epoch)
    transitions = [parse_timestamp(condition.get("lastTransitionTime")) for condition in status.get("conditions") or []]
    known = [moment for moment in transitions if moment is not None]
    return max(known, key=to_epoch) if known else None


def _containers_terminated(status: Mapping[str, Any]) -> bool:
    """Every container has terminated and none (not even a sidecar init container) runs."""
    containers = status.get("containerStatuses") or []
    if not containers or any((c.get("state") or {}).get("running") is not None for c in _container_statuses(status)):
        return False
    return all((c.get("state") or {}).get("terminated") is not None for c in containers)


def pod_interval_from_pod(pod: Mapping[str, Any]) -> PodInterval | None:
    """The pod's GPU interval, or None if it never started.

    start: the earliest container start (falling back to status.startTime for a Running pod).
    end: when the pod's GPUs are released, not when its deletion was asked for:
    - a terminal pod, or a pod being deleted whose containers have all terminated: its last container
      finish (a pod not being deleted may restart terminated containers, so only its phase counts);
    - a pod being deleted holds its GPUs at most until its deletionTimestamp, the moment the kubelet
      kills it (request + grace; the request itself for a force deletion), so the end is never later.
      Until its containers are reported terminated, the end is that deadline, which may lie after now:
      `book_up_to` then books up to now and keeps the pod (and its finalizer) until now passes it.
    The kubelet's final delete (grace 0) moves the deletionTimestamp back, since kubernetes#122646 (in
    1.36, not in 1.32) only as far as its own moment, after the reported finish: so the end does not
    depend on whether gpuaas saw the pod before or after it (unless the finish was reported past the
    deadline, by finishedAt's rounding; seen after the final delete that finish, not the deadline, ends it).
    """
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    start = _pod_start(status)
    if start is None:
        return None

    ends: list[datetime] = []
    deletion = parse_timestamp(metadata.get("deletionTimestamp"))
    finished = status.get("phase") in TERMINAL_PHASES or (deletion is not None and _containers_terminated(status))
    finish = (_pod_finish(status) or start) if finished else None
    if finish is not None:
        ends.append(finish)
    if deletion is not None:
        ends.append(deletion)
    end = None
    if ends:
        end = from_epoch(max(to_epoch(start), min(to_epoch(moment) for moment in ends)))
    at_deadline = deletion is not None and finish is None
    uid = str(metadata.get("uid", ""))
    return PodInterval(uid=uid, gpus=billed_pod_gpus(pod), start=start, end=end, end_is_deadline=at_deadline)


@dataclass(frozen=True)
class LedgerPod:
    """A GPU pod of an allocation's namespace as the ledger sees it."""

    name: str
    namespace: str
    uid: str
    interval: PodInterval | None
    has_finalizer: bool
    # Terminal phase or being deleted: the pod's interval has an end. Its finalizer is removed only once
    # `book_up_to` releases it, i.e. once now has passed that end (a pod being deleted that has not terminated
    # yet ends at its kill deadline, still ahead) and the whole interval is booked.
    finished: bool
    # The object is gone: its last state, remembered from the DELETED event (domain/departed.py).
    departed: bool = False
    # (claim uid, devices) of the ResourceClaims it shares with other pods, recorded at its admission.
    shared_claims: tuple[tuple[str, int], ...] = ()
    # Where the usage finalizer sits in the pod's finalizers as last seen: the release removes that entry (after
    # testing that it is still there, on the same pod) with no read of the pod first.
    usage_finalizer_index: int = 0


def ledger_pod(meta: Mapping[str, Any], interval: PodInterval | None, phase: str | None) -> LedgerPod:
    finalizers = list(meta.get("finalizers") or [])
    has_finalizer = USAGE_FINALIZER in finalizers
    return LedgerPod(
        name=str(meta.get("name")),
        namespace=str(meta.get("namespace")),
        uid=str(meta.get("uid")),
        interval=interval,
        has_finalizer=has_finalizer,
        finished=bool(meta.get("deletionTimestamp")) or phase in TERMINAL_PHASES,
        shared_claims=tuple(sorted(recorded_shared_claims(meta).items())),
        usage_finalizer_index=finalizers.index(USAGE_FINALIZER) if has_finalizer else 0,
    )


def shared_claim_spans(pods: Iterable[LedgerPod]) -> list[PodInterval]:
    """A claim that pods share holds its devices while any of them runs (the control plane frees it when the last
    one stops): it is billed once, over the union of its pods' intervals. Each stretch of that union is booked under
    its own uid (`<claim uid>/<start epoch>`), which stays the same while the stretch grows."""
    by_claim: dict[tuple[str, int], list[PodInterval]] = {}
    for pod in pods:
        if pod.interval is None:
            continue
        for claim in pod.shared_claims:
            by_claim.setdefault(claim, []).append(pod.interval)
    spans: list[PodInterval] = []
    for (claim_uid, devices), intervals in sorted(by_claim.items()):
        stretch_start: datetime | None = None
        stretch_end: datetime | None = None
        for interval in sorted(intervals, key=lambda i: to_epoch(i.start)):
            if stretch_start is not None and (stretch_end is None or interval.start <= stretch_end):
                stretch_end = None if stretch_end is None or interval.end is None else max(stretch_end, interval.end)
                continue
            if stretch_start is not None:
                spans.append(_stretch(claim_uid, devices, stretch_start, stretch_end))
            stretch_start, stretch_end = interval.start, interval.end
        if stretch_start is not None:
            spans.append(_stretch(claim_uid, devices, stretch_start, stretch_end))
    return spans


def continued_stretches(stretches: Iterable[PodInterval], records: Iterable[UsageLedger]) -> list[PodInterval]:
    """A stretch whose first pods are gone (released) still began where they began: it keeps the uid and start under
    which the records booked it, when one of them is booked up to (or past) where the pods still here begin.
    Without this, the remaining pods would open a new stretch and book again what was booked."""
    booked: dict[str, list[tuple[int, int]]] = {}  # claim uid -> (stretch start, booked until)
    for record in records:
        for uid, mark in record.pods.items():
            claim_uid, slash, first_text = uid.rpartition("/")
            if slash and first_text.isdigit():
                booked.setdefault(claim_uid, []).append((int(first_text), to_epoch(mark.booked_until)))
    continued = []
    for stretch in stretches:
        claim_uid = stretch.uid.rpartition("/")[0]
        begins = to_epoch(stretch.start)
        earlier = [first for first, until in booked.get(claim_uid, []) if first < begins <= until]
        if earlier:
            first = min(earlier)
            continued.append(replace(stretch, uid=f"{claim_uid}/{first}", start=from_epoch(first)))
        else:
            continued.append(stretch)
    return continued


def _stretch(claim_uid: str, devices: int, start: datetime, end: datetime | None) -> PodInterval:
    return PodInterval(uid=f"{claim_uid}/{to_epoch(start)}", gpus=devices, start=start, end=end, is_pod=False)


def shared_stretch_of(pod: LedgerPod, claim_uid: str, stretches: Iterable[PodInterval]) -> PodInterval | None:
    """The stretch of the shared claim that holds the pod's interval."""
    if pod.interval is None:
        return None
    interval = pod.interval
    prefix = f"{claim_uid}/"
    for stretch in stretches:
        ends_after = stretch.end is None or (interval.end is not None and interval.end <= stretch.end)
        if stretch.uid.startswith(prefix) and stretch.start <= interval.start and ends_after:
            return stretch
    return None
