"""What one pass books for one allocation, and which ledger writes and pod releases follow.

`domain/ledger.py` computes the month records; this module decides when they are written (at most once per flush
interval, at once when a pod ends or the allocation goes), under which record names, and which pods' usage
finalizers may go. Order matters for exactness: the records are written first, the finalizers removed after. A crash
in between leaves pods whose intervals are already booked; the next pass books nothing more for them (every month
record carries its own watermarks) and then releases them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from gpuaas.api.allocation import ALLOCATION_KIND
from gpuaas.api.usage import GpuUsage, GpuUsageSpec, GrantChange, UsageLedger, usage_labels, usage_name
from gpuaas.domain.actions import Action, CreateUsage, PostEvent, ReleasePod, WriteUsageLedger
from gpuaas.domain.departed import WATERMARK_KEEP
from gpuaas.domain.history import UNKNOWN_REQUESTER, is_creation
from gpuaas.domain.ledger import (
    GrantState,
    LedgerPod,
    PodInterval,
    TimeZoneLike,
    book_up_to,
    continued_stretches,
    month_of,
    months_touched,
    prune,
    shared_claim_spans,
    shared_stretch_of,
)


@dataclass(frozen=True)
class WrittenLedger:
    """What this writer last wrote for one allocation: its records by month, and when."""

    records: Mapping[str, GpuUsage] = field(default_factory=dict)
    last_write: datetime | None = None
    quiet: bool = False
    """A flush came due with nothing but time to book, and was put off (`QUIET_FLUSH_FACTOR`)."""


@dataclass(frozen=True)
class BookingPlan:
    booked: dict[str, UsageLedger]
    """Every touched month's ledger as booked up to now, written or not (for live metrics)."""
    actions: list[Action]
    """Record creates and ledger writes first, then the usage finalizers that may go."""
    written: dict[str, GpuUsage]
    """Records by name as they are once `actions` are done, for the writer's memory."""
    needs_live_pods: bool = False
    """Records name pods the index does not: plan again with the uids of the pods that still exist."""
    departures: tuple[str, ...] = ()
    """Departed pods (domain/departed.py) whose last state booked time the records did not hold yet."""
    quiet: bool = False
    """A flush was due, but only time passed (granted, idle, or on pods the record knows): put off, nothing
    written."""


def record_name_for(existing: Mapping[str, GpuUsage], spec: GpuUsageSpec) -> str:
    """The record name: `<allocation>-<month>`, suffixed when an earlier allocation of that name owns it."""
    name = usage_name(spec.allocation, spec.month)
    other = existing.get(name)
    if other is not None and other.spec.allocation_uid != spec.allocation_uid:
        return f"{name}-{spec.allocation_uid[:8]}"
    return name


def _booked_until(statuses: Mapping[str, UsageLedger]) -> dict[str, datetime]:
    """Each pod's latest watermark over the months."""
    latest: dict[str, datetime] = {}
    for status in statuses.values():
        for uid, mark in status.pods.items():
            if uid not in latest or mark.booked_until > latest[uid]:
                latest[uid] = mark.booked_until
    return latest


def _newly_booked(pod: LedgerPod, booked_before: Mapping[str, datetime]) -> bool:
    before = booked_before.get(pod.uid)
    return pod.interval is not None and pod.interval.end is not None and (before is None or before < pod.interval.end)


def _unbooked_sharers(
    pods: Sequence[LedgerPod], stretches: Sequence[PodInterval], booked: Mapping[str, UsageLedger]
) -> set[str]:
    """Uids of ended pods whose shared claims are not booked up to their end yet."""
    booked_until = _booked_until(booked)
    waiting = set()
    for pod in pods:
        if pod.interval is None or pod.interval.end is None:
            continue
        for claim_uid, _ in pod.shared_claims:
            stretch = shared_stretch_of(pod, claim_uid, stretches)
            until = booked_until.get(stretch.uid) if stretch is not None else None
            if until is None or until < pod.interval.end:
                waiting.add(pod.uid)
    return waiting


def unrecorded_changes(
    changes: Sequence[GrantChange], allocation_uid: str, records: Sequence[GpuUsage]
) -> list[GrantChange]:
    """The changes no record of the allocation holds yet. A change nobody was seen to make is dated when it was
    noticed, so it is the same change whatever its date."""
    held = [entry for r in records if r.spec.allocation_uid == allocation_uid for entry in r.ledger.history]
    return [
        change
        for change in changes
        if not any(
            (entry.by, entry.changes) == (change.by, change.changes)
            and (entry.at == change.at or change.by == UNKNOWN_REQUESTER)
            for entry in held
        )
    ]


