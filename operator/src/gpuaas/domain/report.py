"""The monthly usage report, computed from ledger records alone.

Records outlive their allocations, so deleted allocations appear like any other. Hours are exact
seconds divided by 3600 and rounded once (3 decimals, half up); totals are summed from exact seconds
and rounded once, never summed from rounded rows. Row order is fixed (cluster, pool, tenant, allocation) so
the same ledger always yields the same report.

A merged report covers several clusters (one per provider): each row names its cluster, pools are totalled per
cluster (two clusters may both have a pool `b200-a`), and clusters get totals of their own. Its numbers are the sums
of the clusters' own reports, to the GPU-second.
"""

from __future__ import annotations

from calendar import monthrange
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC
from decimal import ROUND_HALF_UP, Decimal
from typing import Literal

from gpuaas.api.usage import DEFAULT_TIME_ZONE, GpuPoolUsage, GpuUsage, PoolLedger, record_namespace
from gpuaas.domain.ledger import parse_month, seconds_to_hours

TotalScope = Literal["cluster", "pool", "gpuModel", "provider", "all"]
_PERCENT_QUANTUM = Decimal("0.1")


def utilisation_percent(used_gpu_seconds: int, granted_gpu_seconds: int) -> Decimal | None:
    """used / granted in percent with 1 decimal (half up); None when nothing was granted."""
    if granted_gpu_seconds <= 0:
        return None
    return (Decimal(used_gpu_seconds) * 100 / Decimal(granted_gpu_seconds)).quantize(
        _PERCENT_QUANTUM, rounding=ROUND_HALF_UP
    )


def qualified_pool(cluster: str, pool: str) -> str:
    """The pool, named with its cluster in a merged report, where two clusters may each have a pool of that name."""
    return f"{cluster}/{pool}" if cluster else pool


class _Hours:
    """The hours and utilisation every row and total derives from its exact seconds."""

    used_gpu_seconds: int
    granted_gpu_seconds: int
    idle_seconds: int
    down_gpu_seconds: int
    busy_gpu_seconds: int | None

    @property
    def down_gpu_hours(self) -> Decimal:
        return seconds_to_hours(self.down_gpu_seconds)

    @property
    def busy_gpu_hours(self) -> Decimal | None:
        """GPU-hours the GPUs computed (dcgm-exporter, domain/busy.py); None where not measured."""
        return None if self.busy_gpu_seconds is None else seconds_to_hours(self.busy_gpu_seconds)

    @property
    def granted_gpu_hours(self) -> Decimal:
        return seconds_to_hours(self.granted_gpu_seconds)

    @property
    def used_gpu_hours(self) -> Decimal:
        return seconds_to_hours(self.used_gpu_seconds)

    @property
    def idle_hours(self) -> Decimal:
        return seconds_to_hours(self.idle_seconds)

    @property
    def utilisation_percent(self) -> Decimal | None:
        return utilisation_percent(self.used_gpu_seconds, self.granted_gpu_seconds)


@dataclass(frozen=True)
class ReportRow(_Hours):
    """One allocation in one month; `cluster` is empty in a single cluster's report."""

    cluster: str
    month: str
    allocation: str
    allocation_uid: str
    tenant: str
    organization: str
    contract: str
    pool: str
    gpu_model: str
    provider: str
    granted_gpus: int
    used_gpu_seconds: int
    granted_gpu_seconds: int
    idle_seconds: int
    peak_gpus_in_use: int
    pod_count: int
    down_gpu_seconds: int = 0
    namespace: str = ""
    busy_gpu_seconds: int | None = None

    @property
    def qualified_pool(self) -> str:
        return qualified_pool(self.cluster, self.pool)


@dataclass(frozen=True)
class ReportTotal(_Hours):
    """A sum over the rows that share `key` in `scope` (scope "all": every row, key "")."""

    scope: TotalScope
    key: str
    allocations: int
    granted_gpus: int
    used_gpu_seconds: int
    granted_gpu_seconds: int
    idle_seconds: int
    pod_count: int
    down_gpu_seconds: int = 0
    busy_gpu_seconds: int | None = None


