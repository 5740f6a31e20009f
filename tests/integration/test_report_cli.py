"""`gpuaas report` as a subprocess against the real ledger: four formats, the same numbers, deleted allocations kept."""

from __future__ import annotations

import csv
import html
import io
import json
import re
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from openpyxl import load_workbook

from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.usage import MONTH_LABEL, USAGE_PLURAL, usage_name
from gpuaas.domain.ledger import month_of
from gpuaas.domain.scenarios import SCENARIOS
from gpuaas.reporting.formats import csv_cell_text
from tests.integration.allocations import allocation_manifest, delete_allocation, gpu_pod
from tests.integration.conftest import LocalCluster, OperatorProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

B200 = next(pool for pool in SCENARIOS["small"].pools if pool.name == "test-b200")
ORGANIZATION = "한국과학기술원 초거대AI연구센터"
FORMATS = ("csv", "json", "xlsx", "html")
NUMBER_COLUMNS = {
    # CSV title: JSON key
    "Granted GPUs": "grantedGPUs",
    "Granted GPU-hours": "grantedGPUHours",
    "Used GPU-hours": "usedGPUHours",
    "Utilisation %": "utilisationPercent",
    "Idle hours": "idleHours",
    "Peak GPUs in use": "peakGPUsInUse",
    "Pods": "podCount",
}


def custom(cluster: LocalCluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cluster.api)


def allocation_ready(cluster: LocalCluster, name: str) -> bool:
    status = custom(cluster).get_cluster_custom_object(GROUP, VERSION, "gpuallocations", name).get("status") or {}
    conditions = status.get("conditions") or []
    return status.get("phase") == "Active" and any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def gone(read: Any) -> bool:
    try:
        read()
    except ApiException as error:
        if error.status == 404:
            return True
        raise
    return False


def usage_record(cluster: LocalCluster, name: str) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = custom(cluster).get_cluster_custom_object(GROUP, VERSION, USAGE_PLURAL, name)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return record


def used_seconds(record: dict[str, Any] | None) -> int:
    return int(((record or {}).get("ledger") or {}).get("usedGPUSeconds", 0))


def run_report(cluster: LocalCluster, month: str, out: Path, format_name: str) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "gpuaas", "report",
            "--month", month,
            "--format", format_name,
            "--out", f"{out}/",
            "--kubeconfig", str(cluster.kubeconfig),
            "--time-zone", "Asia/Seoul",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"gpuaas report --format {format_name} failed:\n{result.stdout}\n{result.stderr}"


def write_reports(cluster: LocalCluster, month: str, out: Path) -> dict[str, Path]:
    files = {}
    for format_name in FORMATS:
        run_report(cluster, month, out, format_name)
        files[format_name] = out / f"gpuaas-report-{month}.{format_name}"
        assert files[format_name].is_file(), f"{files[format_name]} missing; have {sorted(out.iterdir())}"
    return files


