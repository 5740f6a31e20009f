"""The program office's merged report: three local clusters (one per provider), each with N allocation-months of
ledger records, read and merged by `gpuaas report --context` x 3, timed per format as a user runs it (a process,
Python start-up included).

Each record is as full as a busy month makes it: a daily figure for every day, 20 pod watermarks and 3 grant-history
entries. The bench also reports the bytes that the daily figures and the history add to a record.

Usage: python bench/report_merge.py [--records 1000] [--runs 5] [--out report-merge.json]
Writes bench/results/report-merge.json (or the --out name).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.usage import USAGE_PLURAL, GpuUsage, GpuUsageSpec, GrantChange, PodWatermark, UsageLedger, UsageTenant
from gpuaas.k8s.client import new_api_client
from gpuaas.k8s.localcluster import merged_kubeconfig

REPO = Path(__file__).resolve().parents[1]
PROVIDERS = {"nhn": ("nhn-b200-a", "B200"), "kakao": ("kakao-b200-a", "B200"), "naver": ("naver-h200-a", "H200")}
MONTH = "2026-10"


def gpuaas(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "gpuaas", *args], cwd=REPO, check=True, capture_output=True)


def cluster_name(provider: str) -> str:
    return f"gpuaas-bench-{provider}"


def kubeconfig_of(provider: str) -> Path:
    return REPO / ".cluster" / f"{cluster_name(provider)}.kubeconfig"


def record(provider: str, index: int, month: str = MONTH) -> GpuUsage:
    pool, model = PROVIDERS[provider]
    gpus = 8 * (1 + index % 4)
    used_per_day = gpus * 3600 * (index % 24)
    start = datetime(int(month[:4]), int(month[5:]), 1, tzinfo=UTC)
    return GpuUsage(
        name=f"lab-{index:04d}-{month}",
        spec=GpuUsageSpec(
            allocation=f"lab-{index:04d}",
            allocation_uid=f"{provider}-{index:08d}-0000-0000-0000-000000000000",
            tenant=UsageTenant(name=f"lab-{index:04d}", organization=f"연구소 {index % 97}", contract=f"NIPA-{index}"),
            pool=pool,
            gpu_model=model,
            provider=provider,
            month=month,
        ),
        ledger=UsageLedger(
            used_gpu_seconds=31 * used_per_day,
            granted_gpu_seconds=31 * gpus * 86400,
            granted_gpus=gpus,
            peak_gpus_in_use=gpus,
            pod_count=20,
            daily_used_gpu_seconds={f"{day:02d}": used_per_day for day in range(1, 32)},
            daily_granted_gpu_seconds={f"{day:02d}": gpus * 86400 for day in range(1, 32)},
            booked_until=start + timedelta(days=31),
            pods={
                f"{index:08d}-pod-{pod:04d}-0000-000000000000": PodWatermark(gpus=8, booked_until=start)
                for pod in range(20)
            },
            history=[
                GrantChange(at=start, by="nipa-officer-kim", changes=[f"created: {gpus} GPUs of pool {pool}"]),
                GrantChange(at=start + timedelta(days=9), by="nipa-officer-lee", changes=["gpus 8 -> 16"]),
                GrantChange(at=start + timedelta(days=20), by="nipa-officer-kim", changes=["window end 2026-12-31"]),
            ],
        ),
    )


def fill(provider: str, records: int) -> None:
    with new_api_client(str(kubeconfig_of(provider)), pool_size=16) as api:
        objects = client.CustomObjectsApi(api)

        def create(index: int) -> None:
            objects.create_cluster_custom_object(GROUP, VERSION, USAGE_PLURAL, record(provider, index).to_object())

        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(create, range(records)))


def timed_report(kubeconfig: Path, contexts: list[str], format_name: str) -> tuple[float, int]:
    args = [arg for context in contexts for arg in ("--context", context)]
    command = [sys.executable, "-m", "gpuaas", "report", "--month", MONTH, "--format", format_name]
    started = time.perf_counter()
    result = subprocess.run([*command, "--kubeconfig", str(kubeconfig), *args], capture_output=True, check=True)
    return time.perf_counter() - started, len(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default="report-merge.json")
    options = parser.parse_args()
    try:
        for provider in PROVIDERS:
            gpuaas("cluster", "down", "--name", cluster_name(provider))
            gpuaas("cluster", "up", "--scenario", "small", "--name", cluster_name(provider))
            fill(provider, options.records)
        kubeconfig = REPO / ".cluster" / "gpuaas-bench-program.kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(merged_kubeconfig({p: kubeconfig_of(p) for p in PROVIDERS})))
        results: dict[str, Any] = {"records_per_cluster": options.records, "clusters": list(PROVIDERS)}
        merged_csv = [timed_report(kubeconfig, list(PROVIDERS), "csv")[0] for _ in range(options.runs)]
        single_csv = [timed_report(kubeconfig, ["nhn"], "csv")[0] for _ in range(options.runs)]
        results["merged_csv_seconds"] = {"median": statistics.median(merged_csv), "max": max(merged_csv)}
        results["single_cluster_csv_seconds"] = {"median": statistics.median(single_csv), "max": max(single_csv)}
        for format_name in ("json", "xlsx", "html"):
            seconds, size = timed_report(kubeconfig, list(PROVIDERS), format_name)
            results[f"merged_{format_name}"] = {"seconds": seconds, "bytes": size}
        sample = record("nhn", 1).ledger
        results["bytes_per_record"] = {
            "history_3_changes": len(json.dumps([c.to_wire() for c in sample.history], separators=(",", ":"))),
            "daily_figures_31_days": len(
                json.dumps(
                    {"u": sample.daily_used_gpu_seconds, "g": sample.daily_granted_gpu_seconds}, separators=(",", ":")
                )
            ),
            "whole_record": len(json.dumps(record("nhn", 1).to_object(), separators=(",", ":"))),
        }
        results["measured_at"] = datetime.now(UTC).isoformat()
        out = REPO / "bench" / "results" / options.out
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))
    finally:
        for provider in PROVIDERS:
            gpuaas("cluster", "down", "--name", cluster_name(provider))


if __name__ == "__main__":
    main()
