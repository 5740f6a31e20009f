"""Bad allocations are refused at `kubectl apply` with a message a person can act on."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes import client

from gpuaas.domain.scenarios import SCENARIOS
from tests.integration.allocations import allocation, allocation_manifest, unique, wait_for_ready
from tests.integration.conftest import LocalCluster, OperatorProcess

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
