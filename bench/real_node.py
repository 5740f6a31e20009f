"""The provider's path on the program scenario: helm install on the real node, leader fail-over, the node's memory.

Usage: python bench/real_node.py [--kills N] [--scenario program|small]. Needs root (the real node) and the
binaries built. Writes bench/results/real_node-<scenario>-lease<N>.json. It measures:
- `helm install --wait` of the chart (2 replicas, image built here) until both operator pods are Ready and one
  holds the leader Lease and ran a pass;
- after the leader pod is deleted, N times with `--grace-period=0 --force` (it dies without handing over) and N
  times with a plain delete (preStop sleep, then a clean stop that releases the Lease): until the fence webhook
  answers (a server-side dry run of a tenant pod) and until the new leader's first pass began (the Lease's
  gpuaas.io/last-pass annotation as first seen, on this host's clock; a pass later at most, as the annotation is
  written at the next renewal);
- the peak RSS (VmHWM) of containerd, the kubelet, kube-proxy and the device plugin beside the control plane, and
  the shims' and operator pods' RSS at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from e2e.conftest import CHART, RELEASE, RELEASE_NAMESPACE  # noqa: E402
from e2e.incluster.conftest import RealCluster, parse_time  # noqa: E402

from gpuaas.domain.scenarios import REAL_NODE_POOL, SCENARIOS, ScenarioPool  # noqa: E402
from gpuaas.k8s import localcluster, realnode  # noqa: E402
from gpuaas.k8s.leadership import LAST_PASS_ANNOTATION  # noqa: E402

CLUSTER = "gpuaas-bench-real"
VALUES = CHART / "ci" / "real-node-values.yaml"


def kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def shims_rss_kib() -> int:
    total = 0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text().strip().startswith("containerd-shim"):
                    total += kib(int(proc.name), "VmRSS")
            except OSError:
                continue
    return total


def pool_values(pools: tuple[ScenarioPool, ...]) -> dict[str, Any]:
    return {
        "pools": [
            {"name": p.name, "gpuModel": p.gpu_model, "provider": p.provider, "nodeSelector": p.node_selector,
             "gpusPerNode": p.gpus_per_node, "taint": True}
            for p in pools
        ]
    }  # fmt: skip


def wait(predicate: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.05)
    raise TimeoutError(what)


def leader_drill(cluster: RealCluster, delete_args: tuple[str, ...]) -> dict[str, float]:
    """Delete the leader pod; seconds until the fence answers and until the next leader's first pass began."""
    leader = cluster.leader()
    assert leader is not None
    old = leader["metadata"]["name"]
    deleted_at = time.time()
    started = time.monotonic()
    cluster.kubectl("delete", "pod", "-n", RELEASE_NAMESPACE, old, "--wait=false", *delete_args)

    def answers() -> bool:
        probe = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe", "namespace": "bench-tenant"},
                 "spec": {"containers": [{"name": "c", "image": "x"}]}}  # fmt: skip
        out = cluster.kubectl("create", "--dry-run=server", "-o", "name", "-f", "-",
                              stdin=json.dumps(probe), check=False)  # fmt: skip
        return out.returncode == 0 or "denied the request" in out.stderr

    wait(answers, 120, "the webhook answering")
    webhook = time.monotonic() - started
    wait(lambda: (new := cluster.leader()) is not None and new["metadata"]["name"] != old, 120, "a new leader")
    lease = cluster.lease()
    assert lease is not None
    first_pass = parse_time(lease["metadata"]["annotations"][LAST_PASS_ANNOTATION]).timestamp()
    wait(lambda: len(cluster.operator_pods()) == 2 and cluster.ready_operator_pods() == 2, 180, "2 Ready pods again")
    time.sleep(3)
    return {"webhook_seconds": round(webhook, 2), "pass_seconds": round(first_pass - deleted_at, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--scenario", default="program", choices=sorted(SCENARIOS))
    parser.add_argument("--lease-seconds", type=int, default=3, help="operator.leaderElection.leaseSeconds")
    args = parser.parse_args()
    scenario = SCENARIOS[args.scenario]
    binaries = localcluster.ensure_binaries()
    kubeconfig = localcluster.default_kubeconfig(CLUSTER)
    localcluster.stop_local_real_node(CLUSTER, kubeconfig)
    localcluster.delete_cluster(binaries, CLUSTER, kubeconfig)
    localcluster.create_cluster(binaries, CLUSTER, kubeconfig)
    result: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "scenario": scenario.name,
        "nodes": scenario.node_count + 1,
        "lease_seconds": args.lease_seconds,
    }
    try:
        localcluster.wait_for_apiserver(kubeconfig)
        localcluster.create_nodes(kubeconfig, scenario, lambda _: None)
        started = time.monotonic()
        node = localcluster.start_local_real_node(binaries, CLUSTER, kubeconfig, on_progress=lambda _: None)
        result["real_node_start_seconds"] = round(time.monotonic() - started, 1)
        cluster = RealCluster(CLUSTER, kubeconfig, binaries, external=False, work=Path(node.state.work))
        values = Path(node.state.work) / "bench-pools.yaml"
        values.write_text(yaml.safe_dump(pool_values((*scenario.pools, REAL_NODE_POOL))))
        tag = node.operator_image.rpartition(":")[2]
        started = time.monotonic()
        cluster.helm("install", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE, "--create-namespace", "-f", str(VALUES),
                     "-f", str(values), "--set", f"image.tag={tag}",
                     "--set", f"operator.leaderElection.leaseSeconds={args.lease_seconds}",
                     "--wait", "--timeout=5m")  # fmt: skip
        result["helm_install_to_both_ready_seconds"] = round(time.monotonic() - started, 2)
        wait(lambda: cluster.leader() is not None, 120, "a leader that ran a pass")
        result["helm_install_to_first_pass_seconds"] = round(time.monotonic() - started, 2)
        cluster.kubectl("create", "namespace", "bench-tenant")
        cluster.kubectl("label", "namespace", "bench-tenant", "gpuaas.io/managed=true")
        for drill, delete_args in (("leader_kill", ("--grace-period=0", "--force")), ("leader_delete", ())):
            runs = [leader_drill(cluster, delete_args) for _ in range(args.kills)]
            result[drill] = runs
            for measure in ("webhook_seconds", "pass_seconds"):
                result[f"{drill}_{measure}_median"] = round(statistics.median(r[measure] for r in runs), 2)
                result[f"{drill}_{measure}_max"] = max(r[measure] for r in runs)
        state = realnode.load_state(Path(node.state.work))
        assert state is not None
        result["peak_rss_mib"] = {name: round(kib(pid, "VmHWM") / 1024, 1) for name, pid in state.pids.items()}
        result["peak_rss_mib_total"] = round(sum(result["peak_rss_mib"].values()), 1)
        result["shims_rss_mib"] = round(shims_rss_kib() / 1024, 1)
        on_node = cluster.get_json("pods", "-A", "--field-selector", f"spec.nodeName={node.state.node}")
        result["pods_on_the_real_node"] = len(on_node["items"])
    finally:
        localcluster.stop_local_real_node(CLUSTER, kubeconfig)
        localcluster.delete_cluster(binaries, CLUSTER, kubeconfig)
    out = REPO / "bench" / "results" / f"real_node-{scenario.name}-lease{args.lease_seconds}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
