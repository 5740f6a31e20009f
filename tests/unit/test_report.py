"""The monthly report: exact numbers, fixed order, and the same numbers in CSV, JSON, XLSX and HTML.

Regenerate the golden files with `UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_report.py`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from datetime import UTC, datetime
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from openpyxl import load_workbook

from gpuaas.api.usage import (
    GpuPoolUsage,
    GpuPoolUsageSpec,
    GpuUsage,
    GpuUsageSpec,
    GrantChange,
    PoolLedger,
    UsageLedger,
    UsageTenant,
    usage_name,
)
from gpuaas.domain.report import Report, build_report, utilisation_percent, with_busy
from gpuaas.reporting import render, to_csv, to_html, to_json, to_xlsx
from gpuaas.reporting.formats import POOL_IDENTITY_COLUMNS, ROW_COLUMNS, SCOPE_TITLES, TOTAL_COLUMNS

GOLDEN = Path(__file__).parent / "golden"
MONTH = "2026-10"
OCTOBER_HOURS = 31 * 24


def spread_over_october(seconds: int) -> dict[str, int]:
    """Equal parts on each of the 31 days, the remainder on the last: they sum to `seconds`."""
    days = {f"{day:02d}": seconds // 31 for day in range(1, 32)}
    days["31"] += seconds % 31
    return days


def record(
    allocation: str,
    tenant: str,
    organization: str,
    pool: str,
    gpus: int,
    used_gpu_seconds: int,
    idle_seconds: int = 0,
    peak: int | None = None,
    pods: int = 1,
    month: str = MONTH,
    contract: str = "",
    daily: bool = True,
    down_gpu_seconds: int = 0,
) -> GpuUsage:
    """A month's record; with `daily`, its used seconds and its grant are spread over the days (without, it is a
    record booked before records kept daily figures)."""
    model, provider = {
        "nhn-b200-a": ("B200", "nhn"),
        "kakao-b200-a": ("B200", "kakao"),
        "naver-h200-a": ("H200", "naver"),
    }[pool]
    return GpuUsage(
        name=usage_name(allocation, month),
        spec=GpuUsageSpec(
            allocation=allocation,
            allocation_uid=f"uid-{allocation}",
            tenant=UsageTenant(name=tenant, organization=organization, contract=contract),
            pool=pool,
            gpu_model=model,
            provider=provider,
            month=month,
        ),
        ledger=UsageLedger(
            used_gpu_seconds=used_gpu_seconds,
            granted_gpu_seconds=gpus * OCTOBER_HOURS * 3600,
            down_gpu_seconds=down_gpu_seconds,
            idle_seconds=idle_seconds,
            granted_gpus=gpus,
            peak_gpus_in_use=gpus if peak is None else peak,
            pod_count=pods,
            daily_used_gpu_seconds=spread_over_october(used_gpu_seconds) if daily else {},
            daily_granted_gpu_seconds={f"{day:02d}": gpus * 86400 for day in range(1, 32)} if daily else {},
        ),
    )


HISTORY = {
    "upstage-fm": [
        GrantChange(at=datetime(2026, 10, 1, tzinfo=UTC), by="nipa-officer-kim", changes=["gpus 512 -> 1024"]),
        GrantChange(
            at=datetime(2026, 10, 20, 9, tzinfo=UTC), by="nipa-officer-lee", changes=["suspended", "priority 0 -> 5"]
        ),
    ],
    "lg-exaone": [GrantChange(at=datetime(2026, 10, 24, tzinfo=UTC), by="nipa-officer-kim", changes=["deleted"])],
}


def ledger() -> list[GpuUsage | GpuPoolUsage]:
    """A month of the program: Korean tenant names, a deleted allocation, a zero grant, another month, changes, and
    the pools' month records (one of them with a node down under a grant)."""
    records = ledger_without_history()
    for item in records:
        if item.spec.month == MONTH:
            item.ledger.history = HISTORY.get(item.spec.allocation, [])
    return [*records, *pool_records()]


