"""Grant history on the real control plane: the webhooks stamp who asked, the ledger keeps each change once, past
the allocation's deletion, and the report's appendix shows them."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes import client

from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.usage import USAGE_PLURAL, usage_name
from gpuaas.domain.history import DELETE_REQUESTED_ANNOTATION, RECENT_CHANGES_ANNOTATION
from gpuaas.domain.ledger import month_of
from gpuaas.domain.planner import RELEASE_FINALIZER
from gpuaas.domain.scenarios import SCENARIOS
from tests.integration.allocations import allocation_exists, allocation_manifest, get_allocation, unique
from tests.integration.conftest import LocalCluster, OperatorProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

H200 = next(pool for pool in SCENARIOS["small"].pools if pool.name == "test-h200")


def as_officer(cluster: LocalCluster, officer: str, *args: str, stdin: str | None = None) -> str:
    """kubectl as a program officer (impersonated, with the rights of system:masters)."""
    result = cluster.kubectl("--as", officer, "--as-group", "system:masters", *args, stdin=stdin, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def history(cluster: LocalCluster, allocation: str) -> list[dict[str, Any]]:
    month = month_of(datetime.now(UTC), "Asia/Seoul")
    try:
        record = client.CustomObjectsApi(cluster.api).get_cluster_custom_object(
            GROUP, VERSION, USAGE_PLURAL, usage_name(allocation, month)
        )
    except client.exceptions.ApiException as error:
        if error.status == 404:
            return []
        raise
    entries: list[dict[str, Any]] = (record.get("ledger") or {}).get("history") or []
    return entries


def test_each_change_is_kept_with_who_asked_past_the_deletion(cluster: LocalCluster, operator: OperatorProcess) -> None:
    name = unique("hist")
    manifest = allocation_manifest(name, H200.name, 2, organization="KAIST")
    created = json.loads(
        as_officer(cluster, "officer-kim", "create", "-o", "json", "-f", "-", stdin=json.dumps(manifest))
    )
    # The same webhook admitted it with its release finalizer: the first pass does not have to write it.
    assert RELEASE_FINALIZER in created["metadata"]["finalizers"]
    wait_for(lambda: len(history(cluster, name)) == 1, timeout=30, message="the create in the ledger")

    as_officer(cluster, "officer-lee", "patch", "gpuallocation", name, "--type=merge", "-p", '{"spec":{"gpus":4}}')
    wait_for(lambda: len(history(cluster, name)) == 2, timeout=30, message="the resize in the ledger")
    as_officer(
        cluster, "officer-kim", "patch", "gpuallocation", name, "--type=merge", "-p", '{"spec":{"suspend":true}}'
    )
    wait_for(lambda: len(history(cluster, name)) == 3, timeout=30, message="the suspension in the ledger")

    # A stamp written by hand is undone: only gpuaas writes them.
    forged = json.dumps(
        {"metadata": {"annotations": {RECENT_CHANGES_ANNOTATION: "[]", DELETE_REQUESTED_ANNOTATION: "{}"}}}
    )
    as_officer(cluster, "officer-lee", "patch", "gpuallocation", name, "--type=merge", "-p", forged)
    annotations = get_allocation(cluster, name)["metadata"]["annotations"]
    assert DELETE_REQUESTED_ANNOTATION not in annotations
    assert [stamp["by"] for stamp in json.loads(annotations[RECENT_CHANGES_ANNOTATION])] == [
        "officer-kim",
        "officer-lee",
        "officer-kim",
    ]
    # `kubectl describe` shows the latest change and the recorded ones as events.
    described = cluster.kubectl("describe", "gpuallocation", name).stdout
    assert "officer-kim: suspended" in described, described
    # Each change after the create is a GrantChanged event; the create is marked by the first phase event.
    about = f"involvedObject.name={name}"
    events = client.CoreV1Api(cluster.api).list_namespaced_event("default", field_selector=about)
    grant_changes = sorted(e.message for e in events.items if e.reason == "GrantChanged")
    assert grant_changes == ["officer-kim: suspended", "officer-lee: gpus 2 -> 4"], grant_changes
    assert "Active" in {e.reason for e in events.items}

    as_officer(cluster, "officer-lee", "delete", "gpuallocation", name, "--wait=false")
    wait_for(lambda: not allocation_exists(cluster, name), timeout=60, message="the allocation released")
    entries = history(cluster, name)
    assert [(entry["by"], entry["changes"]) for entry in entries] == [
        ("officer-kim", [entries[0]["changes"][0]]),
        ("officer-lee", ["gpus 2 -> 4"]),
        ("officer-kim", ["suspended"]),
        ("officer-lee", ["deleted"]),
    ]
    assert entries[0]["changes"][0].startswith(f"created: 2 GPUs of pool {H200.name} for {name}")
    times = [entry["at"] for entry in entries]
    assert times == sorted(times)

    # The month's report has the appendix, the deleted allocation's changes included.
    month = month_of(datetime.now(UTC), "Asia/Seoul")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpuaas",
            "report",
            "--month",
            month,
            "--format",
            "json",
            "--kubeconfig",
            str(cluster.kubeconfig),
        ],
        capture_output=True,
        check=True,
        timeout=120,
    )
    lines = [line for line in json.loads(result.stdout)["history"] if line["allocation"] == name]
    assert [(line["by"], line["changes"]) for line in lines[1:]] == [
        ("officer-lee", "gpus 2 -> 4"),
        ("officer-kim", "suspended"),
        ("officer-lee", "deleted"),
    ]