def _add_changes(
    changes: Sequence[GrantChange],
    identity: GpuUsageSpec,
    indexed: Mapping[str, GpuUsage],
    ledger: WrittenLedger,
    tz: TimeZoneLike,
    current: dict[str, GpuUsage],
    statuses: Mapping[str, UsageLedger],
    to_write: dict[str, UsageLedger],
) -> None:
    """Add each change to the record of its month in `to_write` (and to `current` if no month booked it)."""
    for change in changes:
        month = month_of(change.at, tz)
        if month not in current:
            spec = identity.model_copy(update={"month": month})
            name = record_name_for(indexed, spec)
            current[month] = ledger.records.get(month) or indexed.get(name) or GpuUsage(name=name, spec=spec)
        base = to_write.get(month) or statuses.get(month) or current[month].ledger
        to_write[month] = base.model_copy(update={"history": [*base.history, change]})


# A record whose only news is time (granted or idle time, and the GPU-seconds of pods it already holds a watermark for,
# with their GPUs unchanged; no pod started or ended, no hardware was down, nothing else changed, its month goes on) is
# written this many flush intervals apart: every allocation's record each minute was most of the API server's write
# load at thousands of allocations. Nothing is at risk meanwhile: that time follows from what outlives this process,
# the grant (the allocation's status, whose every change is written at once), the pods (each kept by the usage
# finalizer until its end is written) and the record's watermarks, so a later booking, by any replica, books it.
# Starts, ends, new GPU counts and downtime credit depend on what was seen live, and keep the flush interval.
QUIET_FLUSH_FACTOR = 10
# What booking moves on when only time passed under the grant and unchanged pods, with no hardware down. The grant's
# GPUs among them: a grant is the allocation's status, and a change of one writes what the old grant booked at once
# (`force`); a new allocation's record, created before its grant booked any time, would otherwise be written again
# at its first flush only to say how many GPUs the grant has.
_TIME_ONLY_FIELDS = (
    "granted_gpus",
    "granted_gpu_seconds",
    "granted_gpu_hours",
    "daily_granted_gpu_seconds",
    "idle_seconds",
    "used_gpu_seconds",
    "used_gpu_hours",
    "daily_used_gpu_seconds",
    "booked_until",
)


def _same_pods(booked: UsageLedger, known: UsageLedger) -> bool:
    """The same pods with the same GPUs; their watermarks may have moved on."""
    return booked.pods.keys() == known.pods.keys() and all(
        watermark.gpus == known.pods[uid].gpus for uid, watermark in booked.pods.items()
    )


def flush_due(ledger: WrittenLedger, now: datetime, interval: timedelta) -> bool:
    return ledger.last_write is None or now - ledger.last_write >= interval


def quiet_flush(
    ledger: WrittenLedger,
    before: Mapping[str, UsageLedger],
    after: Mapping[str, UsageLedger],
    now: datetime,
    tz: TimeZoneLike,
    interval: timedelta,
) -> bool:
    """Whether a due flush may be put off: the booking since the last write holds nothing but time that follows from
    the grant and the pods the record knows, in the month that goes on (no pod started or ended, no record to create,
    no month to close), and the last write is less than `QUIET_FLUSH_FACTOR` intervals old."""
    if flush_due(ledger, now, interval * QUIET_FLUSH_FACTOR):
        return False
    current = month_of(now, tz)
    for month, booked in after.items():
        known = before.get(month)
        if month != current or known is None:
            return False
        if not _same_pods(booked, known):
            return False
        unchanged = {name: getattr(known, name) for name in _TIME_ONLY_FIELDS}
        if booked.model_copy(update={**unchanged, "pods": known.pods}) != known:
            return False
    return True


