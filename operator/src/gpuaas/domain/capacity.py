"""Admission of a pool's allocations against its grantable GPUs, and the waiting queue.

Every call recomputes the decisions from the whole set of the pool's allocations (level-triggered).
The caller runs it for one pool at a time on a single thread and writes the grants back, so two
allocations applied at once can never both be admitted into the last GPUs.

Rules:
- Admitted allocations keep their grant: there is no preemption. When healthy capacity drops below
  the granted sum the pool is overcommitted (reported in the summary) and nothing new is admitted
  where it would not fit.
- An allocation consumes capacity only during its window [start, end). A new one is admitted when,
  at every instant of its remaining window, the overlapping grants plus its own GPUs fit in the
  capacity (an interval sweep). Capacity is assumed constant into the future.
- Expired, suspended and deleting allocations hold nothing.
- New allocations are considered in queue order: priority (higher first), creation time, name.

Backfill, not strict head-of-line: when the head of the queue does not fit, smaller allocations
behind it are still admitted if they fit. The program's first rule is that idle GPUs go to the
waiting list; with fixed lease windows a big grant that does not fit now can only start when GPUs
free up early (deletion, suspension, repaired nodes), and blocking every lab of 8-64 GPUs behind a
1,024-GPU request would leave thousands of GPUs idle for months. Freed GPUs always go to the head
first, because every recomputation walks the queue in order; the program office raises `priority`
when a large grant must not wait behind backfilled ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from gpuaas.api.allocation import Phase


@dataclass(frozen=True)
class AllocationDemand:
    """What admission needs to know about one allocation of the pool."""

    name: str
    uid: str
    gpus: int
    priority: int
    created: datetime
    start: datetime
    end: datetime
    # GPUs admission already reserved for it (status.grantedGPUs when admitted), 0 if none.
    granted_gpus: int = 0
    suspended: bool = False
    deleting: bool = False

    @property
    def queue_key(self) -> tuple[int, datetime, str]:
        return (-self.priority, self.created, self.name)


@dataclass(frozen=True)
class AdmissionDecision:
    name: str
    uid: str
    admitted: bool
    phase: Phase
    granted_gpus: int
    queue_position: int | None
    message: str


@dataclass(frozen=True)
class PoolSummary:
    capacity_gpus: int
    granted_gpus: int
    """Granted GPUs whose window contains now."""
    available_gpus: int
    queued: int
    scheduled: int
    active: int
    overcommitted_gpus: int
    """How far, at worst from now on, admitted grants exceed the capacity (0 when they fit)."""


@dataclass(frozen=True)
class AdmissionResult:
    decisions: dict[str, AdmissionDecision]
    summary: PoolSummary

    def ordered(self) -> list[AdmissionDecision]:
        return sorted(self.decisions.values(), key=lambda d: d.name)


@dataclass(frozen=True)
class _Grant:
    name: str
    gpus: int
    start: datetime
    end: datetime


def _peak(grants: Iterable[_Grant], start: datetime, end: datetime, exclude: str | None = None) -> int:
    """Highest sum of grants active at any instant of [start, end)."""
    base = 0
    events: list[tuple[datetime, int]] = []
    for grant in grants:
        if grant.name == exclude or grant.gpus == 0 or grant.end <= start or grant.start >= end:
            continue
        if grant.start <= start:
            base += grant.gpus
        else:
            events.append((grant.start, grant.gpus))
        if grant.end < end:
            events.append((grant.end, -grant.gpus))
    # Ends sort before starts at the same instant: windows are half-open.
    events.sort()
    peak = current = base
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def _active_at(grants: Iterable[_Grant], instant: datetime, exclude: str | None = None) -> int:
    return sum(g.gpus for g in grants if g.name != exclude and g.start <= instant < g.end)


def _window_text(start: datetime, end: datetime, now: datetime) -> str:
    if start > now:
        return f" from {start.isoformat()} to {end.isoformat()}"
    return ""


def admit(capacity_gpus: int, allocations: Iterable[AllocationDemand], now: datetime) -> AdmissionResult:
    """Decide, for every allocation of one pool, whether it holds GPUs now and what its phase is."""
    capacity = max(capacity_gpus, 0)
    demands = sorted(allocations, key=lambda a: a.queue_key)
    decisions: dict[str, AdmissionDecision] = {}
    grants: dict[str, _Grant] = {}
    live: list[AllocationDemand] = []

    for demand in demands:
        released = _released_phase(demand, now)
        if released is not None:
            phase, message = released
            decisions[demand.name] = AdmissionDecision(demand.name, demand.uid, False, phase, 0, None, message)
            continue
        live.append(demand)
        if demand.granted_gpus > 0:
            # No preemption; a shrink takes effect at once and frees the difference.
            kept = min(demand.granted_gpus, demand.gpus)
            grants[demand.name] = _Grant(demand.name, kept, demand.start, demand.end)

    # Grants active now, and how many grants start later, kept up to date as grants are added. Most windows start
    # now: for them the lower bound in `others_peak` is O(1) instead of a walk over every grant, and while no other
    # grant starts later (load only falls from now on) it is the peak itself, so admitting a burst of new
    # allocations costs no sweep each.
    active_now = _active_at(grants.values(), now)
    starting_later = sum(1 for g in grants.values() if g.gpus > 0 and g.start > now)

    def others_peak(demand: AllocationDemand) -> int:
        """GPUs other grants hold at their peak in the demand's window, or a lower bound of it that already leaves
        too little room: the grants at the window's first instant, which spare most waiting allocations the sweep."""
        window_start = max(demand.start, now)
        held = grants.get(demand.name)
        if window_start == now:
            others = active_now - (held.gpus if held is not None and held.start <= now < held.end else 0)
            if starting_later == 0:  # (its own grant, if any, started by now too: it has the demand's start)
                return others
        else:
            others = _active_at(grants.values(), window_start, exclude=demand.name)
        if others + demand.gpus <= capacity:
            others = _peak(grants.values(), window_start, demand.end, exclude=demand.name)
        return others

    position = 0
    waiting: list[tuple[AllocationDemand, int, int]] = []
    for demand in live:
        held = grants.get(demand.name)
        held_gpus = held.gpus if held else 0
        if held_gpus < demand.gpus:
            if others_peak(demand) + demand.gpus <= capacity:
                if demand.start <= now < demand.end:
                    active_now += demand.gpus - (held.gpus if held is not None and held.start <= now < held.end else 0)
                starting_later += (demand.start > now) - (held is not None and held.gpus > 0 and held.start > now)
                grants[demand.name] = _Grant(demand.name, demand.gpus, demand.start, demand.end)
                held_gpus = demand.gpus
            else:
                position += 1
                waiting.append((demand, held_gpus, position))
                continue
        decisions[demand.name] = _granted(demand, held_gpus, now)

    # What a waiting allocation is told is free counts every grant of this pass, also those that later,
    # smaller allocations got after its turn: so the message does not change on the next, identical pass.
    for demand, held_gpus, place in waiting:
        free = max(capacity - others_peak(demand), 0)
        decisions[demand.name] = _waiting(demand, held_gpus, free, capacity, place, now)
    return AdmissionResult(decisions=decisions, summary=_summary(capacity, grants, decisions, now))


