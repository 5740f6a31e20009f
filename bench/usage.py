"""Usage benchmarks on the local cluster with the program scenario (1,307 nodes, 10,456 GPUs).

1. N allocations (default 3,000), then `/metrics` scrape time and `gpuaas report` time for a month.
2. About 10,000 running 1-GPU pods spread over the admitted allocations: operator CPU and memory, ledger
   write rate.
3. Churn: RATE pod ends and RATE pod starts per second for a while: operator CPU and memory, ledger
   write rate, and whether every ended pod was booked and released.

Usage: python bench/usage.py [--allocations 3000] [--pods 10000] [--churn-rate 10] [--churn-seconds 60]
[--memray heap.bin (then: python -m memray flamegraph heap.bin, which shows the peak)]
[--profile churn.txt (py-spy's collapsed stacks of the churn; those of the steady pods go to churn-steady.txt)]
Writes bench/results/usage.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from allocations import (
    KUBECONFIG,
    REPO,
    cpu_seconds,
    decided,
    fresh_cluster,
    gc_pauses,
    gpuaas,
    manifest,
    metric_value,
    sampled,
    start_operator,
    status_kib,
    stop_sampling,
)
from report import report_steps

from gpuaas.k8s.client import new_api_client

METRICS = "http://127.0.0.1:18180/metrics"


def rss_mib(pid: int) -> float:
    return status_kib(pid, "VmRSS") / 1024


def scrape() -> tuple[float, str]:
    started = time.monotonic()
    with urllib.request.urlopen(METRICS, timeout=30) as response:
        body = response.read().decode()
    return time.monotonic() - started, body


def pod(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "containers": [
                {
                    "name": "w",
                    "image": "trainer",
                    "resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"cpu": "1", "memory": "1Gi"}},
                }
            ]
        },
    }


def create_pod(core: client.CoreV1Api, namespace: str, body: dict[str, Any]) -> None:
    """Create it, once the namespace's default ServiceAccount exists: the API server refuses pods before that, and a
    namespace made moments ago may not have it yet."""
    deadline = time.monotonic() + 60
    while True:
        try:
            core.create_namespaced_pod(namespace, body)
            return
        except client.ApiException as error:
            waiting = error.status == 403 and "serviceaccount" in str(error.body) and time.monotonic() < deadline
            if not waiting:
                raise
            time.sleep(1)


def measure(pid: int, seconds: float, profile: str | None = None, rate: int = 50) -> dict[str, float]:
    """Operator CPU (cores) and peak RSS, and ledger writes per second, over `seconds`."""
    profiler = sampled(pid, profile, rate)
    cpu0, writes0 = cpu_seconds(pid), metric_value(scrape()[1], "gpuaas_ledger_writes_total")
    peak = 0.0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        peak = max(peak, rss_mib(pid))
        time.sleep(1)
    stop_sampling(profiler)
    writes1 = metric_value(scrape()[1], "gpuaas_ledger_writes_total")
    return {
        "operator_cpu_cores": round((cpu_seconds(pid) - cpu0) / seconds, 3),
        "operator_peak_rss_mib": round(peak, 1),
        "ledger_writes_per_second": round((writes1 - writes0) / seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--allocations", type=int, default=3000)
    parser.add_argument("--pods", type=int, default=10000)
    parser.add_argument("--churn-rate", type=float, default=10, help="pod ends per second (and as many starts)")
    parser.add_argument("--churn-seconds", type=float, default=60)
    parser.add_argument("--settle-seconds", type=float, default=60)
    parser.add_argument("--out", default="usage.json", help="File name under bench/results/.")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="Collapsed stacks of the operator during the churn, by py-spy (on PATH, sampling without pausing it); "
        "those of the steady pods go beside it, with -steady before the suffix.",
    )
    parser.add_argument("--profile-rate", type=int, default=50, help="py-spy's samples a second.")
    parser.add_argument(
        "--memray", metavar="FILE", help="Run the operator under memray (aggregated; needs memray installed) into FILE."
    )
    options = parser.parse_args()
    result: dict[str, Any] = {"scenario": "program", "nodes": 1307}
    fresh_cluster()
    operator = start_operator(("-m", "memray", "run", "--aggregate", "-o", options.memray) if options.memray else ())
    try:
        with new_api_client(str(KUBECONFIG), pool_size=32) as api:
            custom = client.CustomObjectsApi(api)
            core = client.CoreV1Api(api)
            bodies = [manifest(index, "use") for index in range(options.allocations)]
            with ThreadPoolExecutor(16) as executor:
                list(executor.map(
                    lambda b: custom.create_cluster_custom_object("gpuaas.io", "v1alpha1", "gpuallocations", b), bodies
                ))  # fmt: skip
            while True:
                items = custom.list_cluster_custom_object("gpuaas.io", "v1alpha1", "gpuallocations")["items"]
                if len(items) == options.allocations and all(decided(i) for i in items):
                    break
                time.sleep(1)
            active = [
                (i["metadata"]["name"], i["status"]["grantedGPUs"]) for i in items if i["status"]["phase"] == "Active"
            ]
            time.sleep(5)
            times = [scrape()[0] for _ in range(20)]
            result["metrics_scrape_seconds"] = {
                "allocations": options.allocations,
                "p50": round(statistics.median(times), 3),
                "max": round(max(times), 3),
                "bytes": len(scrape()[1]),
            }

            steady_profile = None
            if options.profile:
                path = Path(options.profile)
                steady_profile = str(path.with_name(f"{path.stem}-steady{path.suffix}"))
            # About `pods` running 1-GPU pods, spread over the admitted grants.
            names: list[tuple[str, str]] = []
            for allocation_name, granted in active:
                for index in range(granted):
                    if len(names) < options.pods:
                        names.append((f"w{index}", allocation_name))
            if not names:
                phases = sorted({(i.get("status") or {}).get("phase", "") for i in items})
                raise RuntimeError(f"no admitted allocation to run pods in; phases seen: {phases}")
            started = time.monotonic()
            with ThreadPoolExecutor(32) as executor:
                list(executor.map(lambda n: create_pod(core, n[1], pod(*n)), names))
            created = time.monotonic() - started
            while True:
                running = sum(
                    1 for p in core.list_pod_for_all_namespaces(field_selector="status.phase=Running").items
                    if p.metadata.namespace.startswith("use-")
                )  # fmt: skip
                if running >= len(names):
                    break
                time.sleep(2)
            result["running_pods"] = {
                "pods": len(names),
                "create_seconds": round(created, 1),
                **measure(operator.pid, options.settle_seconds, steady_profile, options.profile_rate),
            }

            # Churn: end RATE pods and start RATE new ones every second.
            churn_pods = names[: int(options.churn_rate * options.churn_seconds)]
            failed_starts: list[str] = []

            def churn() -> None:
                """Every second: end RATE pods, and start replacements for the pods ended a second earlier
                (an ended pod holds its quota until the ledger books it and it is gone)."""
                batch = int(options.churn_rate)
                waiting: list[tuple[str, str]] = []
                for offset in range(0, len(churn_pods), batch):
                    tick = time.monotonic()
                    for name, namespace in waiting:
                        try:
                            core.create_namespaced_pod(namespace, pod(f"{name}-next", namespace))
                        except client.ApiException as error:
                            if error.status != 403:
                                raise
                            failed_starts.append(name)
                    waiting = churn_pods[offset : offset + batch]
                    for name, namespace in waiting:
                        core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
                    time.sleep(max(0.0, 1 - (time.monotonic() - tick)))

            cpu0, writes0 = cpu_seconds(operator.pid), metric_value(scrape()[1], "gpuaas_ledger_writes_total")
            churn_started = time.monotonic()
            peak = 0.0
            churn_scrapes: list[float] = []
            outside = REPO / ".cluster" / "bench-scrapes.jsonl"
            stop = REPO / ".cluster" / "bench-scrapes.stop"
            outside.unlink(missing_ok=True)
            stop.unlink(missing_ok=True)
            scraper = subprocess.Popen([sys.executable, str(Path(__file__).parent / "scraper.py"), METRICS,
                                        str(outside), str(stop)])  # fmt: skip
            profiler = sampled(operator.pid, options.profile, options.profile_rate)
            with ThreadPoolExecutor(1) as executor:
                future = executor.submit(churn)
                while not future.done():
                    tick = time.monotonic()
                    peak = max(peak, rss_mib(operator.pid))
                    churn_scrapes.append(scrape()[0])  # as Prometheus would, once a second
                    time.sleep(max(0.0, 1 - (time.monotonic() - tick)))
                future.result()
            stop.touch()
            scraper.wait(timeout=60)
            stop_sampling(profiler)
            apart = [json.loads(line) for line in outside.read_text().splitlines()]
            elapsed = time.monotonic() - churn_started
            text = scrape()[1]
            writes1 = metric_value(text, "gpuaas_ledger_writes_total")
            result["gc_pauses"] = gc_pauses(text)
            cpu = (cpu_seconds(operator.pid) - cpu0) / elapsed
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                lingering = [
                    p for p in core.list_pod_for_all_namespaces().items
                    if p.metadata.namespace.startswith("use-") and p.metadata.deletion_timestamp
                ]  # fmt: skip
                if not lingering:
                    break
                time.sleep(2)
            result["churn"] = {
                "ends_per_second": options.churn_rate,
                "starts_per_second": options.churn_rate,
                "seconds": round(elapsed, 1),
                "operator_cpu_cores": round(cpu, 3),
                "operator_peak_rss_mib": round(peak, 1),
                "ledger_writes_per_second": round((writes1 - writes0) / elapsed, 2),
                "ended_pods_not_yet_released_after_2_minutes": len(lingering),
                "metrics_scrapes": len(churn_scrapes),
                "metrics_scrape_p50_seconds": round(statistics.median(churn_scrapes), 3),
                "metrics_scrape_max_seconds": round(max(churn_scrapes), 3),
                # The same, from a process of its own (bench/scraper.py), split into connect, server and read.
                "metrics_scrapes_apart": len(apart),
                "metrics_scrape_apart_p50_seconds": round(statistics.median(s["total"] for s in apart), 3),
                "metrics_scrape_apart_max_seconds": round(max(s["total"] for s in apart), 3),
                "metrics_scrape_apart_slowest": sorted(apart, key=lambda s: -s["total"])[:5],
                "starts_refused_because_the_ended_pod_still_held_quota": len(failed_starts),
            }

        month = time.strftime("%Y-%m", time.gmtime(time.time() + 9 * 3600))
        runs = []
        for _ in range(3):
            started = time.monotonic()
            gpuaas("report", "--month", month, "--format", "csv", "--kubeconfig", str(KUBECONFIG), "--out",
                   str(REPO / ".cluster" / "bench-report.csv"))  # fmt: skip
            runs.append(time.monotonic() - started)
        result["report_seconds"] = {"allocations": options.allocations, "runs": [round(r, 2) for r in runs]}
        result["report_breakdown_seconds"] = report_steps(month, KUBECONFIG)
    finally:
        operator.terminate()
        operator.wait()
        gpuaas("cluster", "down", "--name", "gpuaas-bench")
    out = REPO / "bench" / "results" / options.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