# nhn-b200-a: 1,104 of its 1,200 program GPUs granted all month; one 8-GPU node of snu-ai-lab's was down 2 hours.
NODE_DOWN_SECONDS = 8 * 2 * 3600


def pool_record(pool: str, model: str, provider: str, program: int, granted: int, down: int, credited: int,
                month: str = MONTH) -> GpuPoolUsage:  # fmt: skip
    seconds = OCTOBER_HOURS * 3600
    usable = granted * seconds - credited
    return GpuPoolUsage(
        name=f"{pool}-{month}",
        spec=GpuPoolUsageSpec(pool=pool, gpu_model=model, provider=provider, month=month),
        ledger=PoolLedger(
            program_gpu_seconds=program * seconds,
            granted_gpu_seconds=granted * seconds,
            credited_gpu_seconds=credited,
            usable_granted_gpu_seconds=usable,
            unallocated_gpu_seconds=program * seconds - down - usable,
            down_gpu_seconds=down,
        ),
    )


def pool_records() -> list[GpuPoolUsage]:
    return [
        pool_record("nhn-b200-a", "B200", "nhn", 1200, 1104, NODE_DOWN_SECONDS, NODE_DOWN_SECONDS),
        pool_record("naver-h200-a", "H200", "naver", 256, 32, 0, 0),
        pool_record("nhn-b200-a", "B200", "nhn", 1200, 0, 0, 0, month="2026-09"),
    ]


def ledger_without_history() -> list[GpuUsage]:
    return [
        record(
            "upstage-fm",
            "업스테이지 파운데이션 모델팀",
            "(주)업스테이지",
            "nhn-b200-a",
            1024,
            2_411_234_567,
            3_601,
            1016,
            212,
            contract="NIPA-2026-001",
        ),
        record(
            "snu-ai-lab",
            "서울대학교 AI연구실",
            "서울대학교",
            "nhn-b200-a",
            64,
            123_456_789,
            86_399,
            56,
            37,
            contract="NIPA-2026-114",
            down_gpu_seconds=NODE_DOWN_SECONDS,
        ),
        record("kaist-nlp", "KAIST 자연어처리 연구실", "KAIST", "nhn-b200-a", 16, 9, 2_678_391, 1, 1),
        # Deleted last week: only its record is left, and it still belongs in the report.
        record("lg-exaone", "LG AI연구원", "LG", "kakao-b200-a", 512, 1_300_000_001, 0, 512, 64, daily=False),
        record("rebellions-beta", "(주)리벨리온 & 파트너스 <베타>", "리벨리온", "kakao-b200-a", 8, 18, 1_800, 8, 3),
        record("snu-ai-lab-h200", "서울대학교 AI연구실", "서울대학교", "naver-h200-a", 32, 50_000_000, 7_200, 32, 12),
        record("naver-startup", '스타트업 "지원" 프로그램', "네이버 클라우드", "naver-h200-a", 0, 0, 0, 0, 0),
        record("snu-ai-lab", "서울대학교 AI연구실", "서울대학교", "nhn-b200-a", 64, 99, month="2026-09"),
    ]


@pytest.fixture
def report() -> Report:
    return build_report(ledger(), MONTH)


def check_golden(name: str, produced: bytes) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(produced)
    assert path.exists(), f"missing golden file {path}; run with UPDATE_GOLDEN=1"
    assert produced == path.read_bytes(), f"{name} differs from its golden file; run with UPDATE_GOLDEN=1 if intended"


# --- the report itself ---------------------------------------------------------------------------