def _released_phase(demand: AllocationDemand, now: datetime) -> tuple[Phase, str] | None:
    if demand.deleting:
        return "Terminating", "being deleted; its GPUs are back in the pool"
    if now >= demand.end:
        return "Expired", f"window ended at {demand.end.isoformat()}; its GPUs are back in the pool"
    if demand.suspended:
        return "Suspended", "suspended; set spec.suspend to false to queue for GPUs again"
    return None


def _granted(demand: AllocationDemand, gpus: int, now: datetime) -> AdmissionDecision:
    if now < demand.start:
        return AdmissionDecision(
            demand.name,
            demand.uid,
            True,
            "Scheduled",
            gpus,
            None,
            f"{gpus} GPUs reserved from {demand.start.isoformat()} to {demand.end.isoformat()}",
        )
    return AdmissionDecision(
        demand.name, demand.uid, True, "Active", gpus, None, f"{gpus} GPUs granted until {demand.end.isoformat()}"
    )


def _waiting(
    demand: AllocationDemand, held: int, free: int, capacity: int, position: int, now: datetime
) -> AdmissionDecision:
    window = _window_text(demand.start, demand.end, now)
    availability = f"{free} of {capacity} available" + (" throughout the window" if window else "")
    if demand.gpus > capacity:
        availability += f"; the pool can grant at most {capacity}"
    if held > 0:
        # A grown allocation keeps what it has while the increase waits in the queue.
        granted = _granted(demand, held, now)
        message = (
            f"holds {held} GPUs; waiting for {demand.gpus - held} more to reach {demand.gpus}{window}; "
            f"{free} of {capacity} available (queue position {position})"
        )
        return AdmissionDecision(demand.name, demand.uid, True, granted.phase, held, position, message)
    message = f"waiting for {demand.gpus} GPUs{window}; {availability} (queue position {position})"
    return AdmissionDecision(demand.name, demand.uid, False, "Queued", 0, position, message)


def _summary(
    capacity: int, grants: dict[str, _Grant], decisions: dict[str, AdmissionDecision], now: datetime
) -> PoolSummary:
    granted_now = sum(g.gpus for g in grants.values() if g.start <= now < g.end)
    if any(g.gpus > 0 and g.start > now for g in grants.values()):
        horizon = max(g.end for g in grants.values())
        peak = _peak(grants.values(), now, horizon)
    else:
        peak = granted_now  # no grant starts later: from now on the load only falls
    phases = [d.phase for d in decisions.values()]
    return PoolSummary(
        capacity_gpus=capacity,
        granted_gpus=granted_now,
        available_gpus=max(capacity - granted_now, 0),
        queued=sum(1 for d in decisions.values() if d.queue_position is not None),
        scheduled=phases.count("Scheduled"),
        active=phases.count("Active"),
        overcommitted_gpus=max(peak - capacity, 0),
    )