def plan_booking(
    identity: GpuUsageSpec,
    indexed: Mapping[str, GpuUsage],
    ledger: WrittenLedger,
    pods: Sequence[LedgerPod],
    grant: GrantState | None,
    now: datetime,
    tz: TimeZoneLike,
    flush_interval: timedelta,
    force: bool = False,
    live_pod_uids: frozenset[str] | None = None,
    changes: Sequence[GrantChange] = (),
) -> BookingPlan:
    """Book one allocation up to `now`. `identity` is the record spec without month; `indexed` holds the records the
    index has (by name), `ledger` those this writer wrote (the index may lag them). `force` writes now (release).
    `changes` are the allocation's grant-history entries (domain/history.py): each one no record holds yet is
    added to the record of its month, and written at once."""
    stretches = shared_claim_spans(pods)
    if stretches:  # whatever month the records booked a stretch in: it may have begun in an earlier one
        known_records = [*indexed.values(), *ledger.records.values()]
        stretches = continued_stretches(
            stretches, [r.ledger for r in known_records if r.spec.allocation_uid == identity.allocation_uid]
        )
    intervals = [pod.interval for pod in pods if pod.interval is not None] + stretches
    current: dict[str, GpuUsage] = {}
    for month in months_touched(intervals, grant, now, tz):
        spec = identity.model_copy(update={"month": month})
        name = record_name_for(indexed, spec)
        known = ledger.records.get(month) or indexed.get(name)
        current[month] = known if known is not None else GpuUsage(name=name, spec=spec)
    statuses = {m: r.ledger for m, r in current.items() if r.name in indexed or m in ledger.records}
    due = force or flush_due(ledger, now, flush_interval)

    pruned: set[str] = set()
    known_uids = {pod.uid for pod in pods} | {stretch.uid for stretch in stretches}
    # Watermarks of pods that are gone are kept a while (domain/departed.py), then pruned if a fresh read agrees.
    kept_since = now - WATERMARK_KEEP
    gone = {
        uid
        for status in statuses.values()
        for uid, mark in status.pods.items()
        if uid not in known_uids and mark.booked_until <= kept_since
    }
    if due and gone:
        if live_pod_uids is None:
            return BookingPlan(booked={}, actions=[], written={}, needs_live_pods=True)
        for month, status in list(statuses.items()):
            kept = prune(status, set(status.pods) - (gone - live_pod_uids))
            if kept != status:
                statuses[month] = kept
                pruned.add(month)

    # Only departed pods need it; every pass books every allocation, so skip the walk over the watermarks otherwise.
    booked_before = _booked_until(statuses) if any(p.departed for p in pods) else {}
    result = book_up_to(statuses, intervals, grant, now, tz)
    to_write = dict(result.records)
    for month in pruned - set(to_write):
        to_write[month] = statuses[month]
    released = set(result.released) - (  # a pod sharing a claim goes once the claim's stretch is booked to its end
        _unbooked_sharers(pods, stretches, {**statuses, **result.records}) if stretches else set()
    )
    finished_unbooked = [p for p in pods if p.has_finalizer and p.finished and p.interval is None]
    departures = tuple(p.name for p in pods if p.departed and p.uid in released and _newly_booked(p, booked_before))
    ending = any(p.has_finalizer and p.finished and p.uid in released for p in pods) or bool(
        finished_unbooked or departures
    )
    new_changes = unrecorded_changes(changes, identity.allocation_uid, [*indexed.values(), *ledger.records.values()])
    _add_changes(new_changes, identity, indexed, ledger, tz, current, statuses, to_write)
    booked = {**statuses, **to_write}
    quiet = due and not force and not pruned and quiet_flush(ledger, statuses, to_write, now, tz, flush_interval)
    if to_write and (quiet or not due) and not (ending or new_changes):
        # In memory only; written at the next due flush.
        return BookingPlan(booked=booked, actions=[], written={}, quiet=quiet)

    actions: list[Action] = []
    written: dict[str, GpuUsage] = {}
    for month, booked_month in sorted(to_write.items()):
        record = current[month]
        written[record.name] = record.model_copy(update={"ledger": booked_month})
        if record.name not in indexed and month not in ledger.records:
            actions.append(CreateUsage(written[record.name]))
        else:
            dropped = tuple(sorted(set(record.ledger.pods) - set(booked_month.pods)))
            actions.append(WriteUsageLedger(record.name, booked_month, dropped, usage_labels(record.spec)))
    # `kubectl describe` shows them beside the latest stamp. Not a create: the allocation's first phase event marks
    # it, and its stamp names who asked; a second event for every new allocation would cost a write in a burst.
    for change in (change for change in new_changes if not is_creation(change)):
        message = f"{change.by}: {'; '.join(change.changes)}"
        actions.append(
            PostEvent(ALLOCATION_KIND, identity.allocation, identity.allocation_uid, "GrantChanged", message)
        )
    for pod in pods:
        if pod.has_finalizer and pod.finished and (pod.uid in released or pod.interval is None):
            actions.append(ReleasePod(pod.namespace, pod.name, pod.uid, pod.usage_finalizer_index))
    return BookingPlan(booked=booked, actions=actions, written=written, departures=departures)
