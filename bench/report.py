"""`gpuaas report --format csv` for one cluster, as a user runs it (a process, Python start-up included), on a ledger
that holds the report's month and the months before it: N busy allocation-months per month, as a program's ledger
grows by one month of records every month.

Each run also times the report's steps in a fresh process (imports, listing and parsing, building, CSV).

Usage: python bench/report.py [--records 3000] [--months-before 5] [--runs 5] [--out report.json]
Writes bench/results/report.json (or the --out name).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client
from report_merge import REPO, gpuaas, record

from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.usage import USAGE_PLURAL
from gpuaas.k8s.client import new_api_client

CLUSTER = "gpuaas-bench-report"
KUBECONFIG = REPO / ".cluster" / f"{CLUSTER}.kubeconfig"
MONTH = "2026-10"


def month_before(month: str, count: int) -> str:
    year, number = (int(part) for part in month.split("-"))
    index = year * 12 + number - 1 - count
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


def fill(records: int, months: list[str]) -> float:
    """Creates `records` records in each month; returns the seconds it took."""
    started = time.monotonic()
    with new_api_client(str(KUBECONFIG), pool_size=16) as api:
        objects = client.CustomObjectsApi(api)

        def create(item: tuple[str, int]) -> None:
            month, index = item
            body = record("nhn", index, month).to_object()
            objects.create_cluster_custom_object(GROUP, VERSION, USAGE_PLURAL, body, _preload_content=False)

        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(create, [(month, index) for month in months for index in range(records)]))
    return time.monotonic() - started


def timed_report(month: str) -> float:
    command = [sys.executable, "-m", "gpuaas", "report", "--month", month, "--format", "csv"]
    started = time.perf_counter()
    subprocess.run([*command, "--kubeconfig", str(KUBECONFIG)], capture_output=True, check=True, cwd=REPO)
    return time.perf_counter() - started


# The report's steps timed in a fresh process, as `gpuaas report` runs them.
_REPORT_STEPS = """
import inspect, json, sys, time
started = time.monotonic()
from gpuaas.cli import build_report, read_ledgers, render
from gpuaas.k8s.ledger_reader import LedgerSource
imported = time.monotonic()
by_month = len(inspect.signature(read_ledgers).parameters) > 1  # the code before the month's listing lists all
ledgers = read_ledgers([LedgerSource("", sys.argv[1])], *([sys.argv[2]] if by_month else []))
read = time.monotonic()
report = build_report(ledgers[""], sys.argv[2])
built = time.monotonic()
data = render(report, "csv")
rendered = time.monotonic()
print(json.dumps({"imports": imported - started, "list_and_parse": read - imported, "build": built - read,
                  "render_csv": rendered - built, "records": len(ledgers[""]), "bytes": len(data)}))
"""


def report_steps(month: str, kubeconfig: Path = KUBECONFIG) -> dict[str, Any]:
    """The report's steps in seconds, timed in a fresh process (start-up is the interpreter alone)."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _REPORT_STEPS, str(kubeconfig), month], check=False, cwd=REPO, capture_output=True
    )
    if done.returncode != 0:  # a figure missing, not the whole run's results
        return {"error": done.stderr.decode(errors="replace")[-2000:]}
    steps: dict[str, Any] = json.loads(done.stdout)
    steps = {key: round(value, 3) if isinstance(value, float) else value for key, value in steps.items()}
    return {**steps, "process": round(time.monotonic() - started, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=3000, help="allocation-months per month")
    parser.add_argument("--months-before", type=int, default=5, help="earlier months of records in the ledger")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="leave the cluster up (and reuse one that is up)")
    parser.add_argument("--out", default="report.json")
    options = parser.parse_args()
    months = [month_before(MONTH, count) for count in range(options.months_before, -1, -1)]
    results: dict[str, Any] = {"records_per_month": options.records, "months": months, "report_month": MONTH}
    try:
        if not (options.keep and KUBECONFIG.exists()):
            gpuaas("cluster", "down", "--name", CLUSTER)
            gpuaas("cluster", "up", "--scenario", "small", "--name", CLUSTER)
            results["fill_seconds"] = round(fill(options.records, months), 1)
        runs = [timed_report(MONTH) for _ in range(options.runs)]
        results["csv_seconds"] = {"runs": [round(run, 3) for run in runs], "median": round(statistics.median(runs), 3)}
        results["steps_seconds"] = [report_steps(MONTH) for _ in range(3)]
        results["measured_at"] = datetime.now(UTC).isoformat()
        out = REPO / "bench" / "results" / options.out
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))
    finally:
        if not options.keep:
            gpuaas("cluster", "down", "--name", CLUSTER)


if __name__ == "__main__":
    main()
