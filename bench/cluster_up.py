"""Measure warm `gpuaas cluster up --scenario program` and the control plane's peak memory.

Usage: python bench/cluster_up.py [--runs N]. Writes bench/results/cluster_up.json.
The binaries must be built already (a warm start is what is measured).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLUSTER = "gpuaas-bench"
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok-controller")


def control_plane_rss_mib() -> dict[str, float]:
    """Resident memory of this cluster's processes, by binary name, from /proc."""
    usage: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            status = (proc / "status").read_text()
        except OSError:
            continue
        binary = Path(cmdline[0].decode(errors="replace")).name
        if binary not in CONTROL_PLANE or f"/clusters/{CLUSTER}/".encode() not in b" ".join(cmdline):
            continue
        rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        usage[binary] = usage.get(binary, 0.0) + rss_kib / 1024
    return usage


class PeakSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_total = 0.0
        self.peak_by_binary: dict[str, float] = {}
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            sample = control_plane_rss_mib()
            self.peak_total = max(self.peak_total, sum(sample.values()))
            for name, mib in sample.items():
                self.peak_by_binary[name] = max(self.peak_by_binary.get(name, 0.0), mib)
            time.sleep(0.25)


def gpuaas(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpuaas", *args], cwd=REPO, check=True, text=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settle-seconds", type=float, default=60, help="operator running, heartbeats flowing")
    options = parser.parse_args()
    subprocess.run(["bash", "tools/build.sh"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    kubeconfig = REPO / ".cluster" / f"{CLUSTER}.kubeconfig"
    durations = []
    sampler = PeakSampler()
    sampler.start()
    for _ in range(options.runs):
        gpuaas("cluster", "down", "--name", CLUSTER)
        started = time.monotonic()
        gpuaas("cluster", "up", "--scenario", "program", "--name", CLUSTER)
        durations.append(round(time.monotonic() - started, 2))
    operator = subprocess.Popen(
        [sys.executable, "-m", "gpuaas", "run", "--kubeconfig", str(kubeconfig), "--metrics-port", "0",
         "--health-port", "0"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(options.settle_seconds)
    operator_rss = int(
        next(
            line.split()[1]
            for line in Path(f"/proc/{operator.pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
    )
    operator.terminate()
    operator.wait()
    sampler.stop_flag.set()
    sampler.join()
    gpuaas("cluster", "down", "--name", CLUSTER)
    result = {
        "scenario": "program",
        "nodes": 1307,
        "warm_cluster_up_seconds": durations,
        "control_plane_peak_rss_mib": round(sampler.peak_total, 1),
        "control_plane_peak_rss_mib_by_binary": {k: round(v, 1) for k, v in sorted(sampler.peak_by_binary.items())},
        "operator_rss_mib_after_settle": round(operator_rss / 1024, 1),
        "machine": {"cpus": os.cpu_count()},
    }
    out = REPO / "bench" / "results" / "cluster_up.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
