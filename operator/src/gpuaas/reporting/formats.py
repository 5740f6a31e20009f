"""Render a Report as CSV, JSON, XLSX or HTML, with the same numbers in each.

Every format is built from the same two tables (`row_columns` and TOTAL_COLUMNS) and the same
Decimal values, and every format is byte-for-byte reproducible for the same report.
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from gpuaas.domain.ledger import parse_month, seconds_to_hours
from gpuaas.domain.report import (
    DailySeries,
    HistoryLine,
    PoolIdentity,
    Report,
    ReportRow,
    ReportTotal,
    TenantSummary,
    tenant_summaries,
)

Cell = str | int | Decimal | None
ColumnKind = Literal["text", "count", "hours", "percent"]

CSV_BOM = "\ufeff"
_ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)
"""The earliest time a zip entry can hold; fixed so that XLSX bytes do not depend on the clock."""
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class Column:
    key: str
    """The key in JSON, also the identity of the column in every format."""
    title: str
    kind: ColumnKind


ROW_COLUMNS: tuple[Column, ...] = (
    Column("month", "Month", "text"),
    Column("allocation", "Allocation", "text"),
    Column("tenant", "Tenant", "text"),
    Column("organization", "Organization", "text"),
    Column("contract", "Contract", "text"),
    Column("pool", "Pool", "text"),
    Column("gpuModel", "GPU model", "text"),
    Column("provider", "Provider", "text"),
    Column("grantedGPUs", "Granted GPUs", "count"),
    Column("grantedGPUHours", "Granted GPU-hours", "hours"),
    Column("usedGPUHours", "Used GPU-hours", "hours"),
    Column("busyGPUHours", "Busy GPU-hours", "hours"),
    Column("utilisationPercent", "Utilisation %", "percent"),
    Column("idleHours", "Idle hours", "hours"),
    Column("peakGPUsInUse", "Peak GPUs in use", "count"),
    Column("podCount", "Pods", "count"),
    Column("downGPUHours", "Downtime credit GPU-hours", "hours"),
)

TOTAL_COLUMNS: tuple[Column, ...] = (
    Column("scope", "Scope", "text"),
    Column("key", "Key", "text"),
    Column("allocations", "Allocations", "count"),
    Column("grantedGPUs", "Granted GPUs", "count"),
    Column("grantedGPUHours", "Granted GPU-hours", "hours"),
    Column("usedGPUHours", "Used GPU-hours", "hours"),
    Column("busyGPUHours", "Busy GPU-hours", "hours"),
    Column("utilisationPercent", "Utilisation %", "percent"),
    Column("idleHours", "Idle hours", "hours"),
    Column("podCount", "Pods", "count"),
    Column("downGPUHours", "Downtime credit GPU-hours", "hours"),
)


CLUSTER_COLUMN = Column("cluster", "Cluster", "text")
# How the HTML names a total's scope (CSV and JSON keep the keys, which scripts read).
SCOPE_TITLES = {"cluster": "Cluster", "pool": "Pool", "gpuModel": "GPU model", "provider": "Provider", "all": "Program"}


TENANT_COLUMNS: tuple[Column, ...] = (
    Column("tenant", "Tenant", "text"),
    Column("organization", "Organization", "text"),
    Column("contract", "Contract", "text"),
    Column("allocations", "Allocations", "count"),
    Column("grantedGPUHours", "Granted GPU-hours", "hours"),
    Column("usedGPUHours", "Used GPU-hours", "hours"),
    Column("busyGPUHours", "Busy GPU-hours", "hours"),
    Column("utilisationPercent", "Utilisation %", "percent"),
    Column("idleHours", "Idle hours", "hours"),
    Column("downGPUHours", "Downtime credit GPU-hours", "hours"),
)

DAILY_COLUMNS: tuple[Column, ...] = (
    Column("pool", "Pool", "text"),
    Column("day", "Day", "text"),
    Column("grantedGPUHours", "Granted GPU-hours", "hours"),
    Column("usedGPUHours", "Used GPU-hours", "hours"),
)


POOL_IDENTITY_COLUMNS: tuple[Column, ...] = (
    Column("pool", "Pool", "text"),
    Column("gpuModel", "GPU model", "text"),
    Column("provider", "Provider", "text"),
    Column("programGPUHours", "Program GPU-hours", "hours"),
    Column("grantedInServiceGPUHours", "Granted in service GPU-hours", "hours"),
    Column("unallocatedGPUHours", "Unallocated GPU-hours", "hours"),
    Column("downGPUHours", "Down GPU-hours", "hours"),
    Column("addsUp", "Program = granted + unallocated + down", "text"),
    Column("creditedGPUHours", "Of down, granted (credited) GPU-hours", "hours"),
    Column("allocationsCreditedGPUHours", "Credited in allocations' records GPU-hours", "hours"),
)


HISTORY_COLUMNS: tuple[Column, ...] = (
    Column("at", "When (UTC)", "text"),
    Column("allocation", "Allocation", "text"),
    Column("tenant", "Tenant", "text"),
    Column("by", "Requested by", "text"),
    Column("changes", "Change", "text"),
)


def _cluster_first(report: Report, columns: tuple[Column, ...]) -> tuple[Column, ...]:
    """A merged report's tables start with the cluster; a single cluster's have no such column."""
    return (CLUSTER_COLUMN, *columns) if report.clusters else columns


def _cluster_cell(cluster: str) -> dict[str, Cell]:
    return {"cluster": cluster} if cluster else {}


def pool_identity_columns(report: Report) -> tuple[Column, ...]:
    return _cluster_first(report, POOL_IDENTITY_COLUMNS)


def pool_identity_cells(identity: PoolIdentity) -> dict[str, Cell]:
    ledger = identity.ledger
    return _cluster_cell(identity.cluster) | {
        "pool": identity.pool,
        "gpuModel": identity.gpu_model,
        "provider": identity.provider,
        "programGPUHours": seconds_to_hours(ledger.program_gpu_seconds),
        "grantedInServiceGPUHours": seconds_to_hours(ledger.usable_granted_gpu_seconds),
        "unallocatedGPUHours": seconds_to_hours(ledger.unallocated_gpu_seconds),
        "downGPUHours": seconds_to_hours(ledger.down_gpu_seconds),
        "addsUp": "yes" if ledger.identity_gap == 0 else f"no: off by {ledger.identity_gap} GPU-seconds",
        "creditedGPUHours": seconds_to_hours(ledger.credited_gpu_seconds),
        "allocationsCreditedGPUHours": seconds_to_hours(identity.allocations_credited_gpu_seconds),
    }


def history_columns(report: Report) -> tuple[Column, ...]:
    return _cluster_first(report, HISTORY_COLUMNS)


def history_cells(line: HistoryLine) -> dict[str, Cell]:
    return _cluster_cell(line.cluster) | {
        "at": line.at,
        "allocation": line.allocation,
        "tenant": line.tenant,
        "by": line.by,
        "changes": line.changes,
    }


def row_columns(report: Report) -> tuple[Column, ...]:
    return _cluster_first(report, ROW_COLUMNS)


def row_cells(row: ReportRow) -> dict[str, Cell]:
    return _cluster_cell(row.cluster) | {
        "month": row.month,
        "allocation": row.allocation,
        "tenant": row.tenant,
        "organization": row.organization,
        "contract": row.contract,
        "pool": row.pool,
        "gpuModel": row.gpu_model,
        "provider": row.provider,
        "grantedGPUs": row.granted_gpus,
        "grantedGPUHours": row.granted_gpu_hours,
        "usedGPUHours": row.used_gpu_hours,
        "busyGPUHours": row.busy_gpu_hours,
        "utilisationPercent": row.utilisation_percent,
        "idleHours": row.idle_hours,
        "peakGPUsInUse": row.peak_gpus_in_use,
        "podCount": row.pod_count,
        "downGPUHours": row.down_gpu_hours,
    }


def total_cells(total: ReportTotal) -> dict[str, Cell]:
    return {
        "scope": total.scope,
        "key": total.key,
        "allocations": total.allocations,
        "grantedGPUs": total.granted_gpus,
        "grantedGPUHours": total.granted_gpu_hours,
        "usedGPUHours": total.used_gpu_hours,
        "busyGPUHours": total.busy_gpu_hours,
        "utilisationPercent": total.utilisation_percent,
        "idleHours": total.idle_hours,
        "podCount": total.pod_count,
        "downGPUHours": total.down_gpu_hours,
    }


def tenant_cells(summary: TenantSummary) -> dict[str, Cell]:
    return {
        "tenant": summary.tenant,
        "organization": summary.organization,
        "contract": summary.contract,
        "allocations": summary.allocations,
        "grantedGPUHours": summary.granted_gpu_hours,
        "usedGPUHours": summary.used_gpu_hours,
        "busyGPUHours": summary.busy_gpu_hours,
        "utilisationPercent": summary.utilisation_percent,
        "idleHours": summary.idle_hours,
        "downGPUHours": summary.down_gpu_hours,
    }


def daily_cells(report: Report) -> list[dict[str, Cell]]:
    """One line per pool and day, every day of the month."""
    return [
        {
            "pool": series.pool,
            "day": day.day,
            "grantedGPUHours": day.granted_gpu_hours,
            "usedGPUHours": day.used_gpu_hours,
        }
        for series in report.daily
        for day in series.days
    ]


def format_cell(value: Cell) -> str:
    """The text of a cell in CSV and HTML: fixed-point decimals as rounded, empty for no value."""
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


# --- CSV -------------------------------------------------------------------------------------------


# Text a spreadsheet would read as a number or a date: digits (a 20-digit contract id keeps 15 of them, an id with
# leading zeros loses them), exponents, percentages, and dates or times ("2026-10" becomes October).
_READ_AS_VALUE = re.compile(
    r"[+-]?(\d[\d,]*\.?\d*|\.\d+)([eE][+-]?\d+)?%?|\d{1,4}[-/.]\d{1,2}([-/.]\d{1,4})?|\d{1,2}:\d{2}(:\d{2})?"
)


def _csv_text(value: Cell) -> str:
    text = format_cell(value)
    if not isinstance(value, str):
        return text
    if _READ_AS_VALUE.fullmatch(text.strip()):
        # A constant text formula: Excel and LibreOffice show exactly the text (a quote inside is doubled).
        return '="' + text.replace('"', '""') + '"'
    # A leading = + - @ makes Excel evaluate the cell as a formula; quote it as text instead.
    if text.startswith(_FORMULA_PREFIXES):
        return "'" + text
    return text


def csv_cell_text(field: str) -> str:
    """What a spreadsheet shows for one field of this CSV: the text inside a constant text formula, else the field."""
    if field.startswith('="') and field.endswith('"'):
        return field[2:-1].replace('""', '"')
    return field


def to_csv(report: Report) -> bytes:
    """UTF-8 with a BOM and CRLF line ends, as Excel expects: the rows, a blank line, then the totals."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    columns = row_columns(report)
    writer.writerow([column.title for column in columns])
    for row in report.rows:
        cells = row_cells(row)
        writer.writerow([_csv_text(cells[column.key]) for column in columns])
    writer.writerow([])
    writer.writerow([column.title for column in TOTAL_COLUMNS])
    for total in report.totals:
        cells = total_cells(total)
        writer.writerow([_csv_text(cells[column.key]) for column in TOTAL_COLUMNS])
    if report.pools:
        writer.writerow([])
        identity_columns = pool_identity_columns(report)
        writer.writerow([column.title for column in identity_columns])
        for identity in report.pools:
            cells = pool_identity_cells(identity)
            writer.writerow([_csv_text(cells[column.key]) for column in identity_columns])
    return (CSV_BOM + buffer.getvalue()).encode("utf-8")


