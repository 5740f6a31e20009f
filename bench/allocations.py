"""Allocation benchmarks on the local cluster with the program scenario (1,307 nodes).

1. Apply-to-Ready latency of single allocations on a quiet cluster (p50/p95/p99).
2. N allocations applied at once: time until every one is Ready or correctly Queued, against a plain
   server-side-apply script that writes the same Namespaces, ResourceQuotas, LimitRanges and RoleBindings
   (bench/ssa_baseline.py) on a fresh cluster.

Usage: python bench/allocations.py [--latency-samples 50] [--bulk 3000 (0: latency only)] [--out allocations.json]
[--profile latency.txt] [--profile-bulk bulk.txt] [--bulk-gpus 1 --no-baseline].
Writes bench/results/allocations.json (or the --out name).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kubernetes import client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ssa_baseline import baseline_objects, write_all

from gpuaas.domain.scenarios import SCENARIOS
from gpuaas.k8s.client import new_api_client
from gpuaas.metrics import PASS_PARTS

REPO = Path(__file__).resolve().parents[1]
CLUSTER = "gpuaas-bench"
KUBECONFIG = REPO / ".cluster" / f"{CLUSTER}.kubeconfig"
POOLS = SCENARIOS["program"].pools
SIZES = (1, 2, 4, 8)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def gpuaas(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "gpuaas", *args], cwd=REPO, check=True, capture_output=True)


def fresh_cluster() -> None:
    gpuaas("cluster", "down", "--name", CLUSTER)
    gpuaas("cluster", "up", "--scenario", "program", "--name", CLUSTER)


def pools_reconciled() -> bool:
    """Every pool has had a pass that found all its nodes healthy: until then a bulk would be queued for capacity that
    the cluster's nodes (still settling after `cluster up`) do not show yet, and would meet the first passes' taints."""
    with new_api_client(str(KUBECONFIG)) as api:
        pools = client.CustomObjectsApi(api).list_cluster_custom_object("gpuaas.io", "v1alpha1", "gpupools")["items"]
    capacity = {p["metadata"]["name"]: (p.get("status") or {}).get("capacityGPUs") for p in pools}
    return capacity == {pool.name: pool.gpus for pool in POOLS}


def start_operator(wrapper: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """The operator as a process; `wrapper` goes between the interpreter and `-m gpuaas` (a profiler's `-m`)."""
    log = (REPO / ".cluster" / "bench-operator.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, *wrapper, "-m", "gpuaas", "run", "--kubeconfig", str(KUBECONFIG), "--metrics-port", "18180",
         "--health-port", "18181", "--webhook-port", "19543", "--webhook-url", "https://127.0.0.1:19543",
         "--webhook-cert-dir", str(REPO / ".cluster" / "bench-webhook")],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # ready = its pool daemons reconcile, its indexes are loaded
        try:
            with urllib.request.urlopen("http://127.0.0.1:18180/readyz", timeout=2) as response:
                if response.status == 200 and pools_reconciled():
                    return process
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the operator did not become ready")


def manifest(index: int, prefix: str, gpus: int | None = None) -> dict[str, Any]:
    now = datetime.now(UTC)
    pool = POOLS[index % len(POOLS)]
    name = f"{prefix}-{index:05d}"
    return {
        "apiVersion": "gpuaas.io/v1alpha1",
        "kind": "GpuAllocation",
        "metadata": {"name": name},
        "spec": {
            "tenant": {"name": name, "organization": f"Lab {index}"},
            "pool": pool.name,
            "gpus": gpus or SIZES[index % len(SIZES)],
            "window": {"start": (now - timedelta(days=1)).isoformat(), "end": (now + timedelta(days=90)).isoformat()},
            "owners": [{"kind": "User", "name": f"user-{index}"}],
        },
    }


def decided(obj: dict[str, Any]) -> bool:
    status = obj.get("status") or {}
    if status.get("phase") == "Queued":
        return True
    return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or [])


def latency(api: client.ApiClient, samples: int) -> list[tuple[float, float]]:
    """Per sample: apply to Ready, and of that the create call alone (the API server and gpuaas's two admission
    webhooks), so that a slow sample says which side it was slow on."""
    custom = client.CustomObjectsApi(api)
    results = []
    for index in range(samples):
        body = manifest(index, "lat")
        name = body["metadata"]["name"]
        started = time.monotonic()
        custom.create_cluster_custom_object("gpuaas.io", "v1alpha1", "gpuallocations", body)
        created = time.monotonic()
        while not decided(custom.get_cluster_custom_object("gpuaas.io", "v1alpha1", "gpuallocations", name)):
            time.sleep(0.01)
        results.append((time.monotonic() - started, created - started))
    return results


WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE", "APPLY")


def api_writes(api: client.ApiClient) -> dict[str, float]:
    """The API server's write requests so far, by resource and verb (its apiserver_request_total)."""
    method, url, headers, _, _ = api.param_serialize("GET", "/metrics", auth_settings=["BearerToken"])
    response = api.call_api(method, url, headers)
    response.read()
    counts: dict[str, float] = {}
    for line in response.data.decode().splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.rindex("}")].split(","))
        verb = labels.get("verb", "").strip('"')
        if verb in WRITE_VERBS:
            resource = "/".join(
                labels[name].strip('"') for name in ("resource", "subresource") if labels.get(name, '""') != '""'
            )
            key = f"{resource} {verb}"
            counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def writes_between(before: dict[str, float], after: dict[str, float], allocations: int) -> dict[str, float]:
    """Write requests per allocation, by resource and verb, between two counts."""
    per = {key: (after[key] - before.get(key, 0.0)) / allocations for key in after}
    return {key: round(value, 2) for key, value in sorted(per.items()) if value >= 0.01}


def spread(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(values), 3),
        "p95": round(percentile(values, 0.95), 3),
        "p99": round(percentile(values, 0.99), 3),
        "max": round(max(values), 3),
    }


def all_allocations(custom: client.CustomObjectsApi) -> list[dict[str, Any]]:
    """Every allocation, 500 a page: one list of 10,000 (41 MB) broke off under the bulk's load."""
    items: list[dict[str, Any]] = []
    token = None
    while True:
        page = custom.list_cluster_custom_object("gpuaas.io", "v1alpha1", "gpuallocations", limit=500, _continue=token)
        items += page["items"]
        token = page["metadata"].get("continue")
        if not token:
            return items


def bulk(api: client.ApiClient, count: int, gpus: int | None) -> dict[str, Any]:
    custom = client.CustomObjectsApi(api)
    bodies = [manifest(index, "bulk", gpus) for index in range(count)]
    started = time.monotonic()
    with ThreadPoolExecutor(16) as executor:
        list(executor.map(lambda b: custom.create_cluster_custom_object("gpuaas.io", "v1alpha1", "gpuallocations", b),
                          bodies))  # fmt: skip
    applied = time.monotonic() - started
    while True:
        mine = [i for i in all_allocations(custom) if i["metadata"]["name"].startswith("bulk-")]
        done = [i for i in mine if decided(i)]
        if len(done) == count:
            break
        time.sleep(0.5)
    total = time.monotonic() - started
    phases: dict[str, int] = {}
    for item in mine:
        phase = item["status"]["phase"]
        phases[phase] = phases.get(phase, 0) + 1
    return {
        "count": count,
        "apply_seconds": round(applied, 1),
        "all_decided_seconds": round(total, 1),
        "phases": phases,
    }


def process_tree(pid: int) -> list[int]:
    """The operator and the processes it started (its metrics server): what its pod's memory and CPU count."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(child) for child in (task / "children").read_text().split()]
    return [pid, *(descendant for child in children for descendant in process_tree(child))]


def status_kib(pid: int, field: str) -> int:
    """A field of /proc/PID/status in KiB, summed over the process tree."""
    return sum(
        int(line.split()[1])
        for member in process_tree(pid)
        for line in Path(f"/proc/{member}/status").read_text().splitlines()
        if line.startswith(f"{field}:")
    )


def cpu_seconds(pid: int) -> float:
    """User and system CPU of the operator and its metrics server."""
    total = 0
    for member in process_tree(pid):
        fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def sampled(pid: int, out: str | None, rate: int, gil_only: bool = False) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the operator without pausing it, into `out` as collapsed stacks; None without `out`. With
    `gil_only`, only the thread holding the interpreter lock is sampled: what the other threads waited for."""
    if out is None:
        return None
    command = ["py-spy", "record", "--pid", str(pid), "--output", out, "--format", "raw", "--nonblocking"]
    command += ["--rate", str(rate), *(["--gil"] if gil_only else [])]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_sampling(profiler: subprocess.Popen[bytes] | None) -> None:
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)  # py-spy writes what it sampled when interrupted
        profiler.wait(timeout=60)