def test_rows_are_one_per_allocation_of_the_month_in_a_fixed_order(report: Report) -> None:
    assert [(row.pool, row.allocation) for row in report.rows] == [
        ("kakao-b200-a", "rebellions-beta"),  # "(" sorts before "L": tenants sort by code point
        ("kakao-b200-a", "lg-exaone"),
        ("naver-h200-a", "snu-ai-lab-h200"),
        ("naver-h200-a", "naver-startup"),
        ("nhn-b200-a", "kaist-nlp"),
        ("nhn-b200-a", "snu-ai-lab"),
        ("nhn-b200-a", "upstage-fm"),
    ]
    assert report.time_zone == "Asia/Seoul"
    assert build_report(list(reversed(ledger())), MONTH) == report


def test_hours_are_rounded_once_half_up(report: Report) -> None:
    rows = {row.allocation: row for row in report.rows}
    assert rows["rebellions-beta"].used_gpu_hours == Decimal("0.005")  # 18 s
    assert rows["kaist-nlp"].used_gpu_hours == Decimal("0.003")  # 9 s = 0.0025 h
    assert rows["upstage-fm"].used_gpu_hours == Decimal("669787.380")
    assert rows["upstage-fm"].utilisation_percent == Decimal("87.9")
    assert rows["naver-startup"].utilisation_percent is None
    assert utilisation_percent(1, 2000) == Decimal("0.1")


def test_totals_are_summed_from_exact_seconds(report: Report) -> None:
    by_scope = {(total.scope, total.key): total for total in report.totals}
    assert [(total.scope, total.key) for total in report.totals] == [
        ("pool", "kakao-b200-a"),
        ("pool", "naver-h200-a"),
        ("pool", "nhn-b200-a"),
        ("gpuModel", "B200"),
        ("gpuModel", "H200"),
        ("provider", "kakao"),
        ("provider", "naver"),
        ("provider", "nhn"),
        ("all", ""),
    ]
    everything = by_scope[("all", "")]
    assert everything.allocations == 7
    assert everything.used_gpu_seconds == sum(row.used_gpu_seconds for row in report.rows)
    assert everything.granted_gpus == 1024 + 64 + 16 + 512 + 8 + 32
    kakao = by_scope[("pool", "kakao-b200-a")]
    assert kakao.used_gpu_seconds == 1_300_000_019
    assert by_scope[("gpuModel", "B200")].pod_count == 212 + 37 + 1 + 64 + 3


def test_an_empty_month_still_renders() -> None:
    empty = build_report(ledger(), "2027-01")
    assert empty.rows == ()
    assert [total.scope for total in empty.totals] == ["all"]
    for name in ("csv", "json", "xlsx", "html"):
        assert render(empty, name)
    with pytest.raises(ValueError, match="unknown report format"):
        render(empty, "pdf")


# --- reproducible bytes --------------------------------------------------------------------------


def test_csv_and_json_are_reproducible_and_match_their_golden_files(report: Report) -> None:
    csv_bytes, json_bytes = to_csv(report), to_json(report)
    again = build_report(ledger(), MONTH)
    assert to_csv(again) == csv_bytes
    assert to_json(again) == json_bytes
    check_golden("report-2026-10.csv", csv_bytes)
    check_golden("report-2026-10.json", json_bytes)


def test_xlsx_and_html_are_reproducible(report: Report) -> None:
    assert to_xlsx(report) == to_xlsx(build_report(ledger(), MONTH))
    assert to_html(report) == to_html(build_report(ledger(), MONTH))


def test_csv_opens_in_excel_with_korean_text(report: Report) -> None:
    data = to_csv(report)
    assert data.startswith(b"\xef\xbb\xbf")
    assert b"\r\n" in data
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert "서울대학교 AI연구실" in data.decode("utf-8-sig")


def test_text_that_looks_like_a_formula_stays_text() -> None:
    sneaky = build_report([record("x", '=HYPERLINK("http://evil")', "@org", "nhn-b200-a", 8, 10)], MONTH)
    first_row = csv_tables(to_csv(sneaky))[0][0]
    assert first_row["tenant"] == '\'=HYPERLINK("http://evil")'
    sheet = load_workbook(io.BytesIO(to_xlsx(sneaky)))["Usage"]
    assert sheet["C2"].data_type == "s"
    assert sheet["C2"].value == '=HYPERLINK("http://evil")'


