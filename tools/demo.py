"""`make demo`, after the cluster and the operator are up: the program office grants GPUs, tenants run
GPU pods for a while, and the monthly report is written from the ledger.

Usage: python tools/demo.py --kubeconfig .cluster/gpuaas.kubeconfig [--run-seconds 30]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from kubernetes import client

from gpuaas.domain.scenarios import demo_allocation_manifest, demo_grants
from gpuaas.k8s.client import new_api_client
from gpuaas.k8s.localcluster import ensure_binaries

REPO = Path(__file__).resolve().parents[1]


def kubectl(kubeconfig: str, *args: str, stdin: str | None = None) -> str:
    binary = ensure_binaries(("kubernetes", "etcd", "kwok", "helm")).kubectl
    result = subprocess.run(
        [str(binary), "--kubeconfig", kubeconfig, *args], input=stdin, text=True, capture_output=True, check=True
    )
    return result.stdout


def training_pod(name: str, namespace: str, owner: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": "train", "owner": owner}},
        "spec": {
            "containers": [
                {
                    "name": "train",
                    "image": "pytorch:25.01-py3",
                    "resources": {"limits": {"nvidia.com/gpu": "8"}, "requests": {"cpu": "96", "memory": "900Gi"}},
                }
            ]
        },
    }


def wait_booked(api: client.ApiClient, active: set[str], timeout: float = 90) -> None:
    """Wait until the ledger holds every Active grant (written at the operator's next flush), so the report shows
    each one's granted GPUs and not the zero of a record made before its grant was booked."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = client.CustomObjectsApi(api).list_cluster_custom_object("gpuaas.io", "v1alpha1", "gpuusages")["items"]
        booked = {i["spec"]["allocation"] for i in items if ((i.get("ledger") or {}).get("grantedGPUs") or 0) > 0}
        if active <= booked:
            return
        time.sleep(1)


def wait_decided(api: client.ApiClient, names: set[str], timeout: float = 120) -> dict[str, str]:
    """Wait until every allocation is Active or Queued; returns the phases."""
    custom = client.CustomObjectsApi(api)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = custom.list_cluster_custom_object("gpuaas.io", "v1alpha1", "gpuallocations")["items"]
        phases = {i["metadata"]["name"]: (i.get("status") or {}).get("phase") for i in items}
        if all(phases.get(n) in ("Active", "Queued") for n in names):
            return {n: str(phases[n]) for n in names}
        time.sleep(1)
    raise TimeoutError("allocations were not decided in time")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--run-seconds", type=float, default=30)
    options = parser.parse_args()
    kubeconfig = options.kubeconfig
    now = datetime.now(UTC)
    grants = demo_grants()
    start = (now - timedelta(days=1)).replace(microsecond=0)
    manifests = [demo_allocation_manifest(g, start, start + timedelta(days=91)) for g in grants]
    print(f"== the program office applies {len(manifests)} GpuAllocations with kubectl", flush=True)
    kubectl(kubeconfig, "apply", "-f", "-", stdin="\n---\n".join(json.dumps(m) for m in manifests))
    with new_api_client(kubeconfig) as api:
        phases = wait_decided(api, {g.name for g in grants})
        print(kubectl(kubeconfig, "get", "gpuallocations,gpupools"), flush=True)

        print(f"== tenants run 8-GPU training pods for {options.run_seconds:.0f}s", flush=True)
        pods = [
            (training_pod(f"train-{i}", g.name, f"{g.name}-admin"), f"{g.name}-admin")
            for g in grants
            if phases[g.name] == "Active"
            for i in range(g.running_pods)
        ]
        for pod, owner in pods:
            kubectl(kubeconfig, "--as", owner, "apply", "-f", "-", stdin=json.dumps(pod))
        time.sleep(options.run_seconds)
        core = client.CoreV1Api(api)
        for pod, _ in pods:
            core.delete_namespaced_pod(pod["metadata"]["name"], pod["metadata"]["namespace"])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            left = [p for p, _ in pods if core.list_namespaced_pod(p["metadata"]["namespace"]).items]
            if not left:
                break
            time.sleep(1)
        print(f"   {len(pods)} pods ran, ended and were booked", flush=True)
        print(kubectl(kubeconfig, "get", "gpuallocations"), flush=True)
        wait_booked(api, {name for name, phase in phases.items() if phase == "Active"})

    month = datetime.now(ZoneInfo("Asia/Seoul")).strftime("%Y-%m")
    out = REPO / "out"
    out.mkdir(exist_ok=True)
    for fmt in ("csv", "html", "xlsx", "json"):
        subprocess.run(
            [sys.executable, "-m", "gpuaas", "report", "--month", month, "--format", fmt, "--kubeconfig", kubeconfig,
             "--out", str(out / f"gpuaas-report-{month}.{fmt}")],
            check=True,
        )  # fmt: skip
    print(f"== monthly report {month} written to out/gpuaas-report-{month}.{{csv,html,xlsx,json}}; first rows:")
    lines = (out / f"gpuaas-report-{month}.csv").read_text(encoding="utf-8-sig").splitlines()
    print("\n".join(lines[:12]))


if __name__ == "__main__":
    main()
