"""GpuPool status follows real Node objects on a real kube-apiserver, without operator restarts."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.pool import POOL_PLURAL, GpuPoolSpec
from gpuaas.api.usage import POOL_USAGE_PLURAL, GpuPoolUsage, PoolLedger
from gpuaas.domain import planner
from gpuaas.domain.ledger import month_of
from gpuaas.domain.nodes import node_info_from_manifest
from gpuaas.domain.scenarios import SCENARIOS, node_manifest, node_name, pool_manifest
from gpuaas.k8s.client import load_config
from gpuaas.k8s.writer import KubernetesWriter
from tests.integration.allocations import pool_status, unique
from tests.integration.conftest import LocalCluster, OperatorProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
SMALL = SCENARIOS["small"]
B200 = SMALL.pools[0]


def pinned_kubernetes_version() -> str:
    env = (Path(__file__).resolve().parents[2] / "tools" / "versions.env").read_text()
    return next(line.split("=", 1)[1] for line in env.splitlines() if line.startswith("KUBERNETES_VERSION="))


def wait_for_capacity(cluster: LocalCluster, pool: str, gpus: int, timeout: float = 30) -> dict[str, Any]:
    status: dict[str, Any] = wait_for(
        lambda: (s := pool_status(cluster, pool)).get("capacityGPUs") == gpus and s,
        timeout=timeout,
        message=f"{pool} capacityGPUs == {gpus}",
    )
    return status


def test_apiserver_is_the_pinned_build(cluster: LocalCluster) -> None:
    version = client.VersionApi(cluster.api).get_code()
    assert version.git_version == pinned_kubernetes_version()
    assert version.git_tree_state == "clean"


def test_pools_report_every_node_healthy(cluster: LocalCluster, operator: OperatorProcess) -> None:
    for pool in SMALL.pools:
        status = wait_for_capacity(cluster, pool.name, pool.gpus)
        assert status["nodes"] == pool.nodes
        assert status["readyNodes"] == pool.nodes
        assert status["programGPUs"] == pool.gpus
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True"


def test_kubectl_shows_pool_columns(cluster: LocalCluster, operator: OperatorProcess) -> None:
    wait_for_capacity(cluster, B200.name, B200.gpus)
    output = cluster.kubectl("get", "gp", B200.name).stdout
    header, row = output.splitlines()[:2]
    assert header.split()[:5] == ["NAME", "MODEL", "PROVIDER", "NODES", "READY"]
    assert row.split()[:6] == [B200.name, "B200", "nhn", str(B200.nodes), str(B200.nodes), str(B200.gpus)]


def test_cordoned_node_leaves_capacity_and_returns(cluster: LocalCluster, operator: OperatorProcess) -> None:
    core = client.CoreV1Api(cluster.api)
    node = node_name(B200, 0)
    wait_for_capacity(cluster, B200.name, B200.gpus)
    core.patch_node(node, {"spec": {"unschedulable": True}})
    try:
        status = wait_for_capacity(cluster, B200.name, B200.gpus - 8)
        assert status["readyNodes"] == B200.nodes  # cordoned is still Ready, just not schedulable
        degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
        assert degraded["status"] == "True"
    finally:
        core.patch_node(node, {"spec": {"unschedulable": False}})
    wait_for_capacity(cluster, B200.name, B200.gpus)


def test_added_and_removed_nodes_change_capacity(cluster: LocalCluster, operator: OperatorProcess) -> None:
    core = client.CoreV1Api(cluster.api)
    extra = node_manifest(B200, 900)
    wait_for_capacity(cluster, B200.name, B200.gpus)
    core.create_node(extra)
    try:
        status = wait_for_capacity(cluster, B200.name, B200.gpus + 8)
        assert status["nodes"] == B200.nodes + 1
    finally:
        core.delete_node(node_name(B200, 900))
    status = wait_for_capacity(cluster, B200.name, B200.gpus)
    assert status["nodes"] == B200.nodes


def test_not_ready_node_leaves_capacity(cluster: LocalCluster, operator: OperatorProcess) -> None:
    """A node nobody heartbeats for (not managed by KWOK) whose Ready condition we flip by hand."""
    core = client.CoreV1Api(cluster.api)
    manifest = node_manifest(B200, 901)
    manifest["metadata"]["annotations"] = {}  # type: ignore[index]
    name = node_name(B200, 901)
    core.create_node(manifest)
    try:
        ready = {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test"}
        core.patch_node_status(name, {"status": {"conditions": [ready]}})
        wait_for_capacity(cluster, B200.name, B200.gpus + 8)
        core.patch_node_status(name, {"status": {"conditions": [{**ready, "status": "False"}]}})
        status = wait_for_capacity(cluster, B200.name, B200.gpus)
        assert status["readyNodes"] == B200.nodes
    finally:
        core.delete_node(name)


def test_a_taint_list_read_before_another_controllers_taint_does_not_drop_that_taint(cluster: LocalCluster) -> None:
    """gpuaas rewrites a node's whole taint list to add the pool's fence. If the node lifecycle controller taints the
    node unreachable between gpuaas's read and its write, the write must not undo that taint: the API server refuses
    it as stale, and a write planned from the fresh node keeps both."""
    load_config(str(cluster.kubeconfig))
    core = client.CoreV1Api(cluster.api)
    manifest = node_manifest(B200, 902)
    manifest["metadata"]["labels"] = {"kubernetes.io/hostname": "taint-race"}  # type: ignore[index]  # in no pool
    manifest["metadata"]["name"] = "taint-race"  # type: ignore[index]
    manifest["metadata"]["annotations"] = {}  # type: ignore[index]  # not KWOK's: nothing else writes it
    core.create_node(manifest)
    spec = GpuPoolSpec.model_validate(pool_manifest(B200)["spec"])
    unreachable = {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}

    def read_node() -> Any:
        return node_info_from_manifest(cluster.api.sanitize_for_serialization(core.read_node("taint-race")), ())

    def keys() -> set[tuple[str, str | None, str]]:
        return {(t.key, t.value, t.effect) for t in core.read_node("taint-race").spec.taints or []}

    def plan_and_write() -> set[tuple[str, str | None, str]]:
        for action in planner.pool_taint_actions(B200.name, spec, [read_node()]):
            KubernetesWriter().perform(action)
        return keys()

    try:
        assert spec.taint
        stale_plan = planner.pool_taint_actions(B200.name, spec, [read_node()])
        core.patch_node("taint-race", {"spec": {"taints": [unreachable]}})
        for action in stale_plan:
            # Raised, not swallowed: a planner that took it for done would report a fence no node carries.
            with pytest.raises(ApiException) as refused:
                KubernetesWriter().perform(action)
            assert refused.value.status == 409
        fenced = ("gpuaas.io/pool", B200.name, "NoSchedule")
        assert (unreachable["key"], None, "NoExecute") in keys()
        assert fenced not in keys()  # refused as stale

        taints = wait_for(lambda: fenced in (found := plan_and_write()) and found, message="the pool taint is set")
        assert (unreachable["key"], None, "NoExecute") in taints
    finally:
        core.delete_node("taint-race")


def test_a_pool_that_starts_to_taint_patches_a_node_that_changed_only_in_its_version(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    """A node's heartbeat moves its resourceVersion and nothing gpuaas decides from. When the pool then asks for its
    taint, the operator must send the node's current version, not the one it first saw (its node index kept that
    while the rest was equal, and every patch was refused)."""
    core = client.CoreV1Api(cluster.api)
    custom = client.CustomObjectsApi(cluster.api)
    manifest = node_manifest(B200, 903)
    manifest["metadata"]["labels"] = {"gpuaas.io/probe": "versions"}  # type: ignore[index]
    manifest["metadata"]["name"] = "version-probe"  # type: ignore[index]
    pool = pool_manifest(B200)
    pool["metadata"] = {"name": "version-probe"}
    pool["spec"] = {**pool["spec"], "nodeSelector": {"gpuaas.io/probe": "versions"}, "taint": False}  # type: ignore[dict-item]
    core.create_node(manifest)
    custom.create_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, pool)
    try:
        wait_for(lambda: pool_status(cluster, "version-probe").get("nodes") == 1, message="the probe pool has its node")
        core.patch_node("version-probe", {"metadata": {"annotations": {"heartbeat": "1"}}})
        custom.patch_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, "version-probe", {"spec": {"taint": True}})
        fenced = ("gpuaas.io/pool", "version-probe", "NoSchedule")
        wait_for(
            lambda: fenced in {(t.key, t.value, t.effect) for t in core.read_node("version-probe").spec.taints or []},
            timeout=30,
            message="the probe pool's taint is on its node",
        )
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, "version-probe")
        core.delete_node("version-probe")


def refuse_pool_writes(cluster: LocalCluster, name: str) -> None:
    """A ValidatingAdmissionPolicy refusing every write of pool statuses and pool month records, as an API server
    under a broken admission chain would; in force once a dry run of such a write is refused."""
    rule = {
        "apiGroups": [GROUP],
        "apiVersions": ["*"],
        "operations": ["CREATE", "UPDATE"],
        "resources": [f"{POOL_PLURAL}/status", POOL_USAGE_PLURAL],
    }
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [rule]},
            "validations": [{"expression": "false", "message": "refused by the test"}],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    }
    cluster.kubectl(
        "apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": [policy, binding]})
    )
    probe = json.dumps({"status": {"queued": 1 + int(pool_status(cluster, B200.name).get("queued", 0))}})

    def refused() -> bool:
        tried = cluster.kubectl(
            "patch", "gp", B200.name, "--subresource=status", "--type=merge", "-p", probe, "--dry-run=server",
            check=False,
        )  # fmt: skip
        return "refused by the test" in tried.stderr

    wait_for(refused, message="the policy in force")


def test_pool_writes_the_api_server_refuses_are_counted_and_written_later_and_the_record_stays_exact(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    """The pool's status and month record are written off the pass, on threads of the pool's own: a refusal there
    is counted as a reconcile error and written again, and the record loses nothing of the split it booked in
    memory meanwhile (a re-read would have booked the whole refused stretch with the breakdown at its end)."""
    wait_for_capacity(cluster, B200.name, B200.gpus)
    records = client.CustomObjectsApi(cluster.api)
    month = month_of(datetime.now(UTC), "UTC")  # the test operator's time zone

    def record() -> PoolLedger:
        try:
            found = records.get_cluster_custom_object(GROUP, VERSION, POOL_USAGE_PLURAL, f"{B200.name}-{month}")
        except ApiException as error:
            if error.status == 404:
                return PoolLedger()  # not written yet
            raise
        return GpuPoolUsage.from_object(found).ledger

    def record_refusals() -> int:
        return operator.log_path.read_text().count(f"pool {B200.name}: month record write failed")

    core = client.CoreV1Api(cluster.api)
    node = node_name(B200, 1)
    # Earlier tests' nodes (a NotReady one leaves capacity but stays a member, its GPUs in the nominal program)
    # must be out of the pool, and the record written since, or their last second is booked in this test's stretch.
    wait_for(lambda: pool_status(cluster, B200.name).get("nodes") == B200.nodes, message="the pool's own nodes only")
    settled = datetime.now(UTC)
    time.sleep(1)  # the cordon's pass books from a whole second past `settled`
    cordoned_at = datetime.now(UTC)
    core.patch_node(node, {"spec": {"unschedulable": True}})  # a change of the hardware: the record is written at once
    try:
        wait_for_capacity(cluster, B200.name, B200.gpus - 8)
        wait_for(
            lambda: (written := record().booked_until) is not None and written > settled,
            timeout=90,
            message="the pool's record written since its own nodes only",
        )
        errors = f'gpuaas_reconcile_errors_total{{pool="{B200.name}"}}'
        counted, refusals = operator.series(errors), record_refusals()
        name = unique("refuse")
        refuse_pool_writes(cluster, name)
        try:
            before = record()  # nothing is written from here until the policy goes
            started = before.booked_until
            assert started is not None
            time.sleep(3)  # down for a while before the node comes back
            uncordoned_at = datetime.now(UTC)
            core.patch_node(node, {"spec": {"unschedulable": False}})  # a new status and a record write due at once
            # The first refused write is the pass that saw the node back (no flush is due for a minute), so that
            # pass ran before the refusal is seen in the log.
            seen_back_by: datetime = wait_for(
                lambda: record_refusals() > refusals and datetime.now(UTC), message="the record's write refused"
            )
            wait_for(lambda: operator.series(errors) >= counted + 2, message="refused writes counted")
            time.sleep(2)  # up for a while before the writes go through, so "all of the stretch down" stands out
            assert pool_status(cluster, B200.name)["capacityGPUs"] == B200.gpus - 8  # nothing written meanwhile
            assert record() == before
        finally:
            cluster.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", name)
        wait_for_capacity(cluster, B200.name, B200.gpus)
        after = wait_for(lambda: (r := record()) != before and r, message="the record written again")
    finally:
        core.patch_node(node, {"spec": {"unschedulable": False}})
    ended = after.booked_until
    assert ended is not None
    booked = int((ended - started).total_seconds())
    # Every second since the last write booked once, the refused stretch included, and the parts add up (the
    # pool's nominal GPUs stay its program while a node is cordoned).
    assert after.program_gpu_seconds - before.program_gpu_seconds == B200.gpus * booked
    assert after.identity_gap == 0
    # The node's GPUs are down until the pass that saw it back, in whole seconds: not none of the stretch (booked
    # with the breakdown at its end), nor all of it. That pass ran after the uncordon and before its write was seen
    # refused; how long after depends on the machine's load, so the test bounds it by what it saw.
    down_from = max(started, cordoned_at)
    down = after.down_gpu_seconds - before.down_gpu_seconds
    assert 8 * ((uncordoned_at - down_from).total_seconds() - 2) <= down
    assert down <= 8 * ((seen_back_by - down_from).total_seconds() + 1) < 8 * booked
    wait_for_capacity(cluster, B200.name, B200.gpus)