def csv_row(path: Path, allocation: str) -> dict[str, str]:
    data = path.read_bytes()
    assert data.startswith(b"\xef\xbb\xbf"), "the CSV must start with a UTF-8 BOM for Excel"
    text = data.decode("utf-8-sig")
    rows_part = text.split("\r\n\r\n", 1)[0]  # rows, a blank line, then the totals
    rows = [{k: csv_cell_text(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(rows_part))]
    matches = [row for row in rows if row["Allocation"] == allocation]
    assert len(matches) == 1, f"{allocation} appears {len(matches)} times in {path}"
    return matches[0]


def json_row(path: Path, allocation: str) -> dict[str, Any]:
    document = json.loads(path.read_text(encoding="utf-8"))
    matches = [row for row in document["rows"] if row["allocation"] == allocation]
    assert len(matches) == 1, f"{allocation} appears {len(matches)} times in {path}"
    row: dict[str, Any] = matches[0]
    return row


def xlsx_row(path: Path, allocation: str) -> dict[str, Any]:
    sheet = load_workbook(path, read_only=True)["Usage"]
    rows = list(sheet.iter_rows(values_only=True))
    header = [str(title) for title in rows[0]]
    matches = [dict(zip(header, row, strict=True)) for row in rows[1:] if row[header.index("Allocation")] == allocation]
    assert len(matches) == 1, f"{allocation} appears {len(matches)} times in {path}"
    return matches[0]


def html_row(path: Path, allocation: str) -> dict[str, str]:
    """The allocation's row of the HTML usage table, by the cells' data-key (the JSON keys)."""
    page = path.read_text(encoding="utf-8")
    text = page[page.index('<table id="rows">') :]
    text = text[: text.index("</table>")]
    rows = [
        {key: html.unescape(value) for key, value in re.findall(r'<td data-key="(\w+)"[^>]*>([^<]*)</td>', row)}
        for row in re.findall(r"<tr>(.*?)</tr>", text, flags=re.DOTALL)
    ]
    matches = [row for row in rows if row.get("allocation") == allocation]
    assert len(matches) == 1, f"{allocation} appears {len(matches)} times in the tables of {path}"
    return matches[0]


def decimal(value: object) -> Decimal | None:
    if value is None or value == "":
        return None
    return Decimal(str(value))


def assert_same_numbers(files: dict[str, Path], allocation: str) -> dict[str, Any]:
    """The allocation's row carries the same numbers in CSV, JSON and XLSX, and appears in the HTML."""
    from_csv, from_json, from_xlsx = (
        csv_row(files["csv"], allocation),
        json_row(files["json"], allocation),
        xlsx_row(files["xlsx"], allocation),
    )
    for title, key in NUMBER_COLUMNS.items():
        expected = decimal(from_json[key])
        assert decimal(from_csv[title]) == expected, (title, from_csv[title], from_json[key])
        assert decimal(from_xlsx[title]) == expected, (title, from_xlsx[title], from_json[key])
    for title, key in (("Tenant", "tenant"), ("Organization", "organization"), ("Pool", "pool")):
        assert from_csv[title] == from_json[key] == from_xlsx[title]
    assert from_json["organization"] == ORGANIZATION
    from_html = html_row(files["html"], allocation)
    for key in NUMBER_COLUMNS.values():
        assert decimal(from_html[key]) == decimal(from_json[key]), (key, from_html[key], from_json[key])
    assert from_html["organization"] == ORGANIZATION
    return from_json


def test_report_of_the_current_month_in_every_format(
    cluster: LocalCluster, operator: OperatorProcess, tmp_path: Path
) -> None:
    name = f"rep-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(cluster.api)
    custom(cluster).create_cluster_custom_object(
        GROUP, VERSION, "gpuallocations", allocation_manifest(name, B200.name, 8, organization=ORGANIZATION)
    )
    deleted = False
    try:
        wait_for(lambda: allocation_ready(cluster, name), timeout=60, message=f"{name} Active and Ready")
        core.create_namespaced_pod(name, gpu_pod("train-0", name, 8))
        wait_for(
            lambda: core.read_namespaced_pod("train-0", name).status.phase == "Running",
            timeout=60,
            message="GPU pod Running",
        )
        time.sleep(3)  # a few GPU-seconds to book
        core.delete_namespaced_pod("train-0", name)
        # The usage-ledger finalizer holds the pod until the operator has booked it.
        wait_for(lambda: gone(lambda: core.read_namespaced_pod("train-0", name)), timeout=60, message="pod deleted")

        month = month_of(datetime.now(UTC), "Asia/Seoul")
        record_name = usage_name(name, month)
        wait_for(
            lambda: used_seconds(usage_record(cluster, record_name)) > 0,
            timeout=60,
            message=f"GpuUsage {record_name} with usedGPUSeconds > 0",
        )

        files = write_reports(cluster, month, tmp_path / "live")
        row = json_row(files["json"], name)
        assert row["usedGPUHours"] > 0
        assert row["podCount"] >= 1
        assert row["grantedGPUs"] == 8
        assert row["gpuModel"] == B200.gpu_model
        # No pod runs any more, so used hours are settled (granted hours still grow while the grant lasts).
        assert decimal(csv_row(files["csv"], name)["Used GPU-hours"]) == decimal(row["usedGPUHours"])
        assert decimal(xlsx_row(files["xlsx"], name)["Used GPU-hours"]) == decimal(row["usedGPUHours"])

        # A record relabelled (no admission policy here: the chart installs it) heals at its next ledger write,
        # the final one below; the report, which lists its month by label, would otherwise miss it.
        cluster.kubectl("label", "gpuusage", record_name, f"{MONTH_LABEL}=1999-01", "--overwrite")
        delete_allocation(cluster, name, timeout=90)
        deleted = True

        # The ledger outlives the allocation.
        record = usage_record(cluster, record_name)
        assert record is not None, f"GpuUsage {record_name} was deleted with its allocation"
        assert used_seconds(record) > 0
        assert record["metadata"]["labels"][MONTH_LABEL] == month
        # Its final flush was written before the release let the allocation go: later passes add nothing.
        settled = record["ledger"]
        operator.wait_passes(B200.name)
        assert (usage_record(cluster, record_name) or {}).get("ledger") == settled

        files = write_reports(cluster, month, tmp_path / "after-delete")
        after = assert_same_numbers(files, name)
        assert decimal(after["usedGPUHours"]) == decimal(row["usedGPUHours"])
        assert decimal(after["grantedGPUHours"]) >= decimal(row["grantedGPUHours"])  # type: ignore[operator]
    finally:
        if not deleted:
            delete_allocation(cluster, name, timeout=90)


def test_report_rejects_a_bad_month() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpuaas", "report", "--month", "2026-13"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "YYYY-MM" in result.stderr
