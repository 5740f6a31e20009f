"""The provider's path, on a real node: helm install, grants, real GPU containers, drills, expiry, report, clean-up.

The tests run in file order and build on each other (one cluster, one release). Every GPU pod of the tenant is
tracked from the kubelet's own container statuses; after each drill the ledger must equal the GPUs times the
containers' real lives, within 1 s per pod.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import kubernetes.watch
import pytest
import yaml
from e2e.conftest import RELEASE, RELEASE_NAMESPACE, seoul_month
from e2e.incluster.conftest import (
    InstalledChart,
    RealCluster,
    dump,
    is_ready,
    iso,
    parse_time,
    utc_now,
)
from kubernetes import client
from tests.waiting import wait_for

from gpuaas.domain.scenarios import REAL_NODE_POOL
from gpuaas.k8s import localcluster, localimages, realnode
from gpuaas.k8s.client import new_api_client

pytestmark = pytest.mark.e2e

ALLOCATION = "snu-real-2026"
TENANT = "snu-real"
GPUS_PER_POD = 2


def allocation_manifest(window_end: str, grace_seconds: int = 300) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "gpuaas.io/v1alpha1",
            "kind": "GpuAllocation",
            "metadata": {"name": ALLOCATION},
            "spec": {
                "tenant": {"name": TENANT, "organization": "Seoul National University", "contract": "E2E-REAL-1"},
                "pool": REAL_NODE_POOL.name,
                "gpus": 8,
                "window": {"start": iso(utc_now().replace(hour=0, minute=0, second=0)), "end": window_end},
                "owners": [{"kind": "User", "name": "bob"}],
                "resourcesPerGPU": {"cpu": "250m", "memory": "256Mi"},
                "gracePeriodSeconds": grace_seconds,
            },
        }
    )


def gpu_pod(name: str, grace: int = 30, script: str | None = None, gpus: int = GPUS_PER_POD) -> str:
    """A tenant GPU pod from the image built here. By default its shell ignores SIGTERM, as many trainers do,
    so the kubelet stops it only when the grace period ends."""
    command = script or 'trap "" TERM; echo "visible=$NVIDIA_VISIBLE_DEVICES"; while true; do sleep 1; done'
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "trainer"}},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": grace,
                "containers": [
                    {
                        "name": "trainer",
                        "image": localimages.TENANT_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["sh", "-c", command],
                        "resources": {
                            "requests": {"cpu": "10m", "memory": "16Mi", "nvidia.com/gpu": gpus},
                            "limits": {"memory": "64Mi", "nvidia.com/gpu": gpus},
                        },
                    }
                ],
            },
        }
    )


@dataclass
class PodLife:
    name: str
    gpus: int
    started: str | None = None
    finished: str | None = None
    deletion_requested: float | None = None

    @property
    def seconds(self) -> float:
        assert self.started, self
        assert self.finished, self
        return (parse_time(self.finished) - parse_time(self.started)).total_seconds()


@dataclass
class Tenant:
    """The tenant's GPU pods as the kubelet reports them: start and finish of each container."""

    cluster: RealCluster
    lives: dict[str, PodLife] = field(default_factory=dict)  # by uid
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopped: threading.Event = field(default_factory=threading.Event)
    api: client.ApiClient | None = None
    watcher: threading.Thread | None = None

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> Any:
        return self.cluster.kubectl(*args, "-n", TENANT, check=check, stdin=stdin)

    def start_watch(self) -> None:
        """Every change of the tenant's pods, DELETED events included: a pod's last status is never missed."""
        self.api = new_api_client(str(self.cluster.kubeconfig))
        core = client.CoreV1Api(self.api)

        def watch() -> None:
            while not self.stopped.is_set():
                stream = kubernetes.watch.Watch()
                try:
                    for event in stream.stream(core.list_namespaced_pod, TENANT, timeout_seconds=2):
                        self.record(self.api.sanitize_for_serialization(event["object"]))
                except Exception:  # a broken stream (the API server restarts, or goes at the end): watch again
                    time.sleep(0.2)

        self.watcher = threading.Thread(target=watch, daemon=True)
        self.watcher.start()

    def record(self, pod: dict[str, Any]) -> None:
        with self.lock:
            uid = pod["metadata"]["uid"]
            gpus = int(pod["spec"]["containers"][0]["resources"].get("requests", {}).get("nvidia.com/gpu", 0))
            life = self.lives.setdefault(uid, PodLife(pod["metadata"]["name"], gpus))
            for status in (pod.get("status") or {}).get("containerStatuses") or []:
                state = status.get("state") or {}
                running, terminated = state.get("running"), state.get("terminated")
                if running:
                    life.started = running["startedAt"]
                if terminated:
                    life.started = terminated.get("startedAt") or life.started
                    life.finished = terminated["finishedAt"]

    def observe(self) -> list[dict[str, Any]]:
        pods: list[dict[str, Any]] = self.cluster.get_json("pods", "-n", TENANT)["items"]
        for pod in pods:
            self.record(pod)
        return pods

    def create(self, name: str, **kwargs: Any) -> None:
        self.kubectl("apply", "-f", "-", stdin=gpu_pod(name, **kwargs))

    def wait_running(self, name: str, timeout: float = 60) -> dict[str, Any]:
        def running() -> dict[str, Any] | None:
            pod = next((p for p in self.observe() if p["metadata"]["name"] == name), None)
            return pod if pod and (pod.get("status") or {}).get("phase") == "Running" else None

        result: dict[str, Any] = wait_for(running, timeout=timeout, interval=0.3, message=f"pod {name} Running")
        return result

    def delete(self, name: str) -> None:
        with self.lock:
            for life in self.lives.values():
                if life.name == name and life.finished is None:
                    life.deletion_requested = time.time()
        self.kubectl("delete", "pod", name, "--wait=false")

    def wait_all_gone(self, timeout: float = 120) -> None:
        wait_for(lambda: not self.observe(), timeout=timeout, interval=0.3, message=f"every pod of {TENANT} gone")

    def expected_gpu_seconds(self) -> float:
        with self.lock:
            return sum(life.gpus * life.seconds for life in self.lives.values() if life.started and life.gpus)

    def booked(self) -> int:
        record = self.cluster.get_json("gpuusage", f"{ALLOCATION}-{seoul_month()}", "--ignore-not-found") or {}
        return int((record.get("ledger") or {}).get("usedGPUSeconds", 0))

    def assert_ledger_matches(self) -> None:
        """Once every pod has ended: booked GPU-seconds == sum of GPUs x real container life, 1 s per pod."""
        expected = self.expected_gpu_seconds()
        tolerance = sum(life.gpus for life in self.lives.values() if life.started)
        wait_for(
            lambda: abs(self.booked() - expected) <= tolerance,
            timeout=120,
            interval=1,
            message=f"ledger == {expected:.0f} GPU-seconds (+-{tolerance}) from the kubelet's container statuses",
            last=lambda: (self.booked(), dump(self.lives)),
        )


