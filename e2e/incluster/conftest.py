"""gpuaas as providers run it: the chart's Deployment on a real node of the local cluster.

One cluster for this package (`gpuaas-real`): the control plane, the `small` scenario's KWOK nodes, and one real
node (containerd + runc + kubelet + kube-proxy on this host, `gpuaas cluster up --real-nodes 1`) with 8 fake GPUs
from gpuaas's device plugin. The operator image is built here and imported into the node's containerd; `helm
install` runs it with two replicas under the chart's ServiceAccount, behind the chart's webhook Service.
The package's last test stops the node and checks that the host is as it was.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.conftest import CHART, RELEASE, RELEASE_NAMESPACE, E2ECluster
from tests.waiting import wait_for

from gpuaas.domain.scenarios import SCENARIOS
from gpuaas.k8s import localcluster, realnode
from gpuaas.k8s.leadership import LAST_PASS_ANNOTATION

CLUSTER_NAME = os.environ.get("GPUAAS_REAL_CLUSTER", "gpuaas-real")
REAL_VALUES = CHART / "ci" / "real-node-values.yaml"
OPERATOR_SELECTOR = "app.kubernetes.io/name=gpuaas,app.kubernetes.io/component=operator"
REPORTS_CLAIM = "gpuaas-reports"
LEASE = "gpuaas"  # operator.leaderElection.leaseName


@dataclass
class RealCluster(E2ECluster):
    node: str = ""
    operator_image: str = ""
    host_before: dict[str, Any] | None = None
    reports_dir: Path | None = None

    @property
    def node_work(self) -> Path:
        return localcluster.node_work_dir(self.name)

    def operator_pods(self) -> list[dict[str, Any]]:
        pods: list[dict[str, Any]] = self.get_json("pods", "-n", RELEASE_NAMESPACE, "-l", OPERATOR_SELECTOR)["items"]
        return [pod for pod in pods if not pod["metadata"].get("deletionTimestamp")]

    def ready_operator_pods(self) -> int:
        return len([pod for pod in self.operator_pods() if is_ready(pod)])

    def lease(self) -> dict[str, Any] | None:
        found = self.kubectl("get", "lease", "-n", RELEASE_NAMESPACE, LEASE, "-o", "json", check=False)
        lease: dict[str, Any] | None = json.loads(found.stdout) if found.returncode == 0 else None
        return lease

    def leader(self) -> dict[str, Any] | None:
        """The pod that holds the Lease and has run a pass since it took it (None while no pod does)."""
        lease = self.lease()
        if lease is None:
            return None
        spec = lease.get("spec") or {}
        last_pass = (lease["metadata"].get("annotations") or {}).get(LAST_PASS_ANNOTATION)
        acquired = spec.get("acquireTime")
        if not (spec.get("holderIdentity") and last_pass and acquired) or parse_time(last_pass) < parse_time(acquired):
            return None
        return next((p for p in self.operator_pods() if p["metadata"]["name"] == spec["holderIdentity"]), None)

    def logs(self, pod: str, since: str | None = None) -> str:
        args = ["logs", "-n", RELEASE_NAMESPACE, pod]
        if since:
            args.append(f"--since={since}")
        return self.kubectl(*args, check=False).stdout


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _reports_volume(cluster: RealCluster, path: Path) -> None:
    """A hostPath PersistentVolume on the real node for the report CronJob's claim (no provisioner here)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, 65532, 65532)
    volume = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"{CLUSTER_NAME}-reports"},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": {"path": str(path), "type": "Directory"},
            "claimRef": {"namespace": RELEASE_NAMESPACE, "name": REPORTS_CLAIM},
        },
    }
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": REPORTS_CLAIM, "namespace": RELEASE_NAMESPACE},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "",
            "volumeName": f"{CLUSTER_NAME}-reports",
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    cluster.kubectl("create", "namespace", RELEASE_NAMESPACE)
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all([volume, claim]))


@pytest.fixture(scope="package")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    binaries = localcluster.ensure_binaries()
    work = tmp_path_factory.mktemp("real")
    kubeconfig = localcluster.default_kubeconfig(CLUSTER_NAME)
    localcluster.stop_local_real_node(CLUSTER_NAME, kubeconfig)
    localcluster.delete_cluster(binaries, CLUSTER_NAME, kubeconfig)
    host_before = realnode.host_state_fingerprint()
    localcluster.create_cluster(binaries, CLUSTER_NAME, kubeconfig)
    state = RealCluster(CLUSTER_NAME, kubeconfig, binaries, external=False, work=work, host_before=host_before)
    try:
        localcluster.wait_for_apiserver(kubeconfig)
        localcluster.create_nodes(kubeconfig, SCENARIOS["small"], lambda _: None)
        node = localcluster.start_local_real_node(binaries, CLUSTER_NAME, kubeconfig, on_progress=print)
        state.node = node.state.node
        state.operator_image = node.operator_image
        state.reports_dir = work / "reports"
        _reports_volume(state, state.reports_dir)
        yield state
    finally:
        if not os.environ.get("GPUAAS_KEEP_CLUSTER"):
            localcluster.stop_local_real_node(CLUSTER_NAME, kubeconfig)
            localcluster.delete_cluster(binaries, CLUSTER_NAME, kubeconfig)


@dataclass
class InstalledChart:
    cluster: RealCluster
    install_seconds: float
    image_tag: str

    def values_args(self, *extra: str) -> list[str]:
        return ["-f", str(REAL_VALUES), "--set", f"image.tag={self.image_tag}", *extra]

    def upgrade(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.cluster.helm(
            "upgrade", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE, *self.values_args(*extra), "--wait", "--timeout=3m"
        )


@pytest.fixture(scope="package")
def chart(real_cluster: RealCluster) -> Iterator[InstalledChart]:
    """`helm install` of the chart with the image built here; returns once both pods are Ready and one leads."""
    tag = real_cluster.operator_image.rpartition(":")[2]
    started = time.monotonic()
    installed = InstalledChart(real_cluster, 0.0, tag)
    real_cluster.helm(
        "install", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE, *installed.values_args(), "--wait", "--timeout=3m"
    )

    def settled() -> bool:
        pods = real_cluster.operator_pods()
        return len([p for p in pods if is_ready(p)]) == 2 and real_cluster.leader() is not None

    wait_for(settled, timeout=180, interval=0.2, message="two operator pods Ready, one leading",
             last=lambda: [(p["metadata"]["name"], p.get("status", {}).get("phase"), is_ready(p))
                           for p in real_cluster.operator_pods()])  # fmt: skip
    installed.install_seconds = time.monotonic() - started
    print(f"helm install -> both operator pods Ready, one leading: {installed.install_seconds:.1f}s")
    yield installed
    real_cluster.helm("uninstall", RELEASE, "-n", RELEASE_NAMESPACE, check=False)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def iso(moment: dt.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def dump(value: Any) -> str:
    return json.dumps(value, indent=1, default=str)