PASS_BOUNDS = ("1.0", "2.0", "5.0", "10.0", "30.0")
SHOWN_BOUNDS = ("1.0", "5.0", "10.0", "30.0")


def operator_metrics() -> list[str]:
    with urllib.request.urlopen("http://127.0.0.1:18180/metrics", timeout=30) as response:
        return response.read().decode().splitlines()


def metric_value(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def gc_pauses(text: str) -> dict[str, float]:
    """The collector's full collections since the operator started, and its longest pause of any generation."""
    return {
        "full_collections": metric_value(text, 'gpuaas_gc_pauses_total{generation="2"}'),
        "full_collection_seconds": round(metric_value(text, 'gpuaas_gc_pause_seconds_total{generation="2"}'), 3),
        "longest_pause_seconds": round(
            max(metric_value(text, f'gpuaas_gc_pause_max_seconds{{generation="{g}"}}') for g in range(3)), 3
        ),
    }


def histogram(lines: list[str], name: str, bounds: tuple[str, ...], labels: str = "") -> dict[str, float]:
    """A histogram of the operator's, summed over the series whose labels contain `labels`: count, sum, and the
    observations within each bound."""

    mine = [line for line in lines if line.startswith(name) and labels in line]  # the rest, read once

    def total(suffix: str, bound: str | None = None) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in mine
            if line.startswith(name + suffix) and (bound is None or f'le="{bound}"' in line)
        )

    found = {"count": total("_count"), "sum": total("_sum")}
    found.update({bound: total("_bucket", bound) for bound in bounds})
    return found


def pass_histogram() -> dict[str, float]:
    """The operator's pass-duration histogram, summed over its pools."""
    return histogram(operator_metrics(), "gpuaas_reconcile_duration_seconds", PASS_BOUNDS)


def histograms_by(
    name: str, label: str, values: tuple[str, ...], bounds: tuple[str, ...]
) -> dict[str, dict[str, float]]:
    """One reading of the operator's histogram `name` per value of `label`, each summed over its other labels."""
    lines = operator_metrics()
    return {value: histogram(lines, name, bounds, f'{label}="{value}"') for value in values}


def part_histograms() -> dict[str, dict[str, float]]:
    """Per part of a pass (turn, snapshot, deciding, waiting for writes, ending, hand-offs), summed over the pools."""
    return histograms_by("gpuaas_reconcile_part_seconds", "part", PASS_PARTS, PASS_BOUNDS)