@pytest.fixture(scope="module")
def tenant(real_cluster: RealCluster) -> Iterator[Tenant]:
    state = Tenant(real_cluster)
    state.start_watch()
    yield state
    state.stopped.set()
    if state.watcher is not None:
        state.watcher.join(timeout=10)


def test_helm_install_runs_the_image_on_the_real_node(real_cluster: RealCluster, chart: InstalledChart) -> None:
    pods = real_cluster.operator_pods()
    assert len(pods) == 2
    for pod in pods:
        spec = pod["spec"]
        assert spec["nodeName"] == real_cluster.node, "gpuaas-system runs on the system node"
        assert spec["serviceAccountName"] == "gpuaas"
        container = spec["containers"][0]
        assert container["image"] == real_cluster.operator_image
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["runAsUser"] == 65532
        status = pod["status"]["containerStatuses"][0]
        assert status["imageID"], "a real container, started by containerd"
    # The process really runs as 65532 inside the container.
    leader = real_cluster.leader()
    assert leader is not None
    ids = real_cluster.kubectl("exec", "-n", RELEASE_NAMESPACE, leader["metadata"]["name"], "--",
                               "python3", "-c", "import os; print(os.getuid(), os.getgid())").stdout  # fmt: skip
    assert ids.split() == ["65532", "65532"]
    # Both pods are Ready (their indexes warm) and both serve the webhooks; only the Lease holder runs passes.
    assert all(is_ready(pod) for pod in pods)
    endpoints = real_cluster.get_json("endpointslices", "-n", RELEASE_NAMESPACE,
                                      "-l", "kubernetes.io/service-name=gpuaas-webhook")["items"]  # fmt: skip
    ready = [e for s in endpoints for e in s.get("endpoints") or [] if (e.get("conditions") or {}).get("ready")]
    assert sorted(e["targetRef"]["name"] for e in ready) == sorted(p["metadata"]["name"] for p in pods)
    standby = next(p["metadata"]["name"] for p in pods if p["metadata"]["name"] != leader["metadata"]["name"])
    readyz = real_cluster.kubectl(
        "exec",
        "-n",
        RELEASE_NAMESPACE,
        standby,
        "--",
        "python3",
        "-c",
        "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/readyz').read())",
    )
    assert "standby" in readyz.stdout, readyz.stdout
    print(f"helm install -> both pods Ready, one leading: {chart.install_seconds:.1f}s")


