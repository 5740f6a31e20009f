"""Bad allocations are refused at `kubectl apply` with a message a person can act on."""

from __future__ import annotations

import json
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes import client

from gpuaas.api.common import GROUP, VERSION
from gpuaas.domain.scenarios import SCENARIOS
from tests.integration.allocations import (
    allocation,
    allocation_exists,
    allocation_manifest,
    condition,
    create_allocation,
    delete_allocation,
    unique,
    wait_for_ready,
)
from tests.integration.conftest import LocalCluster, OperatorProcess
from tests.waiting import wait_for


def event_reasons(cluster: LocalCluster, allocation_name: str) -> set[str]:
    events = client.CoreV1Api(cluster.api).list_namespaced_event(
        "default", field_selector=f"involvedObject.name={allocation_name}"
    )
    return {event.reason for event in events.items}


def operator_metrics(operator: OperatorProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5) as response:
        return str(response.read().decode())


pytestmark = pytest.mark.integration
B200, H200 = SCENARIOS["small"].pools


def apply(cluster: LocalCluster, manifest: dict[str, Any]) -> str:
    """kubectl apply as the program office; returns stderr (empty when accepted)."""
    result = cluster.kubectl("apply", "-f", "-", stdin=json.dumps(manifest), check=False)
    if result.returncode == 0:
        cluster.kubectl("delete", "gpuallocation", manifest["metadata"]["name"], "--wait=false", check=False)
    return result.stderr


def with_spec(**changes: Any) -> dict[str, Any]:
    manifest = allocation_manifest(unique("bad"), B200.name, 8)
    manifest["spec"].update(changes)
    return manifest


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"gpus": 0}, "should be greater than or equal to 1"),
        ({"gpus": -8}, "should be greater than or equal to 1"),
        ({"gpus": 1.5}, "must be of type integer"),
        ({"gpus": 10**9}, "should be less than or equal to 100000"),
        ({"pool": "no-such-pool"}, "pool 'no-such-pool' does not exist"),
        ({"exclusiveNodes": True, "gpus": 12}, "multiple of 8"),
        ({"namespace": "kube-system"}, "kube-system"),
        ({"namespace": "default"}, "default"),
        ({"namespace": "Not_A_Label"}, "spec.namespace"),
    ],
    ids=["zero", "negative", "fraction", "huge", "unknown-pool", "exclusive-not-whole-nodes", "kube-system",
         "default", "bad-namespace"],
)  # fmt: skip
def test_refused_with_clear_message(
    cluster: LocalCluster, operator: OperatorProcess, changes: dict[str, Any], expected: str
) -> None:
    error = apply(cluster, with_spec(**changes))
    assert expected in error, error


def test_window_ending_before_start(cluster: LocalCluster, operator: OperatorProcess) -> None:
    now = datetime.now(UTC)
    manifest = with_spec(window={"start": now.isoformat(), "end": (now - timedelta(days=1)).isoformat()})
    assert "window.end must be after window.start" in apply(cluster, manifest)


def test_existing_unmanaged_namespace(cluster: LocalCluster, operator: OperatorProcess) -> None:
    core = client.CoreV1Api(cluster.api)
    taken = unique("someone-else")
    core.create_namespace({"metadata": {"name": taken}})
    try:
        error = apply(cluster, with_spec(namespace=taken))
        assert f"namespace {taken} already exists and is not managed by gpuaas" in error
        assert core.read_namespace(taken).metadata.labels.get("gpuaas.io/managed") is None
    finally:
        core.delete_namespace(taken)


def test_namespace_clash_between_allocations(cluster: LocalCluster, operator: OperatorProcess) -> None:
    first = allocation_manifest(unique("first"), B200.name, 8)
    with allocation(cluster, first) as name:
        wait_for_ready(cluster, name)
        second = with_spec(namespace=name)
        assert f"namespace {name} already belongs to allocation {name}" in apply(cluster, second)


def test_a_namespace_held_by_a_finalizer_is_reported_truthfully(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    """Issue 14, item 5: a tenant's object with a finalizer keeps the namespace Terminating. gpuaas says so, and what
    holds it, instead of "namespace deleted"; a new grant for the same namespace hears what is really in the way."""
    core, custom = client.CoreV1Api(cluster.api), client.CustomObjectsApi(cluster.api)
    old = allocation_manifest(unique("stuck"), H200.name, 8)
    name = old["metadata"]["name"]
    hold = {"metadata": {"name": "results", "finalizers": ["example.com/never-released"]}, "data": {"acc": "0.9"}}
    create_allocation(cluster, old)
    wait_for_ready(cluster, name)
    core.create_namespaced_config_map(name, hold)
    delete_allocation(cluster, name, wait=False)

    def released_condition() -> dict[str, Any]:
        status = (custom.get_cluster_custom_object(GROUP, VERSION, "gpuallocations", name).get("status")) or {}
        return condition(status, "Released")

    held = wait_for(lambda: "example.com/never-released" in (c := released_condition()).get("message", "") and c,
                    message="the Released condition saying what holds the namespace")  # fmt: skip
    assert (held["status"], held["reason"]) == ("False", "NamespaceTerminating")
    reasons = event_reasons(cluster, name)
    assert "NamespaceTerminating" in reasons
    assert "Released" not in reasons  # nothing claims the namespace is gone
    assert f'gpuaas_namespace_terminating{{allocation="{name}",namespace="{name}",pool="{H200.name}"}} 1.0' in (
        operator_metrics(operator)
    )
    # A new grant for the same namespace is told what is in the way.
    again = allocation_manifest(unique("again"), H200.name, 8, namespace=name)
    error = apply(cluster, again)
    assert f"namespace {name} is still being deleted" in error, error
    assert "example.com/never-released" in error
    # The tenant's finalizer goes: the namespace goes, and only now is the allocation released.
    core.patch_namespaced_config_map("results", name, {"metadata": {"finalizers": None}})
    wait_for(lambda: not allocation_exists(cluster, name), timeout=60, message="the allocation released")
    # The Released event is posted right after the finalizer goes, so it may come a moment after the allocation.
    wait_for(lambda: "Released" in event_reasons(cluster, name), timeout=10, message="the Released event")
    wait_for(lambda: f'allocation="{name}"' not in operator_metrics(operator), message="the metric series gone")
    with allocation(cluster, again) as again_name:
        wait_for_ready(cluster, again_name)
