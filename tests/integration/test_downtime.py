"""Downtime credit on the local cluster: a node under a grant fails and comes back; the allocation's record and the
pool's month record book exactly the GPU-seconds between the two passes that saw it, and the pool adds up."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import pytest
from kubernetes import client

from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.usage import POOL_USAGE_PLURAL, USAGE_PLURAL, GpuPoolUsage, GpuUsage
from gpuaas.domain.ledger import parse_timestamp, to_epoch
from gpuaas.domain.report import build_report
from gpuaas.domain.scenarios import SCENARIOS, node_manifest, node_name
from tests.integration.allocations import (
    allocation_manifest,
    condition,
    create_allocation,
    delete_allocation,
    pool_status,
    set_node_ready,
    status_of,
    unique,
    wait_for_ready,
)
from tests.integration.conftest import LocalCluster, OperatorProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
B200, H200 = SCENARIOS["small"].pools


def pool_record(cluster: LocalCluster) -> GpuPoolUsage | None:
    """The pool's latest month record."""
    listing = client.CustomObjectsApi(cluster.api).list_cluster_custom_object(
        GROUP, VERSION, POOL_USAGE_PLURAL, label_selector=f"gpuaas.io/pool={H200.name}"
    )
    records = sorted((GpuPoolUsage.from_object(obj) for obj in listing["items"]), key=lambda r: r.spec.month)
    return records[-1] if records else None


def booked_until(cluster: LocalCluster, instant: datetime) -> GpuPoolUsage:
    """The pool's record once it is booked up to at least `instant`."""
    found: GpuPoolUsage = wait_for(
        lambda: (
            (r := pool_record(cluster)) is not None
            and r.ledger.booked_until is not None
            and to_epoch(r.ledger.booked_until) >= to_epoch(instant)  # the ledger books whole seconds
            and r
        ),
        message=f"pool record booked until {instant}",
    )
    return found


def degraded_since(status: dict[str, Any]) -> datetime:
    changed = parse_timestamp(condition(status, "Degraded")["lastTransitionTime"])
    assert changed is not None
    return changed


def usage_records(cluster: LocalCluster, name: str) -> list[GpuUsage]:
    listing = client.CustomObjectsApi(cluster.api).list_cluster_custom_object(
        GROUP, VERSION, USAGE_PLURAL, label_selector=f"gpuaas.io/allocation={name}"
    )
    return [GpuUsage.from_object(obj) for obj in listing["items"]]


def test_a_failed_node_under_a_grant_is_credited_to_the_second(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    core = client.CoreV1Api(cluster.api)
    extra = node_manifest(H200, 951)
    extra["metadata"]["annotations"] = {}  # type: ignore[index]  # not KWOK's: the test drives its Ready condition
    node = node_name(H200, 951)
    core.create_node(extra)
    name = unique("credited")
    gpus = H200.gpus + 8  # the whole pool, the extra node included: its failure leaves the grant short
    try:
        set_node_ready(cluster, node, True)
        wait_for(lambda: pool_status(cluster, H200.name).get("capacityGPUs") == gpus, message="capacity up")
        create_allocation(cluster, allocation_manifest(name, H200.name, gpus))
        wait_for_ready(cluster, name)

        set_node_ready(cluster, node, False)
        down = wait_for(lambda: (s := status_of(cluster, name)).get("downGPUs") == 8 and s, message="8 GPUs down")
        assert (condition(down, "Degraded")["status"], condition(down, "Degraded")["reason"]) == (
            "True",
            "GrantedGPUsDown",
        )
        # The pool's status is written at the end of the pass whose workers wrote the grant's status.
        pool = wait_for(
            lambda: (s := pool_status(cluster, H200.name)).get("downGPUs") == 8 and s, message="pool shows 8 down"
        )
        assert (pool["downGPUs"], pool["creditedGPUs"], pool["grantedGPUs"]) == (8, 8, gpus)
        failed = degraded_since(down)
        at_failure = booked_until(cluster, failed)  # a change of the hardware is written at once
        time.sleep(2)
        set_node_ready(cluster, node, True)
        back = wait_for(
            lambda: condition(s := status_of(cluster, name), "Degraded").get("status") == "False" and s,
            message="credit ended",
        )
        assert back["downGPUs"] == 0
        repaired = degraded_since(back)
        credit = 8 * (to_epoch(repaired) - to_epoch(failed))
        assert credit >= 8 * 2

        after = booked_until(cluster, repaired)  # the repair is written at once too
        assert after.ledger.identity_gap == 0
        # From where the record stood at the failure (its pass, unless a periodic flush came between) to the repair.
        since = to_epoch(at_failure.ledger.booked_until)  # type: ignore[arg-type]
        assert since <= to_epoch(repaired)
        credited_since = 8 * (to_epoch(repaired) - since)
        assert after.ledger.credited_gpu_seconds - at_failure.ledger.credited_gpu_seconds == credited_since
        assert after.ledger.down_gpu_seconds - at_failure.ledger.down_gpu_seconds == credited_since
        seconds = to_epoch(after.ledger.booked_until) - since  # type: ignore[arg-type]
        assert after.ledger.granted_gpu_seconds - at_failure.ledger.granted_gpu_seconds == gpus * seconds
        assert after.ledger.program_gpu_seconds - at_failure.ledger.program_gpu_seconds == gpus * seconds

        delete_allocation(cluster, name)  # the release books the allocation's last interval and writes it
        (record,) = usage_records(cluster, name)
        assert record.ledger.down_gpu_seconds == credit
        assert record.ledger.granted_gpu_seconds > record.ledger.down_gpu_seconds
        report = build_report([record, after], after.spec.month)
        assert report.unbalanced_pools() == []
        (row,) = report.rows
        assert row.down_gpu_seconds == credit
    finally:
        delete_allocation(cluster, name)
        core.delete_node(node)
