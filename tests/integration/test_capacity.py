"""Admission against real pool capacity: the queue, concurrent applies, node health, programGPUs."""

from __future__ import annotations

import threading

import pytest
from kubernetes import client

from gpuaas.domain.scenarios import SCENARIOS, node_manifest, node_name
from tests.integration.allocations import (
    allocation,
    allocation_manifest,
    create_allocation,
    delete_allocation,
    pool_status,
    set_node_ready,
    status_of,
    unique,
    wait_for_phase,
    wait_for_ready,
)
from tests.integration.conftest import LocalCluster, OperatorProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
B200, H200 = SCENARIOS["small"].pools


def test_queue_orders_by_priority_then_creation_and_admits_when_freed(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    big, low, high, mid = (unique(p) for p in ("big", "low", "high", "mid"))
    with allocation(cluster, allocation_manifest(big, B200.name, 24)):
        wait_for_ready(cluster, big)
        create_allocation(cluster, allocation_manifest(low, B200.name, 16, priority=0))
        create_allocation(cluster, allocation_manifest(high, B200.name, 16, priority=10))
        create_allocation(cluster, allocation_manifest(mid, B200.name, 16, priority=5))
        try:
            wait_for(
                lambda: [status_of(cluster, n).get("queuePosition") for n in (high, mid, low)] == [1, 2, 3],
                message="queue positions high=1 mid=2 low=3",
            )
            assert status_of(cluster, low)["phase"] == "Queued"
            assert "16" in status_of(cluster, low)["message"]
            wait_for(lambda: pool_status(cluster, B200.name).get("queued") == 3, message="pool queued 3")
        except BaseException:
            for name in (low, high, mid):
                delete_allocation(cluster, name)
            raise
    try:
        wait_for_ready(cluster, high)
        wait_for_ready(cluster, mid)
        low_status = wait_for(
            lambda: (s := status_of(cluster, low)).get("queuePosition") == 1 and s, message="low first in queue"
        )
        assert low_status["phase"] == "Queued"
        # The pool's status is written at the end of the pass whose workers wrote the grants' statuses.
        wait_for(lambda: pool_status(cluster, B200.name).get("grantedGPUs") == 32, message="pool granted 32")
    finally:
        for name in (low, high, mid):
            delete_allocation(cluster, name)


@pytest.mark.parametrize("attempt", range(3))
def test_concurrent_applies_never_overcommit(cluster: LocalCluster, operator: OperatorProcess, attempt: int) -> None:
    names = [unique(f"race{attempt}") for _ in range(2)]
    barrier = threading.Barrier(len(names))

    def apply(name: str) -> None:
        barrier.wait()
        create_allocation(cluster, allocation_manifest(name, H200.name, H200.gpus))

    threads = [threading.Thread(target=apply, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        phases = wait_for(
            lambda: (
                sorted(p for n in names if (p := status_of(cluster, n).get("phase")) in ("Active", "Queued"))
                if all(status_of(cluster, n).get("phase") in ("Active", "Queued") for n in names)
                else None
            ),
            message="both decided",
        )
        assert phases == ["Active", "Queued"]
        # The pool's status is written at the end of the pass whose workers wrote the allocations' statuses.
        pool = wait_for(
            lambda: (s := pool_status(cluster, H200.name)).get("queued") == 1 and s, message="the pool shows the queue"
        )
        assert pool["grantedGPUs"] == H200.gpus
    finally:
        for name in names:
            delete_allocation(cluster, name)


def test_not_ready_node_lowers_capacity_and_queued_waits_for_repair(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    core = client.CoreV1Api(cluster.api)
    extra = node_manifest(H200, 950)
    extra["metadata"]["annotations"] = {}  # type: ignore[index]  # not KWOK's: the test drives its Ready condition
    name = node_name(H200, 950)
    core.create_node(extra)
    waiting = unique("waiting")
    try:
        set_node_ready(cluster, name, True)
        wait_for(lambda: pool_status(cluster, H200.name).get("capacityGPUs") == H200.gpus + 8, message="capacity up")
        set_node_ready(cluster, name, False)
        wait_for(lambda: pool_status(cluster, H200.name).get("capacityGPUs") == H200.gpus, message="capacity down")
        create_allocation(cluster, allocation_manifest(waiting, H200.name, H200.gpus + 8))
        status = wait_for_phase(cluster, waiting, "Queued")
        assert status["queuePosition"] == 1
        set_node_ready(cluster, name, True)
        status = wait_for_ready(cluster, waiting)
        assert status["grantedGPUs"] == H200.gpus + 8
    finally:
        delete_allocation(cluster, waiting)
        core.delete_node(name)


def test_raising_program_gpus_admits_the_queue(cluster: LocalCluster, operator: OperatorProcess) -> None:
    pools = client.CustomObjectsApi(cluster.api)
    pools.patch_cluster_custom_object("gpuaas.io", "v1alpha1", "gpupools", B200.name, {"spec": {"programGPUs": 8}})
    name = unique("program")
    try:
        create_allocation(cluster, allocation_manifest(name, B200.name, 16))
        wait_for_phase(cluster, name, "Queued")
        wait_for(lambda: pool_status(cluster, B200.name).get("programGPUs") == 8, message="pool programGPUs 8")
        pools.patch_cluster_custom_object("gpuaas.io", "v1alpha1", "gpupools", B200.name, {"spec": {"programGPUs": 24}})
        wait_for_ready(cluster, name)
    finally:
        unset = {"spec": {"programGPUs": None}}
        pools.patch_cluster_custom_object("gpuaas.io", "v1alpha1", "gpupools", B200.name, unset)
        delete_allocation(cluster, name)