def test_pools_count_the_real_node(real_cluster: RealCluster, chart: InstalledChart) -> None:
    def status() -> dict[str, Any] | None:
        pool = real_cluster.get_json("gpupool", REAL_NODE_POOL.name)
        return pool.get("status") if (pool.get("status") or {}).get("capacityGPUs") == 8 else None

    pool_status = wait_for(status, timeout=60, message="real-b200 with 8 GPUs from the device plugin")
    assert pool_status["readyNodes"] == 1
    node = real_cluster.get_json("node", real_cluster.node)
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    taints = {(t["key"], t.get("value")) for t in node["spec"].get("taints") or []}
    assert ("gpuaas.io/pool", REAL_NODE_POOL.name) in taints, "the operator fences the real node's pool"


def test_grant_and_a_real_gpu_container(real_cluster: RealCluster, chart: InstalledChart, tenant: Tenant) -> None:
    real_cluster.kubectl("apply", "-f", "-", stdin=allocation_manifest(iso(utc_now().replace(year=2027))))
    wait_for(
        lambda: (real_cluster.get_json("gpuallocation", ALLOCATION).get("status") or {}).get("phase") == "Active",
        timeout=60,
        message=f"{ALLOCATION} Active",
    )
    wait_for(tenant.kubectl("get", "resourcequota", check=False).stdout.strip, message="tenant quota")
    tenant.create("train-0")
    pod = tenant.wait_running("train-0")
    # Admitted by the in-cluster webhooks: the fence pinned it to its pool and added the usage finalizer.
    assert pod["spec"]["nodeName"] == real_cluster.node
    assert pod["spec"]["nodeSelector"]["gpuaas.io/pool"] == REAL_NODE_POOL.name
    assert "gpuaas.io/usage-ledger" in pod["metadata"]["finalizers"]
    # An operator pod answered: exactly one of their logs has the admission.
    fenced = f"fenced pod {TENANT}/train-0 to pool {REAL_NODE_POOL.name}"
    names = [p["metadata"]["name"] for p in real_cluster.operator_pods()]
    answered = [name for name in names if fenced in real_cluster.logs(name)]
    assert len(answered) == 1, answered
    # The device plugin's allocation reached the container, as NVIDIA's plugin would hand it to the runtime.
    visible = wait_for(
        lambda: re.findall(r"visible=(\S+)", tenant.kubectl("logs", "train-0").stdout),
        message="the container's NVIDIA_VISIBLE_DEVICES",
    )
    devices = visible[0].split(",")
    assert len(devices) == GPUS_PER_POD, devices
    assert all(d.startswith("GPU-fake-") for d in devices), devices


def test_containers_without_gpus_see_no_device(tenant: Tenant) -> None:
    """The fence's NVIDIA_VISIBLE_DEVICES=void beats what an image or envFrom says (CUDA images say `all`); on a GPU
    node, NVIDIA's runtime would otherwise expose every GPU to a container that requested none."""
    tenant.kubectl("create", "configmap", "cuda-defaults", "--from-literal=NVIDIA_VISIBLE_DEVICES=all")
    manifest = yaml.safe_load(
        gpu_pod("notebook", gpus=0, grace=1, script='echo "visible=$NVIDIA_VISIBLE_DEVICES"; sleep 600')
    )
    manifest["spec"]["containers"][0]["envFrom"] = [{"configMapRef": {"name": "cuda-defaults"}}]
    tenant.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))
    tenant.wait_running("notebook")
    seen = wait_for(lambda: re.findall(r"visible=(\S+)", tenant.kubectl("logs", "notebook").stdout), message="its env")
    assert seen == ["void"]
    # A GPU container may not take unprefixed variables from a ConfigMap: they would override the device plugin's.
    gpu = yaml.safe_load(gpu_pod("greedy"))
    gpu["spec"]["containers"][0]["envFrom"] = [{"configMapRef": {"name": "cuda-defaults"}}]
    refused = tenant.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(gpu), check=False)
    assert refused.returncode != 0
    assert "envFrom without a safe prefix" in refused.stderr, refused.stderr
    tenant.kubectl("delete", "pod", "notebook", "--wait=false")