@dataclass(frozen=True)
class DayUsage:
    """One local day of a pool: GPU-seconds used by pods and granted to allocations."""

    day: str
    """The date, YYYY-MM-DD."""
    used_gpu_seconds: int
    granted_gpu_seconds: int

    @property
    def used_gpu_hours(self) -> Decimal:
        return seconds_to_hours(self.used_gpu_seconds)

    @property
    def granted_gpu_hours(self) -> Decimal:
        return seconds_to_hours(self.granted_gpu_seconds)


@dataclass(frozen=True)
class DailySeries:
    """A pool's days in the month, every day in order (zero where nothing was booked)."""

    pool: str
    """The pool, named with its cluster in a merged report."""
    days: tuple[DayUsage, ...]
    unsplit_used_gpu_seconds: int
    """Used seconds booked before records kept daily figures: in the month's total, on no day."""
    unsplit_granted_gpu_seconds: int


@dataclass(frozen=True)
class HistoryLine:
    """One change to an allocation in the month: the report's grant-history appendix."""

    cluster: str
    allocation: str
    tenant: str
    at: str
    """ISO 8601 in UTC."""
    by: str
    changes: str


@dataclass(frozen=True)
class PoolIdentity:
    """A pool's month, sreport style: its record's program GPU-seconds = granted in service + unallocated + down."""

    cluster: str
    pool: str
    gpu_model: str
    provider: str
    ledger: PoolLedger
    allocations_credited_gpu_seconds: int
    """The credit as the allocations' records booked it (they are written on their own schedule); the pool's own
    view of it is `ledger.credited_gpu_seconds`."""

    @property
    def qualified_pool(self) -> str:
        return qualified_pool(self.cluster, self.pool)


@dataclass(frozen=True)
class Report:
    month: str
    time_zone: str
    rows: tuple[ReportRow, ...]
    totals: tuple[ReportTotal, ...]
    """Per cluster (merged reports only), per pool, per GPU model, per provider (each sorted by key), then the grand
    total."""
    clusters: tuple[str, ...] = ()
    """The clusters a merged report covers, sorted; empty for a single cluster's report."""
    daily: tuple[DailySeries, ...] = ()
    """Per pool (sorted), its used and granted GPU-seconds on each day of the month."""
    history: tuple[HistoryLine, ...] = ()
    """Every change to an allocation made in the month, oldest first."""
    pools: tuple[PoolIdentity, ...] = ()
    """Per pool (sorted), the identity of its program GPU-seconds; pools whose gpuaas keeps no month record are
    absent."""

    def unbalanced_pools(self) -> list[str]:
        """What does not add up, one line per pool: the report must not be trusted while any is listed."""
        return [
            f"pool {identity.qualified_pool}: program {ledger.program_gpu_seconds} GPU-s != granted in service "
            f"{ledger.usable_granted_gpu_seconds} + unallocated {ledger.unallocated_gpu_seconds} + down "
            f"{ledger.down_gpu_seconds} (off by {ledger.identity_gap})"
            for identity in self.pools
            if (ledger := identity.ledger).identity_gap != 0
        ]


def _row(cluster: str, record: GpuUsage) -> ReportRow:
    spec, status = record.spec, record.ledger
    return ReportRow(
        cluster=cluster,
        month=spec.month,
        allocation=spec.allocation,
        allocation_uid=spec.allocation_uid,
        tenant=spec.tenant.name,
        organization=spec.tenant.organization,
        contract=spec.tenant.contract,
        pool=spec.pool,
        gpu_model=spec.gpu_model,
        provider=spec.provider,
        granted_gpus=status.granted_gpus,
        used_gpu_seconds=status.used_gpu_seconds,
        granted_gpu_seconds=status.granted_gpu_seconds,
        idle_seconds=status.idle_seconds,
        peak_gpus_in_use=status.peak_gpus_in_use,
        pod_count=status.pod_count,
        down_gpu_seconds=status.down_gpu_seconds,
        namespace=record_namespace(spec),
    )


def _measured_sum(rows: Sequence[ReportRow]) -> int | None:
    """Busy seconds of the rows that were measured; None when none was."""
    measured = [row.busy_gpu_seconds for row in rows if row.busy_gpu_seconds is not None]
    return sum(measured) if measured else None