# --- JSON ------------------------------------------------------------------------------------------


def _json_value(value: Cell) -> str | int | float | None:
    # The rounded decimals have at most 3 places, so the float's shortest repr is the same digits.
    return float(value) if isinstance(value, Decimal) else value


def report_document(report: Report) -> dict[str, object]:
    """The report as plain JSON-ready data."""
    clusters: dict[str, object] = {"clusters": list(report.clusters)} if report.clusters else {}
    return clusters | {
        "month": report.month,
        "timeZone": report.time_zone,
        "rows": [{key: _json_value(value) for key, value in row_cells(row).items()} for row in report.rows],
        "totals": [{key: _json_value(value) for key, value in total_cells(total).items()} for total in report.totals],
        "daily": [
            {
                "pool": series.pool,
                "unsplitUsedGPUHours": _json_value(seconds_to_hours(series.unsplit_used_gpu_seconds)),
                "unsplitGrantedGPUHours": _json_value(seconds_to_hours(series.unsplit_granted_gpu_seconds)),
                "days": [
                    {
                        "day": day.day,
                        "grantedGPUHours": _json_value(day.granted_gpu_hours),
                        "usedGPUHours": _json_value(day.used_gpu_hours),
                    }
                    for day in series.days
                ],
            }
            for series in report.daily
        ],
        "history": [history_cells(line) for line in report.history],
        "poolIdentity": [
            {key: _json_value(value) for key, value in pool_identity_cells(identity).items()}
            for identity in report.pools
        ],
    }