def test_a_tenant_pod_cannot_read_metrics_and_an_authorised_scraper_can(
    real_cluster: RealCluster, chart: InstalledChart, tenant: Tenant
) -> None:
    """/metrics names every tenant's organisation and usage; reaching the Service is not enough to read it. The same
    pod, over the same path, reads it with the token of a ServiceAccount the chart lets read metrics (Prometheus's)."""
    # The chart binds metrics.authorization.readers (here the release namespace's e2e-scraper) to the reader role.
    real_cluster.kubectl("create", "serviceaccount", "-n", RELEASE_NAMESPACE, "e2e-scraper")
    scraper = real_cluster.kubectl("create", "token", "-n", RELEASE_NAMESPACE, "e2e-scraper").stdout.strip()
    service = real_cluster.get_json("service", "-n", RELEASE_NAMESPACE, "gpuaas-metrics")
    url = f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}/metrics"
    read_own_token = "$(cat /var/run/secrets/kubernetes.io/serviceaccount/token)"  # noqa: S105 - a shell read
    script = (
        f'wget -q -O /dev/null {url} 2>&1 | sed "s/^/anonymous: /"; '
        f'wget -q -O /dev/null --header "Authorization: Bearer {read_own_token}" {url} 2>&1 | sed "s/^/tenant: /"; '
        f'echo "scraper: $(wget -q -O - --header "Authorization: Bearer $SCRAPER" {url} | grep -c "^gpuaas_leader ")"; '
        "sleep 600"
    )
    manifest = yaml.safe_load(gpu_pod("curious", gpus=0, grace=1, script=script))
    manifest["spec"]["containers"][0]["env"] = [{"name": "SCRAPER", "value": scraper}]
    tenant.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))
    tenant.wait_running("curious")
    logs = wait_for(
        lambda: "scraper: " in (out := tenant.kubectl("logs", "curious").stdout) and out, message="three scrapes"
    )
    assert re.search(r"anonymous: .*401 Unauthorized", logs), logs
    assert re.search(r"tenant: .*403 Forbidden", logs), logs
    (series,) = re.findall(r"scraper: (\d+)", logs)
    assert int(series) == 1, logs  # every replica, leader or standby, exports gpuaas_leader
    tenant.kubectl("delete", "pod", "curious", "--wait=false")


def test_real_kubelet_keeps_a_deleted_pod_for_its_grace_period(tenant: Tenant) -> None:
    """The kubelet SIGKILLs a container that ignores SIGTERM when the grace period ends: usage ends then."""
    tenant.delete("train-0")
    tenant.wait_all_gone(timeout=90)
    life = next(life for life in tenant.lives.values() if life.name == "train-0")
    assert life.finished
    assert life.deletion_requested
    held = parse_time(life.finished).timestamp() - life.deletion_requested
    assert 28 <= held <= 33, f"GPUs held {held:.1f}s after the delete request (grace 30s)"
    tenant.assert_ledger_matches()


# The timestamp's milliseconds can read 403, so only the message is searched.
LOG_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
FORBIDDEN = re.compile(r"\b403\b|forbidden", re.IGNORECASE)


def assert_no_forbidden_calls(cluster: RealCluster) -> None:
    """The chart's ClusterRole covers every call the operator made; a missing verb shows as a 403 in its log."""
    for pod in cluster.operator_pods():
        log = cluster.logs(pod["metadata"]["name"])
        denied = [line for line in log.splitlines() if FORBIDDEN.search(LOG_TIMESTAMP.sub("", line))]
        assert not denied, f"{pod['metadata']['name']}:\n" + "\n".join(denied[:10])