def test_ids_and_months_survive_a_spreadsheet() -> None:
    """Issue 14: a 20-digit contract id written bare became 2.026E+19 in Excel; ids with leading zeros, and months,
    would change too. Read back as a spreadsheet reads a CSV, every text cell is the text written."""
    contract = "20260000000000000001"
    odd = build_report([record("x", "00123", "1E5", "nhn-b200-a", 8, 10, contract=contract)], MONTH)
    data = to_csv(odd)
    line = next(csv.reader(io.StringIO(data.decode("utf-8-sig").split("\r\n")[1])))
    cells = dict(zip([column.key for column in ROW_COLUMNS], line, strict=True))
    assert spreadsheet_value(cells["contract"]) == contract
    assert spreadsheet_value(cells["tenant"]) == "00123"
    assert spreadsheet_value(cells["organization"]) == "1E5"
    assert spreadsheet_value(cells["month"]) == MONTH
    assert spreadsheet_value(cells["grantedGPUs"]) == 8.0  # numbers stay numbers
    sneaky = build_report([record("x", '1"2', "=1+1", "nhn-b200-a", 8, 10, contract='"5')], MONTH)
    row = csv_tables(to_csv(sneaky))[0][0]
    assert (row["tenant"], row["organization"], row["contract"]) == ('1"2', "'=1+1", '"5')


# --- the same numbers everywhere -----------------------------------------------------------------


def as_number(value: object) -> Decimal | None:
    if value is None or value == "":
        return None
    return Decimal(str(value))


def same(expected: dict[str, Any], actual: dict[str, Any], where: str) -> None:
    assert set(actual) == set(expected), where
    for key, value in expected.items():
        if isinstance(value, str):
            assert actual[key] == value, f"{where}.{key}"
        else:
            assert as_number(actual[key]) == as_number(value), f"{where}.{key}: {actual[key]!r} != {value!r}"


def spreadsheet_value(field: str) -> str | float:
    """A CSV field as a spreadsheet reads it: a constant text formula shows its text, anything that parses as a
    number becomes a double (15 significant digits), the rest stays text."""
    if field.startswith('="') and field.endswith('"'):
        return field[2:-1].replace('""', '"')
    assert not field.startswith("="), f"a formula a spreadsheet would run: {field}"
    try:
        return float(field)
    except ValueError:
        return field


def unwrap_text(field: str) -> str:
    value = spreadsheet_value(field)
    return value if isinstance(value, str) else field


def csv_tables(data: bytes) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    text = data.decode("utf-8-sig")
    rows_part, totals_part, *_ = text.split("\r\n\r\n")
    rows = [[unwrap_text(field) for field in line] for line in csv.reader(io.StringIO(rows_part))]
    totals = [[unwrap_text(field) for field in line] for line in csv.reader(io.StringIO(totals_part))]
    assert rows[0] == [column.title for column in ROW_COLUMNS]
    assert totals[0] == [column.title for column in TOTAL_COLUMNS]
    keys_of_rows = [column.key for column in ROW_COLUMNS]
    keys_of_totals = [column.key for column in TOTAL_COLUMNS]
    return (
        [dict(zip(keys_of_rows, line, strict=True)) for line in rows[1:] if line],
        [dict(zip(keys_of_totals, line, strict=True)) for line in totals[1:] if line],
    )