def to_json(report: Report) -> bytes:
    """UTF-8 JSON with sorted keys, two-space indent and a final newline; Korean text kept readable."""
    text = json.dumps(report_document(report), sort_keys=True, indent=2, ensure_ascii=False)
    return (text + "\n").encode("utf-8")


# --- XLSX ------------------------------------------------------------------------------------------

_NUMBER_FORMATS: dict[ColumnKind, str] = {"text": "@", "count": "0", "hours": "0.000", "percent": "0.0"}


def _fill_sheet(sheet: Any, columns: Sequence[Column], records: Sequence[dict[str, Cell]]) -> None:
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
    from openpyxl.styles import Font
    from openpyxl.utils import get_column_letter

    header_font = Font(bold=True)
    for index, column in enumerate(columns, start=1):
        cell = sheet.cell(row=1, column=index, value=column.title)
        cell.font = header_font
        width = max([len(column.title), *(len(format_cell(record[column.key])) for record in records)])
        sheet.column_dimensions[get_column_letter(index)].width = min(60, width + 2)
    for row_index, record in enumerate(records, start=2):
        for index, column in enumerate(columns, start=1):
            value = record[column.key]
            if value is None:
                continue
            if isinstance(value, str):
                cell = sheet.cell(row=row_index, column=index, value=ILLEGAL_CHARACTERS_RE.sub("", value))
                cell.data_type = "s"  # never a formula, whatever the text starts with
            else:
                cell = sheet.cell(row=row_index, column=index, value=value)
                cell.number_format = _NUMBER_FORMATS[column.kind]
    sheet.freeze_panes = "A2"