def _total(scope: TotalScope, key: str, rows: Iterable[ReportRow]) -> ReportTotal:
    members = list(rows)
    return ReportTotal(
        scope=scope,
        key=key,
        allocations=len(members),
        granted_gpus=sum(row.granted_gpus for row in members),
        used_gpu_seconds=sum(row.used_gpu_seconds for row in members),
        granted_gpu_seconds=sum(row.granted_gpu_seconds for row in members),
        idle_seconds=sum(row.idle_seconds for row in members),
        pod_count=sum(row.pod_count for row in members),
        down_gpu_seconds=sum(row.down_gpu_seconds for row in members),
        busy_gpu_seconds=_measured_sum(members),
    )


def _totals_by(scope: TotalScope, rows: tuple[ReportRow, ...], key: Callable[[ReportRow], str]) -> list[ReportTotal]:
    return [
        _total(scope, value, (row for row in rows if key(row) == value)) for value in sorted({key(r) for r in rows})
    ]


@dataclass(frozen=True)
class TenantSummary(_Hours):
    """A tenant's allocations in the month, summed: who it is, under which contract, what it had and used."""

    tenant: str
    organization: str
    contract: str
    allocations: int
    used_gpu_seconds: int
    granted_gpu_seconds: int
    idle_seconds: int
    down_gpu_seconds: int = 0
    busy_gpu_seconds: int | None = None


def tenant_summaries(rows: Iterable[ReportRow]) -> list[TenantSummary]:
    """One summary per tenant, organisation and contract, sorted by them."""
    groups: dict[tuple[str, str, str], list[ReportRow]] = {}
    for row in rows:
        groups.setdefault((row.tenant, row.organization, row.contract), []).append(row)
    return [
        TenantSummary(
            tenant=tenant,
            organization=organization,
            contract=contract,
            allocations=len(members),
            used_gpu_seconds=sum(row.used_gpu_seconds for row in members),
            granted_gpu_seconds=sum(row.granted_gpu_seconds for row in members),
            idle_seconds=sum(row.idle_seconds for row in members),
            down_gpu_seconds=sum(row.down_gpu_seconds for row in members),
            busy_gpu_seconds=_measured_sum(members),
        )
        for (tenant, organization, contract), members in sorted(groups.items())
    ]


def _add_days(totals: dict[str, int], daily: Mapping[str, int]) -> None:
    """Adds a record's days into the month's; a day the month lacks stays out (and shows as unsplit)."""
    for day, seconds in daily.items():
        if day in totals:
            totals[day] += seconds


def _daily_series(month: str, selected: Sequence[tuple[GpuUsage, str]]) -> tuple[DailySeries, ...]:
    year, number = parse_month(month)
    days = [f"{day:02d}" for day in range(1, monthrange(year, number)[1] + 1)]
    by_pool: dict[str, list[GpuUsage]] = {}
    for record, cluster in selected:
        by_pool.setdefault(qualified_pool(cluster, record.spec.pool), []).append(record)
    series = []
    for pool, records in sorted(by_pool.items()):
        used, granted = dict.fromkeys(days, 0), dict.fromkeys(days, 0)
        for record in records:
            _add_days(used, record.ledger.daily_used_gpu_seconds)
            _add_days(granted, record.ledger.daily_granted_gpu_seconds)
        series.append(
            DailySeries(
                pool=pool,
                days=tuple(DayUsage(f"{month}-{day}", used[day], granted[day]) for day in days),
                unsplit_used_gpu_seconds=sum(r.ledger.used_gpu_seconds for r in records) - sum(used.values()),
                unsplit_granted_gpu_seconds=sum(r.ledger.granted_gpu_seconds for r in records) - sum(granted.values()),
            )
        )
    return tuple(series)


def build_report(records: Iterable[GpuUsage | GpuPoolUsage], month: str, time_zone: str | None = None) -> Report:
    """The report of `month`: one row per allocation from the records of that month, and totals.

    `time_zone` names the zone the month is in for the header; by default the records' own zone.
    """
    return _build(((record, "") for record in records), month, time_zone, clusters=())