def xlsx_tables(data: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    workbook = load_workbook(io.BytesIO(data))
    assert workbook.sheetnames == ["Usage", "Totals", "Daily", "History", "Pool identity"]
    tables = []
    for sheet, columns in ((workbook["Usage"], ROW_COLUMNS), (workbook["Totals"], TOTAL_COLUMNS)):
        lines = list(sheet.iter_rows())
        assert [cell.value for cell in lines[0]] == [column.title for column in columns]
        table = []
        for line in lines[1:]:
            for cell, column in zip(line, columns, strict=True):
                if column.kind != "text" and cell.value is not None:
                    assert cell.data_type == "n", f"{column.key} is not a numeric cell"
            table.append(
                {
                    column.key: ("" if cell.value is None and column.kind == "text" else cell.value)
                    for cell, column in zip(line, columns, strict=True)
                }
            )
        tables.append(table)
    return tables[0], tables[1]


class TableReader(HTMLParser):
    """Collects <td data-key> texts of the tables with an id."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[dict[str, str]]] = {}
        self.table: str | None = None
        self.key: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "table":
            self.table = attributes.get("id")
            if self.table:
                self.tables[self.table] = []
        elif tag == "tr" and self.table and self.key is None:
            self.tables[self.table].append({})
        elif tag == "td" and self.table:
            self.key = attributes.get("data-key")
            self.tables[self.table][-1][self.key or ""] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self.key = None
        elif tag == "table":
            self.table = None

    def handle_data(self, data: str) -> None:
        if self.table and self.key:
            self.tables[self.table][-1][self.key] += data


def html_tables(page: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    reader = TableReader()
    reader.feed(page)
    # The first <tr> of each table is the header: it has no data cells. The page names scopes for people; the
    # scope's key is what the other formats hold.
    scope_keys = {title: key for key, title in SCOPE_TITLES.items()}
    return (
        [row for row in reader.tables["rows"] if row],
        [row | {"scope": scope_keys[row["scope"]]} for row in reader.tables["totals"] if row],
    )


def test_every_format_shows_the_numbers_of_the_json(report: Report) -> None:
    document = json.loads(to_json(report))
    assert document["month"] == MONTH
    for name, (rows, totals) in {
        "csv": csv_tables(to_csv(report)),
        "xlsx": xlsx_tables(to_xlsx(report)),
        "html": html_tables(to_html(report)),
    }.items():
        assert len(rows) == len(document["rows"]), name
        assert len(totals) == len(document["totals"]), name
        for index, (expected, actual) in enumerate(zip(document["rows"], rows, strict=True)):
            same(expected, actual, f"{name} row {index}")
        for index, (expected, actual) in enumerate(zip(document["totals"], totals, strict=True)):
            same(expected, actual, f"{name} total {index}")


def test_html_is_self_contained_with_a_chart_per_pool_and_korean_text_escaped(report: Report) -> None:
    page = to_html(report)
    assert page.isascii()
    assert "<script" not in page
    assert not re.search(r"(src|href)=|@import|url\(", page)
    assert [link for link in re.findall(r"https?://[^\"' ]+", page) if link != "http://www.w3.org/2000/svg"] == []
    assert page.count("<svg") == 3 + 1 + 3  # three pools, the top tenants, and each pool's days
    assert "<베타>" not in page
    reader = TableReader()
    reader.feed(page)
    tenants = {row["tenant"] for row in reader.tables["rows"] if row}
    assert "(주)리벨리온 & 파트너스 <베타>" in tenants
    assert "서울대학교 AI연구실" in tenants


def test_each_pools_days_and_what_predates_them_add_up_to_its_total(report: Report) -> None:
    totals = {total.key: total for total in report.totals if total.scope == "pool"}
    assert [series.pool for series in report.daily] == sorted(totals)
    for series in report.daily:
        assert len(series.days) == 31
        assert series.days[0].day == "2026-10-01"
        assert sum(day.used_gpu_seconds for day in series.days) + series.unsplit_used_gpu_seconds == (
            totals[series.pool].used_gpu_seconds
        )
        assert sum(day.granted_gpu_seconds for day in series.days) + series.unsplit_granted_gpu_seconds == (
            totals[series.pool].granted_gpu_seconds
        )
    # Only the deleted allocation's record predates daily figures.
    unsplit = {series.pool: series.unsplit_used_gpu_seconds for series in report.daily}
    assert unsplit == {"kakao-b200-a": 1_300_000_001, "naver-h200-a": 0, "nhn-b200-a": 0}


def test_the_daily_sheet_and_page_show_the_days_of_the_json(report: Report) -> None:
    document = json.loads(to_json(report))
    expected = [{"pool": series["pool"], **day} for series in document["daily"] for day in series["days"]]
    sheet = load_workbook(io.BytesIO(to_xlsx(report)))["Daily"]
    lines = [[cell.value for cell in line] for line in sheet.iter_rows()]
    assert lines[0] == ["Pool", "Day", "Granted GPU-hours", "Used GPU-hours"]
    assert [dict(zip(["pool", "day", "grantedGPUHours", "usedGPUHours"], line, strict=True)) for line in lines[1:]] == (
        expected
    )
    page = to_html(report)
    for series in document["daily"]:
        day = series["days"][30]
        assert f"{day['day']}: granted {day['grantedGPUHours']:.3f}, used {day['usedGPUHours']:.3f} GPU-hours" in page
    assert "booked before records kept daily figures" in page


def test_the_page_has_a_row_per_tenant_with_its_organisation_and_contract(report: Report) -> None:
    reader = TableReader()
    reader.feed(to_html(report))
    tenants = [row for row in reader.tables["tenants"] if row]
    snu = [row for row in tenants if row["tenant"] == "서울대학교 AI연구실"]
    assert snu == [  # sorted by contract: the H200 allocation has none
        {
            "tenant": "서울대학교 AI연구실",
            "organization": "서울대학교",
            "contract": "",
            "allocations": "1",
            "grantedGPUHours": "23808.000",
            "usedGPUHours": "13888.889",
            "busyGPUHours": "",
            "utilisationPercent": "58.3",
            "idleHours": "2.000",
            "downGPUHours": "0.000",
        },
        {
            "tenant": "서울대학교 AI연구실",
            "organization": "서울대학교",
            "contract": "NIPA-2026-114",
            "allocations": "1",
            "grantedGPUHours": "47616.000",
            "usedGPUHours": "34293.553",
            "busyGPUHours": "",
            "utilisationPercent": "72.0",
            "idleHours": "24.000",
            "downGPUHours": "16.000",
        },
    ]
    assert len(tenants) == len({(r.tenant, r.organization, r.contract) for r in report.rows})


def test_the_month_s_changes_are_an_appendix_in_every_format_but_csv(report: Report) -> None:
    assert [(line.at, line.allocation, line.by, line.changes) for line in report.history] == [
        ("2026-10-01T00:00:00Z", "upstage-fm", "nipa-officer-kim", "gpus 512 -> 1024"),
        ("2026-10-20T09:00:00Z", "upstage-fm", "nipa-officer-lee", "suspended; priority 0 -> 5"),
        ("2026-10-24T00:00:00Z", "lg-exaone", "nipa-officer-kim", "deleted"),
    ]
    document = json.loads(to_json(report))
    assert [line["by"] for line in document["history"]] == ["nipa-officer-kim", "nipa-officer-lee", "nipa-officer-kim"]
    sheet = load_workbook(io.BytesIO(to_xlsx(report)))["History"]
    assert [cell.value for cell in next(sheet.iter_rows())] == [
        "When (UTC)",
        "Allocation",
        "Tenant",
        "Requested by",
        "Change",
    ]
    assert sheet.max_row == 1 + 3
    reader = TableReader()
    reader.feed(to_html(report))
    assert [row["changes"] for row in reader.tables["history"] if row] == [line.changes for line in report.history]


def test_each_pool_s_program_adds_up_and_every_format_shows_it(report: Report) -> None:
    """program = granted in service + unallocated + down, per pool; the credit shows in the allocation's row too."""
    assert [identity.pool for identity in report.pools] == ["naver-h200-a", "nhn-b200-a"]  # October's only
    assert report.unbalanced_pools() == []
    nhn = report.pools[1]
    assert nhn.ledger.program_gpu_seconds == 1200 * OCTOBER_HOURS * 3600
    assert nhn.ledger.down_gpu_seconds == nhn.ledger.credited_gpu_seconds == NODE_DOWN_SECONDS
    assert nhn.allocations_credited_gpu_seconds == NODE_DOWN_SECONDS
    assert [row.down_gpu_seconds for row in report.rows if row.allocation == "snu-ai-lab"] == [NODE_DOWN_SECONDS]
    document = json.loads(to_json(report))
    expected = document["poolIdentity"]
    assert [line["addsUp"] for line in expected] == ["yes", "yes"]
    assert expected[1]["downGPUHours"] == 16.0
    text = to_csv(report).decode("utf-8-sig").split("\r\n\r\n")[2]
    lines = [[unwrap_text(field) for field in line] for line in csv.reader(io.StringIO(text)) if line]
    assert lines[0] == [column.title for column in POOL_IDENTITY_COLUMNS]
    keys = [column.key for column in POOL_IDENTITY_COLUMNS]
    for index, line in enumerate(lines[1:]):
        same(expected[index], dict(zip(keys, line, strict=True)), f"csv pool {index}")
    sheet = load_workbook(io.BytesIO(to_xlsx(report)))["Pool identity"]
    for index, line in enumerate(list(sheet.iter_rows())[1:]):
        same(expected[index], {key: cell.value for key, cell in zip(keys, line, strict=True)}, f"xlsx pool {index}")
    reader = TableReader()
    reader.feed(to_html(report))
    for index, line in enumerate(row for row in reader.tables["pools"] if row):
        same(expected[index], line, f"html pool {index}")


def test_a_pool_record_that_does_not_add_up_is_named_with_its_gap() -> None:
    broken = pool_record("nhn-b200-a", "B200", "nhn", 1200, 1104, NODE_DOWN_SECONDS, NODE_DOWN_SECONDS)
    broken.ledger.unallocated_gpu_seconds -= 7
    report = build_report([*ledger_without_history(), broken], MONTH)
    assert report.unbalanced_pools() == [
        f"pool nhn-b200-a: program {1200 * OCTOBER_HOURS * 3600} GPU-s != granted in service "
        f"{broken.ledger.usable_granted_gpu_seconds} + unallocated {broken.ledger.unallocated_gpu_seconds} + down "
        f"{NODE_DOWN_SECONDS} (off by 7)"
    ]
    assert json.loads(to_json(report))["poolIdentity"][0]["addsUp"] == "no: off by 7 GPU-seconds"


def test_busy_hours_sit_beside_the_held_ones_by_namespace() -> None:
    """dcgm-exporter's utilisation, summed per namespace, is the rows' busy GPU-hours; measured rows without samples
    were idle (0), and a report without Prometheus leaves the column empty."""
    plain = build_report(ledger(), MONTH)
    assert {row.busy_gpu_seconds for row in plain.rows} == {None}
    assert plain.totals[-1].busy_gpu_seconds is None
    busy = {("", "upstage-fm"): 2_000_000_000, ("nhn", "snu-ai-lab"): 100_000_000, ("naver", "snu-ai-lab"): 7}
    report = with_busy(plain, busy)
    by_allocation = {row.allocation: row.busy_gpu_seconds for row in report.rows}
    assert by_allocation["upstage-fm"] == 2_000_000_000
    assert by_allocation["snu-ai-lab"] == 100_000_007  # a single cluster's report takes any cluster label
    assert by_allocation["kaist-nlp"] == 0
    assert report.totals[-1].busy_gpu_seconds == 2_100_000_007
    document = json.loads(to_json(report))
    assert {row["allocation"]: row["busyGPUHours"] for row in document["rows"]}["upstage-fm"] == 555555.556
    assert report.rows[0].used_gpu_seconds == plain.rows[0].used_gpu_seconds  # nothing else moves