def _normalised_zip(data: bytes) -> bytes:
    """The same archive with fixed entry timestamps, so the bytes depend on the content only."""
    source = zipfile.ZipFile(io.BytesIO(data))
    output = io.BytesIO()
    with zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as target:
        for entry in source.infolist():
            info = zipfile.ZipInfo(entry.filename, date_time=_ZIP_TIMESTAMP)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            target.writestr(info, source.read(entry.filename))
    return output.getvalue()


def to_xlsx(report: Report) -> bytes:
    """A workbook with a "Usage" sheet of rows and a "Totals" sheet, numbers in typed numeric cells."""
    # Imported here: openpyxl takes a fifth of the CLI's start-up, and only this format needs it.
    from openpyxl import Workbook
    from openpyxl.writer.excel import ExcelWriter

    workbook = Workbook()
    usage = workbook.active
    usage.title = "Usage"
    _fill_sheet(usage, row_columns(report), [row_cells(row) for row in report.rows])
    _fill_sheet(workbook.create_sheet("Totals"), TOTAL_COLUMNS, [total_cells(total) for total in report.totals])
    _fill_sheet(workbook.create_sheet("Daily"), DAILY_COLUMNS, daily_cells(report))
    _fill_sheet(workbook.create_sheet("History"), history_columns(report), [history_cells(h) for h in report.history])
    _fill_sheet(
        workbook.create_sheet("Pool identity"),
        pool_identity_columns(report),
        [pool_identity_cells(identity) for identity in report.pools],
    )

    year, month = parse_month(report.month)
    fixed = datetime(year, month, 1)  # openpyxl wants naive UTC; any fixed instant will do
    properties = workbook.properties
    properties.creator = "gpuaas"
    properties.lastModifiedBy = "gpuaas"
    properties.title = f"GPU usage {report.month} ({report.time_zone})"
    properties.created = fixed
    properties.modified = fixed

    buffer = io.BytesIO()
    # ExcelWriter, not save_workbook: the latter stamps `modified` with the current time.
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        ExcelWriter(workbook, archive).write_data()
    return _normalised_zip(buffer.getvalue())


# --- HTML ------------------------------------------------------------------------------------------

