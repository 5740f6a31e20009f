"""The usage ledger against the test's own timeline: exact, and neither lost nor doubled across faults."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes import client, watch

from gpuaas.api.common import GROUP, VERSION
from gpuaas.domain.scenarios import SCENARIOS
from tests.integration.allocations import (
    allocation,
    allocation_manifest,
    condition,
    create_allocation,
    delete_allocation,
    gpu_pod,
    pod_phase,
    status_of,
    unique,
    wait_for_phase,
    wait_for_ready,
)
from tests.integration.conftest import LocalCluster, OperatorProcess, wait_for

pytestmark = pytest.mark.integration
B200, H200 = SCENARIOS["small"].pools


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def usage_records(cluster: LocalCluster, allocation_name: str) -> list[dict[str, Any]]:
    items = client.CustomObjectsApi(cluster.api).list_cluster_custom_object(GROUP, VERSION, "gpuusages")["items"]
    return [r for r in items if r["spec"]["allocation"] == allocation_name]


def used_seconds(cluster: LocalCluster, allocation_name: str) -> int:
    return sum((r.get("status") or {}).get("usedGPUSeconds", 0) for r in usage_records(cluster, allocation_name))


class Timeline:
    """The test's own record of each pod: start as the pod reports it, end as the moment the test deleted it."""

    def __init__(self, cluster: LocalCluster, namespace: str) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.core = client.CoreV1Api(cluster.api)
        self.pods: dict[str, tuple[int, datetime, datetime | None]] = {}

    def start(self, name: str, gpus: int) -> None:
        body = json.dumps(gpu_pod(name, self.namespace, gpus))
        self.cluster.kubectl("--as", "alice", "apply", "-f", "-", stdin=body)
        wait_for(lambda: pod_phase(self.cluster, name, self.namespace) == "Running", message=f"{name} Running")
        pod = self.core.read_namespaced_pod(name, self.namespace)
        started = pod.status.container_statuses[0].state.running.started_at
        self.pods[name] = (gpus, started, None)

    def end(self, name: str) -> None:
        gpus, started, _ = self.pods[name]
        self.core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=0)
        self.pods[name] = (gpus, started, datetime.now(UTC))

    def expected_gpu_seconds(self) -> float:
        total = 0.0
        for gpus, started, ended in self.pods.values():
            assert ended is not None
            total += gpus * (ended - started).total_seconds()
        return total

    def wait_all_gone(self, timeout: float = 60) -> None:
        wait_for(
            lambda: all(pod_phase(self.cluster, name, self.namespace) is None for name in self.pods),
            timeout=timeout,
            message="every pod booked and released",
        )


def assert_exact(cluster: LocalCluster, name: str, timeline: Timeline) -> None:
    """Within one second per pod of the test's own calculation (timestamps are whole seconds)."""
    expected = timeline.expected_gpu_seconds()
    tolerance = sum(gpus for gpus, _, _ in timeline.pods.values()) * 1.0
    booked = wait_for(
        lambda: (u := used_seconds(cluster, name)) and abs(u - expected) <= tolerance and u,
        timeout=30,
        message=f"ledger of {name} within {tolerance} GPU-s of {expected:.1f}",
    )
    assert abs(booked - expected) <= tolerance


def test_ledger_matches_the_timeline(cluster: LocalCluster, operator: OperatorProcess) -> None:
    name = unique("exact")
    with allocation(cluster, allocation_manifest(name, H200.name, 16)):
        wait_for_ready(cluster, name)
        timeline = Timeline(cluster, name)
        timeline.start("a", 8)
        timeline.start("b", 4)
        time.sleep(3)
        timeline.end("a")
        timeline.start("c", 4)
        time.sleep(2)
        timeline.end("b")
        timeline.end("c")
        timeline.wait_all_gone()
        assert_exact(cluster, name, timeline)
        record = usage_records(cluster, name)[0]
        assert record["status"]["podCount"] == 3
        assert record["status"]["peakGPUsInUse"] in (12, 16)


