"""The monthly usage report, computed from ledger records alone.

Records outlive their allocations, so deleted allocations appear like any other. Hours are exact
seconds divided by 3600 and rounded once (3 decimals, half up); totals are summed from exact seconds
and rounded once, never summed from rounded rows. Row order is fixed (pool, tenant, allocation) so
the same ledger always yields the same report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Literal

from gpuaas.api.usage import DEFAULT_TIME_ZONE, GpuUsage
from gpuaas.domain.ledger import parse_month, seconds_to_hours

TotalScope = Literal["pool", "gpuModel", "provider", "all"]
_PERCENT_QUANTUM = Decimal("0.1")


def utilisation_percent(used_gpu_seconds: int, granted_gpu_seconds: int) -> Decimal | None:
    """used / granted in percent with 1 decimal (half up); None when nothing was granted."""
    if granted_gpu_seconds <= 0:
        return None
    return (Decimal(used_gpu_seconds) * 100 / Decimal(granted_gpu_seconds)).quantize(
        _PERCENT_QUANTUM, rounding=ROUND_HALF_UP
    )


class _Hours:
    """The hours and utilisation every row and total derives from its exact seconds."""

    used_gpu_seconds: int
    granted_gpu_seconds: int
    idle_seconds: int

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
    """One allocation in one month."""

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


@dataclass(frozen=True)
class Report:
    month: str
    time_zone: str
    rows: tuple[ReportRow, ...]
    totals: tuple[ReportTotal, ...]
    """Per pool, per GPU model, per provider (each sorted by key), then the grand total."""


def _row(record: GpuUsage) -> ReportRow:
    spec, status = record.spec, record.ledger
    return ReportRow(
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
    )


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
    )


def _totals_by(scope: TotalScope, rows: tuple[ReportRow, ...], key: Callable[[ReportRow], str]) -> list[ReportTotal]:
    return [
        _total(scope, value, (row for row in rows if key(row) == value)) for value in sorted({key(r) for r in rows})
    ]


def build_report(records: Iterable[GpuUsage], month: str, time_zone: str | None = None) -> Report:
    """The report of `month`: one row per allocation from the records of that month, and totals.

    `time_zone` names the zone the month is in for the header; by default the records' own zone.
    """
    parse_month(month)
    selected = [record for record in records if record.spec.month == month]
    rows = tuple(
        sorted(
            (_row(record) for record in selected),
            key=lambda row: (row.pool, row.tenant, row.allocation, row.allocation_uid),
        )
    )
    zones = sorted({record.spec.time_zone for record in selected})
    zone = time_zone or (", ".join(zones) if zones else DEFAULT_TIME_ZONE)
    totals = [
        *_totals_by("pool", rows, lambda row: row.pool),
        *_totals_by("gpuModel", rows, lambda row: row.gpu_model),
        *_totals_by("provider", rows, lambda row: row.provider),
        _total("all", "", rows),
    ]
    return Report(month=month, time_zone=zone, rows=rows, totals=tuple(totals))