_TOP_TENANTS = 10
_CHART_LABEL_CHARACTERS = 20
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans KR","Malgun Gothic",sans-serif;margin:2rem;color:#1f2933}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem}h3{font-size:1rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #cbd2d9;padding:.25rem .5rem}th{background:#f0f4f8;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
svg{font-size:12px;display:block;margin:.5rem 0}
.granted{fill:#9fb3c8}.used{fill:#2680c2}
.legend rect{stroke:none}
""".strip()


def _escape(text: str) -> str:
    return html.escape(text, quote=True)


def _table(table_id: str, columns: Sequence[Column], records: Sequence[dict[str, Cell]]) -> str:
    header = "".join(f"<th>{_escape(column.title)}</th>" for column in columns)
    body = []
    for record in records:
        cells = []
        for column in columns:
            css = "" if column.kind == "text" else ' class="num"'
            cells.append(f'<td data-key="{column.key}"{css}>{_escape(format_cell(record[column.key]))}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table id="{table_id}"><thead><tr>{header}</tr></thead><tbody>{"".join(body)}</tbody></table>'


@dataclass(frozen=True)
class _Bar:
    label: str
    granted_gpu_seconds: int
    used_gpu_seconds: int


def _bars_by(rows: Sequence[ReportRow], key: Callable[[ReportRow], str]) -> list[_Bar]:
    sums: dict[str, tuple[int, int]] = {}
    for row in rows:
        granted, used = sums.get(key(row), (0, 0))
        sums[key(row)] = (granted + row.granted_gpu_seconds, used + row.used_gpu_seconds)
    return [_Bar(label, granted, used) for label, (granted, used) in sorted(sums.items())]


def _bar_chart(title: str, bars: Sequence[_Bar]) -> str:
    """Horizontal bars, granted above used, per label; sized in whole-number SVG units."""
    label_width, plot_width, value_width, row_height, top = 260, 460, 90, 40, 28
    width = label_width + plot_width + value_width
    height = top + row_height * len(bars) + 8
    largest = max([1, *(max(bar.granted_gpu_seconds, bar.used_gpu_seconds) for bar in bars)])
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_escape(title)}">',
        f"<title>{_escape(title)}</title>",
        f'<g class="legend"><rect class="granted" x="{label_width}" y="6" width="12" height="12"/>'
        f'<text x="{label_width + 16}" y="16">granted GPU-hours</text>'
        f'<rect class="used" x="{label_width + 150}" y="6" width="12" height="12"/>'
        f'<text x="{label_width + 166}" y="16">used GPU-hours</text></g>',
    ]
    for index, bar in enumerate(bars):
        y = top + index * row_height
        label = _escape(bar.label)
        shown = (
            bar.label
            if len(bar.label) <= _CHART_LABEL_CHARACTERS
            else bar.label[: _CHART_LABEL_CHARACTERS - 1] + "\u2026"
        )
        parts.append(f'<text x="{label_width - 8}" y="{y + 20}" text-anchor="end">{_escape(shown)}</text>')
        for offset, css, seconds in (
            (2, "granted", bar.granted_gpu_seconds),
            (18, "used", bar.used_gpu_seconds),
        ):
            hours = format_cell(seconds_to_hours(seconds))
            length = plot_width * seconds // largest
            parts.append(
                f'<rect class="{css}" x="{label_width}" y="{y + offset}" width="{length}" height="14">'
                f"<title>{label}: {css} {hours} GPU-hours</title></rect>"
                f'<text x="{label_width + length + 4}" y="{y + offset + 11}">{hours}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _charts(report: Report) -> str:
    sections = []
    for pool in sorted({row.qualified_pool for row in report.rows}):
        rows = [row for row in report.rows if row.qualified_pool == pool]
        title = f"{pool}: granted vs used GPU-hours by tenant"
        sections.append(f"<h3>{_escape(title)}</h3>{_bar_chart(title, _bars_by(rows, lambda row: row.tenant))}")
    top = sorted(
        _bars_by(report.rows, lambda row: row.tenant),
        key=lambda bar: (-bar.used_gpu_seconds, -bar.granted_gpu_seconds, bar.label),
    )[:_TOP_TENANTS]
    title = f"Top {_TOP_TENANTS} tenants by used GPU-hours"
    sections.append(f"<h3>{_escape(title)}</h3>{_bar_chart(title, top)}")
    return "".join(sections)


def _daily_chart(series: DailySeries) -> str:
    """A column per day: granted GPU-hours behind, used GPU-hours in front; whole-number SVG units."""
    axis_width, column_width, plot_height, top, bottom = 90, 22, 160, 28, 22
    width = axis_width + column_width * len(series.days) + 8
    height = top + plot_height + bottom
    largest = max([1, *(max(day.granted_gpu_seconds, day.used_gpu_seconds) for day in series.days)])
    title = f"{series.pool}: GPU-hours per day"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_escape(title)}">',
        f"<title>{_escape(title)}</title>",
        f'<g class="legend"><rect class="granted" x="{axis_width}" y="6" width="12" height="12"/>'
        f'<text x="{axis_width + 16}" y="16">granted GPU-hours</text>'
        f'<rect class="used" x="{axis_width + 150}" y="6" width="12" height="12"/>'
        f'<text x="{axis_width + 166}" y="16">used GPU-hours</text></g>',
        f'<text x="{axis_width - 6}" y="{top + 10}" text-anchor="end">{format_cell(seconds_to_hours(largest))}</text>',
        f'<text x="{axis_width - 6}" y="{top + plot_height}" text-anchor="end">0</text>',
        f'<line x1="{axis_width}" y1="{top + plot_height}" x2="{width - 8}" y2="{top + plot_height}" '
        'stroke="#9aa5b1"/>',
    ]
    for index, day in enumerate(series.days):
        x = axis_width + index * column_width
        label = (
            f"{day.day}: granted {format_cell(day.granted_gpu_hours)}, used {format_cell(day.used_gpu_hours)} GPU-hours"
        )
        for css, seconds, inset in (("granted", day.granted_gpu_seconds, 2), ("used", day.used_gpu_seconds, 6)):
            bar = plot_height * seconds // largest
            parts.append(
                f'<rect class="{css}" x="{x + inset}" y="{top + plot_height - bar}" width="{column_width - 2 * inset}" '
                f'height="{bar}"><title>{_escape(label)}</title></rect>'
            )
        parts.append(
            f'<text x="{x + column_width // 2}" y="{height - 6}" text-anchor="middle" font-size="10">'
            f"{int(day.day[-2:])}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _daily(report: Report) -> str:
    sections = []
    for series in report.daily:
        title = f"{series.pool}: GPU-hours per day"
        note = ""
        if series.unsplit_used_gpu_seconds or series.unsplit_granted_gpu_seconds:
            note = (
                f"<p>Not in the days above: {format_cell(seconds_to_hours(series.unsplit_used_gpu_seconds))} used and "
                f"{format_cell(seconds_to_hours(series.unsplit_granted_gpu_seconds))} granted GPU-hours booked before "
                "records kept daily figures (they are in the totals).</p>"
            )
        sections.append(f"<h3>{_escape(title)}</h3>{_daily_chart(series)}{note}")
    return "".join(sections)


def _titled_scope(total: ReportTotal) -> dict[str, Cell]:
    return total_cells(total) | {"scope": SCOPE_TITLES[total.scope]}


def to_html(report: Report) -> str:
    """One self-contained page (inline CSS and SVG, no scripts or fonts to fetch).

    Non-ASCII text is written as character references, so Korean names survive whatever encoding
    the page is later saved or served in.
    """
    title = f"GPU usage report {report.month} ({report.time_zone})"
    tenants = [tenant_cells(summary) for summary in tenant_summaries(report.rows)]
    history = [history_cells(line) for line in report.history]
    identities = [pool_identity_cells(identity) for identity in report.pools]
    page = (
        '<!DOCTYPE html>\n<html lang="ko">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_escape(title)}</h1>\n"
        f"<h2>Totals</h2>\n{_table('totals', TOTAL_COLUMNS, [_titled_scope(t) for t in report.totals])}\n"
        f"<h2>Pools: program = granted in service + unallocated + down</h2>\n"
        f"{_table('pools', pool_identity_columns(report), identities)}\n"
        f"<h2>Tenants</h2>\n{_table('tenants', TENANT_COLUMNS, tenants)}\n"
        f"<h2>Charts</h2>\n{_charts(report)}\n"
        f"<h2>Daily</h2>\n{_daily(report)}\n"
        f"<h2>Allocations</h2>\n{_table('rows', row_columns(report), [row_cells(row) for row in report.rows])}\n"
        f"<h2>Grant history</h2>\n{_table('history', history_columns(report), history)}\n"
        "</body>\n</html>\n"
    )
    return page.encode("ascii", "xmlcharrefreplace").decode("ascii")


# --- dispatch --------------------------------------------------------------------------------------


def _html_bytes(report: Report) -> bytes:
    return to_html(report).encode("utf-8")


FORMATS: dict[str, Callable[[Report], bytes]] = {
    "csv": to_csv,
    "json": to_json,
    "xlsx": to_xlsx,
    "html": _html_bytes,
}
"""Renderers by the name `gpuaas report --format` takes."""


def render(report: Report, format_name: str) -> bytes:
    """The report in `format_name` (csv, json, xlsx or html) as bytes ready to write."""
    try:
        renderer = FORMATS[format_name]
    except KeyError:
        raise ValueError(f"unknown report format {format_name!r}; choose from {', '.join(FORMATS)}") from None
    return renderer(report)
