"""The provider's path on the program scenario: helm install on the real node, leader fail-over, the node's memory.

Usage: python bench/real_node.py [--kills N] [--scenario program|small]. Needs root (the real node) and the
binaries built. Writes bench/results/real_node-<scenario>-lifetime<N>.json. It measures:
- `helm install --wait` of the chart (2 replicas, image built here) until both operator pods are Ready and one
  serves the webhooks;
- after the serving pod is deleted with --grace-period=0: until the fence webhook answers again (a server-side
  dry run of a tenant pod comes back fenced) and until a new pod serves (it ran a pass);
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
from e2e.incluster.conftest import RealCluster  # noqa: E402

from gpuaas.domain.scenarios import REAL_NODE_POOL, SCENARIOS, ScenarioPool  # noqa: E402
from gpuaas.k8s import localcluster, realnode  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--scenario", default="program", choices=sorted(SCENARIOS))
    parser.add_argument("--peering-lifetime", type=int, default=3, help="operator.peering.lifetimeSeconds")
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
        "peering_lifetime_seconds": args.peering_lifetime,
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
                     "-f", str(values), "--set", f"image.tag={tag}", "--set",
                     f"operator.peering.lifetimeSeconds={args.peering_lifetime}", "--wait", "--timeout=5m")  # fmt: skip
        wait(lambda: cluster.leader() is not None, 120, "a serving pod")
        result["helm_install_to_both_ready_seconds"] = round(time.monotonic() - started, 2)
        cluster.kubectl("create", "namespace", "bench-tenant")
        cluster.kubectl("label", "namespace", "bench-tenant", "gpuaas.io/managed=true")
        kills = []
        for _ in range(args.kills):
            leader = cluster.leader()
            assert leader is not None
            old = leader["metadata"]["name"]
            started = time.monotonic()
            cluster.kubectl("delete", "pod", "-n", RELEASE_NAMESPACE, old, "--grace-period=0", "--force")

            def answers() -> bool:
                probe = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe", "namespace": "bench-tenant"},
                         "spec": {"containers": [{"name": "c", "image": "x"}]}}  # fmt: skip
                out = cluster.kubectl("create", "--dry-run=server", "-o", "name", "-f", "-",
                                      stdin=json.dumps(probe), check=False)  # fmt: skip
                return out.returncode == 0 or "denied the request" in out.stderr

            webhook = wait(answers, 120, "the webhook answering")
            passed = wait(
                lambda old=old: (new := cluster.leader()) is not None and new["metadata"]["name"] != old,
                120,
                "a new serving pod",
            )
            kills.append({"webhook_seconds": round(webhook, 2), "pass_seconds": round(webhook + passed, 2)})
            wait(lambda: len(cluster.operator_pods()) == 2, 120, "the Deployment back at 2 pods")
            time.sleep(5)
        result["leader_kill"] = kills
        result["leader_kill_webhook_seconds_median"] = statistics.median(k["webhook_seconds"] for k in kills)
        result["leader_kill_webhook_seconds_max"] = max(k["webhook_seconds"] for k in kills)
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
    out = REPO / "bench" / "results" / f"real_node-{scenario.name}-lifetime{args.peering_lifetime}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