def test_operator_down_while_pods_start_finish_and_are_deleted(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    name = unique("downtime")
    with allocation(cluster, allocation_manifest(name, B200.name, 16)):
        wait_for_ready(cluster, name)
        timeline = Timeline(cluster, name)
        timeline.start("before", 8)
        time.sleep(2)
        operator.kill()
        try:
            # The webhook is down, so no new pods; the running ones end and are deleted meanwhile.
            time.sleep(2)
            timeline.end("before")
            time.sleep(2)
            assert pod_phase(cluster, "before", name) is not None  # held by the usage finalizer
        finally:
            operator.start()
        timeline.wait_all_gone()
        assert_exact(cluster, name, timeline)
        booked = used_seconds(cluster, name)
        time.sleep(3)  # more passes must not book the same pod again
        assert used_seconds(cluster, name) == booked


def test_operator_killed_during_flushes(cluster: LocalCluster, operator: OperatorProcess) -> None:
    name = unique("flushkill")
    with allocation(cluster, allocation_manifest(name, B200.name, 32)):
        wait_for_ready(cluster, name)
        timeline = Timeline(cluster, name)
        for round_number in range(3):
            pods = [f"r{round_number}-{i}" for i in range(2)]
            for pod in pods:
                timeline.start(pod, 8)
            time.sleep(1)
            for pod in pods:
                timeline.end(pod)
            time.sleep(0.3 + 0.2 * round_number)  # lands in the pass that books and releases them
            operator.kill()
            operator.start()
        timeline.wait_all_gone()
        assert_exact(cluster, name, timeline)


def test_deleted_namespace_pods_are_booked(cluster: LocalCluster, operator: OperatorProcess) -> None:
    name = unique("nsgone")
    core = client.CoreV1Api(cluster.api)
    with allocation(cluster, allocation_manifest(name, H200.name, 8)):
        wait_for_ready(cluster, name)
        timeline = Timeline(cluster, name)
        timeline.start("p", 8)
        time.sleep(2)
        gpus, started, _ = timeline.pods["p"]
        version = core.read_namespaced_pod("p", name).metadata.resource_version
        core.delete_namespace(name)
        # The namespace controller deletes the pod with its 30 s grace. It holds its GPUs until it is
        # killed, at the latest until its deletionTimestamp; a KWOK pod never reports a finish, so it is
        # billed to that deadline. KWOK "kills" at once (a grace-0 delete, which moves the deadline back
        # to that moment): the deletionTimestamp the pod has when it goes is exactly the end booked.
        final: Any = None
        events = watch.Watch().stream(
            core.list_namespaced_pod,
            name,
            field_selector="metadata.name=p",
            resource_version=version,
            timeout_seconds=90,
        )
        for event in events:
            if event["type"] == "DELETED":
                final = event["object"]
                break
        assert final is not None, "pod p not deleted within 90 s"
        assert final.metadata.deletion_timestamp is not None
        timeline.wait_all_gone()
        # Records are written before the finalizer goes: once the pod is gone its booking is final.
        end = final.metadata.deletion_timestamp
        assert used_seconds(cluster, name) == gpus * int((end - started).total_seconds()), (started, end)


def test_usage_outlives_the_allocation(cluster: LocalCluster, operator: OperatorProcess) -> None:
    name = unique("outlive")
    with allocation(cluster, allocation_manifest(name, H200.name, 8)):
        wait_for_ready(cluster, name)
        timeline = Timeline(cluster, name)
        timeline.start("p", 8)
        time.sleep(2)
        timeline.end("p")
        timeline.wait_all_gone()
        booked = used_seconds(cluster, name)
        assert booked > 0
    assert used_seconds(cluster, name) == booked


def test_idle_allocation_is_reclaimed_and_resumes_through_the_queue(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    idle_name, waiting = unique("idle"), unique("waiting")
    manifest = allocation_manifest(idle_name, H200.name, H200.gpus, idle={"after": "3s", "action": "Reclaim"})
    with allocation(cluster, manifest):
        wait_for_ready(cluster, idle_name)
        create_allocation(cluster, allocation_manifest(waiting, H200.name, 8))
        try:
            wait_for_phase(cluster, waiting, "Queued")
            status = wait_for_phase(cluster, idle_name, "Suspended", timeout=20)
            assert condition(status, "Ready")["status"] == "False"
            quota = client.CoreV1Api(cluster.api).read_namespaced_resource_quota("gpuaas-quota", idle_name)
            assert quota.spec.hard["requests.nvidia.com/gpu"] == "0"
            wait_for_ready(cluster, waiting)  # the reclaimed GPUs went to the waiting list
            events = client.CoreV1Api(cluster.api).list_namespaced_event(
                "default", field_selector=f"involvedObject.name={idle_name}"
            )
            assert {"Idle", "Reclaimed"} <= {e.reason for e in events.items}
        finally:
            delete_allocation(cluster, waiting)
        # The program office resumes it; it goes through the queue and becomes Active again.
        client.CustomObjectsApi(cluster.api).patch_cluster_custom_object(
            GROUP, VERSION, "gpuallocations", idle_name, {"spec": {"suspend": False, "idle": {"action": "Report"}}}
        )
        wait_for_ready(cluster, idle_name)
        assert status_of(cluster, idle_name)["grantedGPUs"] == H200.gpus