def parts_between(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per part: its seconds over all passes, and how many passes it took longer than each bound."""
    parts: dict[str, Any] = {}
    for part in PASS_PARTS:
        seconds = after[part]["sum"] - before[part].get("sum", 0.0)
        over = over_each_bound(before[part], after[part], PASS_BOUNDS)
        parts[part] = {"seconds_total": round(seconds, 1), **{f"over_{b}s": n for b, n in over.items()}}
    return parts


SHOWN_KINDS = ("Namespace", "ResourceQuota", "LimitRange", "RoleBinding")


def shown_histograms() -> dict[str, dict[str, float]]:
    """Per kind, how long after gpuaas's apply its index showed the object (resolution: the pass interval)."""
    return histograms_by("gpuaas_apply_shown_seconds", "kind", SHOWN_KINDS, SHOWN_BOUNDS)


def shown_between(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, Any]:
    shown: dict[str, Any] = {}
    for kind in SHOWN_KINDS:
        count = after[kind]["count"] - before[kind]["count"]
        over = over_each_bound(before[kind], after[kind], SHOWN_BOUNDS)
        shown[kind] = {
            "shown": int(count),
            "mean_seconds": round((after[kind]["sum"] - before[kind]["sum"]) / count, 2) if count else 0.0,
            **{f"after_over_{b}s": n for b, n in over.items()},
        }
    return shown


def over_each_bound(before: dict[str, float], after: dict[str, float], bounds: tuple[str, ...]) -> dict[str, int]:
    """Between two readings of a histogram: bound -> the observations over it."""
    count = after["count"] - before.get("count", 0.0)
    return {b: int(count - (after[b] - before.get(b, 0.0))) for b in bounds}


def passes_between(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The passes that ended between two readings of the histogram: how many, how many over each bound, their time."""
    passes = after["count"] - before.get("count", 0.0)
    longer = {f"over_{b}s": n for b, n in over_each_bound(before, after, PASS_BOUNDS).items()}
    return {
        "passes": int(passes),
        "passes_over_2s": longer["over_2.0s"],
        "passes_longer_than": longer,
        "pass_seconds_total": round(after["sum"] - before.get("sum", 0.0), 1),
    }


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency-samples", type=int, default=50)
    parser.add_argument("--bulk", type=int, default=3000)
    parser.add_argument("--bulk-gpus", type=int, help="GPUs of every bulk allocation (default: 1, 2, 4, 8 in turn).")
    parser.add_argument("--no-baseline", action="store_true", help="Skip the plain SSA baseline.")
    parser.add_argument("--out", default="allocations.json", help="File name under bench/results/.")
    parser.add_argument("--profile", help="py-spy's collapsed stacks of the operator during the latency samples.")
    parser.add_argument("--profile-bulk", help="py-spy's collapsed stacks of the operator during the bulk.")
    parser.add_argument("--profile-rate", type=int, default=50, help="py-spy's samples a second.")
    parser.add_argument("--profile-gil", action="store_true", help="Sample only the thread holding the GIL.")
    options = parser.parse_args()
    result: dict[str, Any] = {"scenario": "program", "nodes": 1307}

    if options.bulk and not options.no_baseline:
        fresh_cluster()
        with new_api_client(str(KUBECONFIG), pool_size=32) as api:
            started = time.monotonic()
            writes_before = api_writes(api)
            write_all(api, baseline_objects(options.bulk), workers=16)
            result["baseline_ssa_seconds"] = round(time.monotonic() - started, 1)
            result["baseline_writes_per_allocation"] = writes_between(writes_before, api_writes(api), options.bulk)
            result["baseline_objects"] = options.bulk * 4

    fresh_cluster()
    operator = start_operator()
    try:
        with new_api_client(str(KUBECONFIG), pool_size=32) as api:
            profiler = sampled(operator.pid, options.profile, options.profile_rate)
            samples = latency(api, options.latency_samples)
            stop_sampling(profiler)
            if samples:
                totals = [total for total, _ in samples]
                result["apply_to_ready_seconds"] = {"samples": len(samples), **spread(totals)}
                result["create_call_seconds"] = spread([create for _, create in samples])
                result["create_to_ready_seconds"] = spread([total - create for total, create in samples])
                slowest = sorted(samples, reverse=True)[: max(1, len(samples) // 50)]
                result["slowest_samples"] = [{"total": round(t, 3), "create_call": round(c, 3)} for t, c in slowest]
            if options.bulk:
                profiler = sampled(operator.pid, options.profile_bulk, options.profile_rate, options.profile_gil)
                passes_before, shown_before, parts_before = pass_histogram(), shown_histograms(), part_histograms()
                # The operator's start (a new pool's first pass taints its nodes) and the latency samples.
                result["passes_before_bulk"] = passes_between({}, passes_before)
                cpu_before, writes_before = cpu_seconds(operator.pid), api_writes(api)
                result["bulk"] = bulk(api, options.bulk, options.bulk_gpus)
                result["bulk"]["writes_per_allocation"] = writes_between(writes_before, api_writes(api), options.bulk)
                result["bulk"]["operator_cpu_seconds"] = round(cpu_seconds(operator.pid) - cpu_before, 1)
                stop_sampling(profiler)
                result["bulk"].update(passes_between(passes_before, pass_histogram()))
                result["bulk"]["pass_parts"] = parts_between(parts_before, part_histograms())
                result["bulk"]["operator_peak_rss_mib"] = status_kib(operator.pid, "VmHWM") // 1024
                result["bulk"]["index_shown_after_apply"] = shown_between(shown_before, shown_histograms())
                # Every thread waits for a collection: a full one over the grown heap stretches the passes it meets.
                result["bulk"]["gc_pauses_since_start"] = gc_pauses("\n".join(operator_metrics()))
    finally:
        operator.terminate()
        operator.wait()
    if options.bulk and not options.no_baseline:
        result["bulk_vs_baseline"] = round(result["bulk"]["all_decided_seconds"] / result["baseline_ssa_seconds"], 2)
    gpuaas("cluster", "down", "--name", CLUSTER)
    out = REPO / "bench" / "results" / options.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
