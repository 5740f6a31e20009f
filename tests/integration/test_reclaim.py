"""Issue 14, item 2: every transition that takes GPUs from a grant stops the pods that hold them (Running, Pending
and scheduling-gated alike), a pod that holds quota keeps its grant from going idle, and the GPUs go to others only
once those pods are gone."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from kubernetes import client

from gpuaas.api.common import GROUP, VERSION
from gpuaas.domain.scenarios import SCENARIOS
from tests.integration.allocations import (
    allocation,
    allocation_manifest,
    gpu_pod,
    pod_phase,
    status_of,
    unique,
    wait_for_phase,
    wait_for_ready,
)
from tests.integration.conftest import LocalCluster, OperatorProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
H200 = SCENARIOS["small"].pools[1]  # 3 nodes of 8 GPUs


def run_pod(cluster: LocalCluster, namespace: str, name: str, gpus: int, **spec: Any) -> None:
    cluster.kubectl("--as", "alice", "apply", "-f", "-", stdin=json.dumps(gpu_pod(name, namespace, gpus, **spec)))


def suspend(cluster: LocalCluster, name: str) -> None:
    client.CustomObjectsApi(cluster.api).patch_cluster_custom_object(
        GROUP, VERSION, "gpuallocations", name, {"spec": {"suspend": True}}
    )


def pool_numbers(cluster: LocalCluster) -> tuple[int, int]:
    pool: Any = client.CustomObjectsApi(cluster.api).get_cluster_custom_object(GROUP, VERSION, "gpupools", H200.name)
    return pool["status"]["grantedGPUs"], pool["status"]["availableGPUs"]


def events(cluster: LocalCluster, name: str) -> set[str]:
    found = client.CoreV1Api(cluster.api).list_namespaced_event("default", field_selector=f"involvedObject.name={name}")
    return {event.reason for event in found.items}


def test_suspension_stops_the_pods_and_frees_their_gpus_only_then(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    held, waiting = unique("held"), unique("next")
    with allocation(cluster, allocation_manifest(held, H200.name, 16)):
        wait_for_ready(cluster, held)
        for pod in ("a", "b"):
            run_pod(cluster, held, pod, 8)
        wait_for(lambda: all(pod_phase(cluster, p, held) == "Running" for p in ("a", "b")), message="pods Running")
        with allocation(cluster, allocation_manifest(waiting, H200.name, 16, owners=[{"kind": "User", "name": "bob"}])):
            wait_for_phase(cluster, waiting, "Queued")
            suspend(cluster, held)
            wait_for_phase(cluster, held, "Suspended")
            # Its pods are stopped, booked and gone; only then does the waiting grant get their GPUs.
            wait_for(lambda: pod_phase(cluster, "a", held) is None and pod_phase(cluster, "b", held) is None,
                     message="the suspended grant's pods gone")  # fmt: skip
            assert "PodsStopped" in events(cluster, held)
            wait_for_ready(cluster, waiting)
            # The pool's status is written at the end of the pass whose workers wrote the grants' statuses.
            wait_for(lambda: pool_numbers(cluster) == (16, 8), message="pool granted 16, available 8")
            usage = status_of(cluster, held)
            assert usage["phase"] == "Suspended"
            assert usage["grantedGPUs"] == 0


def test_a_gated_pod_holds_its_grant_and_stops_with_it(cluster: LocalCluster, operator: OperatorProcess) -> None:
    name = unique("gated")
    manifest = allocation_manifest(name, H200.name, 8, idle={"after": "3s", "action": "Reclaim"})
    with allocation(cluster, manifest):
        wait_for_ready(cluster, name)
        created = time.monotonic()
        run_pod(cluster, name, "waits", 8, schedulingGates=[{"name": "example.com/later"}])
        # The gated pod holds the quota: the idle clock stops, and stays stopped past idle.after.
        wait_for(lambda: status_of(cluster, name).get("idleSince") is None, message="the idle clock stopped")
        time.sleep(max(0.0, created + 6 - time.monotonic()))  # twice idle.after: a reclaim would have happened
        status = status_of(cluster, name)
        assert status["phase"] == "Active", status
        assert status.get("idleSince") is None
        assert pod_phase(cluster, "waits", name) == "Pending"
        # Taken away (as idle reclaim would), the grant stops the gated pod too: removing its gate later gains nothing.
        suspend(cluster, name)
        wait_for(lambda: pod_phase(cluster, "waits", name) is None, message="the gated pod stopped")