def test_no_forbidden_calls_after_grants_and_fencing(real_cluster: RealCluster, chart: InstalledChart) -> None:
    assert_no_forbidden_calls(real_cluster)


def test_leader_killed_webhooks_and_passes_resume(real_cluster: RealCluster, tenant: Tenant) -> None:
    tenant.create("train-1")
    tenant.wait_running("train-1")
    leader = real_cluster.leader()
    assert leader is not None
    old = leader["metadata"]["name"]
    probe = gpu_pod("probe", gpus=0)
    started = time.monotonic()
    real_cluster.kubectl("delete", "pod", "-n", RELEASE_NAMESPACE, old, "--grace-period=0", "--force")

    def webhook_answers() -> bool:
        result = tenant.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", stdin=probe, check=False)
        return result.returncode == 0 and '"gpuaas.io/pool"' in result.stdout

    # The standby serves the webhooks already; only the passes wait for the Lease.
    wait_for(webhook_answers, timeout=60, interval=0.1, message="the fence webhook answering")
    webhook_gap = time.monotonic() - started
    wait_for(lambda: (p := real_cluster.leader()) is not None and p["metadata"]["name"] != old,
             timeout=60, interval=0.1, message="a new leader that ran a pass")  # fmt: skip
    pass_gap = time.monotonic() - started
    print(f"leader killed: webhook answers after {webhook_gap:.1f}s, a pass ran after {pass_gap:.1f}s")
    tenant.wait_running("train-1")