def build_merged_report(
    records_by_cluster: Mapping[str, Iterable[GpuUsage | GpuPoolUsage]], month: str, time_zone: str | None = None
) -> Report:
    """One report of `month` over several clusters' ledgers, keyed by cluster name."""
    if not records_by_cluster:
        raise ValueError("a merged report needs at least one cluster")
    for cluster in records_by_cluster:
        if not cluster:
            raise ValueError("every cluster of a merged report needs a name")
    pairs = ((record, cluster) for cluster, records in records_by_cluster.items() for record in records)
    return _build(pairs, month, time_zone, clusters=tuple(sorted(records_by_cluster)))


def _all_totals(rows: tuple[ReportRow, ...], clusters: tuple[str, ...]) -> tuple[ReportTotal, ...]:
    # A cluster with nothing booked this month still gets its (zero) total: it was read, not left out.
    per_cluster = [_total("cluster", cluster, (row for row in rows if row.cluster == cluster)) for cluster in clusters]
    return (
        *per_cluster,
        *_totals_by("pool", rows, lambda row: row.qualified_pool),
        *_totals_by("gpuModel", rows, lambda row: row.gpu_model),
        *_totals_by("provider", rows, lambda row: row.provider),
        _total("all", "", rows),
    )


def with_busy(report: Report, busy: Mapping[tuple[str, str], int]) -> Report:
    """The report with each row's busy GPU-seconds, from busy seconds by (cluster label, namespace). A single
    cluster's report takes its namespaces whatever their cluster label; a merged one matches the label to the
    cluster's name. A row with no samples was measured idle: 0."""
    by_namespace: dict[str, int] = {}
    for (_, namespace), seconds in busy.items():
        by_namespace[namespace] = by_namespace.get(namespace, 0) + seconds
    rows = tuple(
        replace(
            row,
            busy_gpu_seconds=busy.get((row.cluster, row.namespace), 0)
            if report.clusters
            else by_namespace.get(row.namespace, 0),
        )
        for row in report.rows
    )
    return replace(report, rows=rows, totals=_all_totals(rows, report.clusters))


def _pool_identities(
    pool_records: Sequence[tuple[GpuPoolUsage, str]], rows: Sequence[ReportRow]
) -> tuple[PoolIdentity, ...]:
    identities = []
    for record, cluster in pool_records:
        credited = sum(r.down_gpu_seconds for r in rows if r.cluster == cluster and r.pool == record.spec.pool)
        identities.append(
            PoolIdentity(
                cluster=cluster,
                pool=record.spec.pool,
                gpu_model=record.spec.gpu_model,
                provider=record.spec.provider,
                ledger=record.ledger,
                allocations_credited_gpu_seconds=credited,
            )
        )
    return tuple(sorted(identities, key=lambda identity: (identity.cluster, identity.pool)))


def _build(
    records: Iterable[tuple[GpuUsage | GpuPoolUsage, str]], month: str, time_zone: str | None, clusters: tuple[str, ...]
) -> Report:
    parse_month(month)
    this_month = [(record, cluster) for record, cluster in records if record.spec.month == month]
    selected = [(record, cluster) for record, cluster in this_month if isinstance(record, GpuUsage)]
    pool_records = [(record, cluster) for record, cluster in this_month if isinstance(record, GpuPoolUsage)]
    rows = tuple(
        sorted(
            (_row(cluster, record) for record, cluster in selected),
            key=lambda row: (row.cluster, row.pool, row.tenant, row.allocation, row.allocation_uid),
        )
    )
    zones = sorted({record.spec.time_zone for record, _ in selected})
    zone = time_zone or (", ".join(zones) if zones else DEFAULT_TIME_ZONE)
    history = sorted(
        (
            HistoryLine(
                cluster=cluster,
                allocation=record.spec.allocation,
                tenant=record.spec.tenant.name,
                at=change.at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
                by=change.by,
                changes="; ".join(change.changes),
            )
            for record, cluster in selected
            for change in record.ledger.history
        ),
        key=lambda line: (line.at, line.cluster, line.allocation, line.by, line.changes),
    )
    return Report(
        month=month,
        time_zone=zone,
        rows=rows,
        totals=_all_totals(rows, clusters),
        clusters=clusters,
        daily=_daily_series(month, selected),
        history=tuple(history),
        pools=_pool_identities(pool_records, rows),
    )