def test_kubelet_and_containerd_restart_under_running_pods(real_cluster: RealCluster, tenant: Tenant) -> None:
    before = tenant.wait_running("train-1")["status"]["containerStatuses"][0]
    for component in ("containerd", "kubelet"):
        down = realnode.restart_component(real_cluster.node_work, component)
        print(f"{component} restarted ({down:.1f}s down)")
    wait_for(lambda: (n := real_cluster.get_json("node", real_cluster.node)) and any(
        c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"]),
        timeout=60, message="the node Ready again")  # fmt: skip
    after = tenant.wait_running("train-1")["status"]["containerStatuses"][0]
    assert (after["containerID"], after["restartCount"]) == (before["containerID"], before["restartCount"])
    # The restarted kubelet forgot the device plugin; the plugin registers again, so new GPU pods still run.
    tenant.create("after-restart", grace=2)
    tenant.wait_running("after-restart", timeout=90)
    for name in ("train-1", "after-restart"):
        tenant.delete(name)
    tenant.wait_all_gone(timeout=90)
    tenant.assert_ledger_matches()


def test_helm_upgrade_while_gpu_pods_start_and_end(real_cluster: RealCluster, chart: InstalledChart,
                                                   tenant: Tenant) -> None:  # fmt: skip
    stop = threading.Event()
    created: list[str] = []

    refused: list[str] = []

    def churn() -> None:
        """Like a Job controller: create short GPU pods, noting any creation the fence refused or could not answer."""
        index = 0
        while not stop.is_set():
            name = f"short-{index}"
            result = tenant.kubectl("apply", "-f", "-", stdin=gpu_pod(name, script="sleep 4", grace=5), check=False)
            if result.returncode != 0:
                refused.append(result.stderr.strip())
                time.sleep(0.5)
                continue
            created.append(name)
            index += 1
            time.sleep(2)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        revision_before = real_cluster.get_json("deployment", "-n", RELEASE_NAMESPACE, "gpuaas")["metadata"][
            "generation"
        ]
        chart.upgrade("--set", "operator.poolResyncSeconds=1")
        wait_for(lambda: real_cluster.get_json("deployment", "-n", RELEASE_NAMESPACE, "gpuaas")["status"].get(
            "updatedReplicas") == 2 and len(real_cluster.operator_pods()) == 2 and real_cluster.leader() is not None,
            timeout=180, interval=0.5, message="the upgraded pods rolled out, one leader")  # fmt: skip
        deployment = real_cluster.get_json("deployment", "-n", RELEASE_NAMESPACE, "gpuaas")
        assert deployment["metadata"]["generation"] > revision_before
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--pool-resync-seconds=1" in args
        # Pods keep starting and ending for a while after the new leader took over.
        wait_for(lambda: len(created) >= 5, timeout=60, message="short GPU pods after the upgrade")
    finally:
        stop.set()
        worker.join()
    # Short pods end by themselves; the finalizer keeps each until the ledger has booked it.
    wait_for(lambda: all((p.get("status") or {}).get("phase") in ("Succeeded", "Failed") for p in tenant.observe()),
             timeout=60, message="the short pods finished")  # fmt: skip
    for name in created:
        tenant.kubectl("delete", "pod", name, "--wait=false", check=False)
    tenant.wait_all_gone(timeout=90)
    print(f"helm upgrade: {len(created)} short GPU pods ran; {len(refused)} creations refused during the handover")
    # The surge pod serves before an old one goes, and a stopping pod keeps serving through its preStop sleep.
    assert not refused, refused
    tenant.assert_ledger_matches()


def test_expiry_stops_real_containers(real_cluster: RealCluster, tenant: Tenant) -> None:
    tenant.create("train-2", grace=5)
    tenant.wait_running("train-2")
    end = utc_now() + dt.timedelta(seconds=10)
    real_cluster.kubectl("apply", "-f", "-", stdin=allocation_manifest(iso(end), grace_seconds=0))
    wait_for(
        lambda: (real_cluster.get_json("gpuallocation", ALLOCATION).get("status") or {}).get("phase") == "Expired",
        timeout=90,
        message=f"{ALLOCATION} Expired",
    )
    tenant.wait_all_gone(timeout=90)
    life = next(life for life in tenant.lives.values() if life.name == "train-2")
    assert life.finished is not None
    # The operator deletes expired GPU pods with at most 30 s of grace; this one ignores SIGTERM and has 5.
    stopped_after = (parse_time(life.finished) - end).total_seconds()
    assert 0 <= stopped_after <= 45, f"the container stopped {stopped_after:.0f}s after the window's end"
    quota = tenant.kubectl("get", "resourcequota", "-o", "json").stdout
    assert '"requests.nvidia.com/gpu": "0"' in quota
    tenant.assert_ledger_matches()

    # The chart's webhook (behind its Service) stamped who moved the window's end, and the leader kept it.
    def window_changes() -> list[str]:
        records = real_cluster.get_json("gpuusages", "-l", f"gpuaas.io/allocation={ALLOCATION}")["items"]
        history = [entry for record in records for entry in (record.get("ledger") or {}).get("history") or []]
        return [
            f"{entry['by']}: {change}" for entry in history for change in entry["changes"] if "window end" in change
        ]

    (change,) = wait_for(window_changes, timeout=30, message="the window's change in the grant history")
    assert not change.startswith("unknown"), change


def test_report_cronjob_writes_to_its_volume(real_cluster: RealCluster, chart: InstalledChart) -> None:
    job = "report-now"
    real_cluster.kubectl("create", "job", "-n", RELEASE_NAMESPACE, job, f"--from=cronjob/{RELEASE}-report")
    wait_for(
        lambda: (real_cluster.get_json("job", "-n", RELEASE_NAMESPACE, job).get("status") or {}).get("succeeded"),
        timeout=120,
        message="the report Job succeeded",
        last=lambda: real_cluster.kubectl("logs", "-n", RELEASE_NAMESPACE, f"job/{job}", check=False).stdout,
    )
    assert real_cluster.reports_dir is not None
    files = sorted(real_cluster.reports_dir.glob("gpuaas-report-*.csv"))
    assert files, f"no report in {real_cluster.reports_dir}"
    assert files[0].stat().st_uid == 65532


def test_no_forbidden_calls_after_drills_expiry_and_report(real_cluster: RealCluster) -> None:
    assert_no_forbidden_calls(real_cluster)


def test_operator_pods_use_only_their_service_account(real_cluster: RealCluster) -> None:
    """The operator authenticates as the chart's ServiceAccount: no admin credentials in its pods."""
    for pod in real_cluster.operator_pods():
        volumes = {v["name"] for v in pod["spec"]["volumes"]}
        assert not any("admin" in v for v in volumes), volumes
        assert pod["spec"]["serviceAccountName"] == "gpuaas"


def test_cluster_down_restores_the_host(real_cluster: RealCluster) -> None:
    assert localcluster.stop_local_real_node(real_cluster.name, real_cluster.kubeconfig)
    after = realnode.host_state_fingerprint()
    assert real_cluster.host_before is not None
    for key, value in real_cluster.host_before.items():
        assert after[key] == value, f"{key} differs after the real node stopped"
