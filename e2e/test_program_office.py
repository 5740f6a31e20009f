"""A full grant, use and report cycle, done as a program office and a tenant do it: kubectl, helm, gpuaas report.

The tests run in file order and build on each other (one cluster, one release, one operator per session):
install -> pools -> grants -> a tenant's GPU pod -> metrics -> report -> helm upgrade -> queue -> helm uninstall.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from e2e.conftest import (
    MANIFESTS,
    RELEASE,
    RELEASE_NAMESPACE,
    E2ECluster,
    E2EOperator,
    Release,
    render_manifest,
    seoul_month,
    wait_for,
    wait_for_steady,
)
from gpuaas.reporting.formats import csv_cell_text

pytestmark = pytest.mark.e2e

ALLOCATIONS = ("kaist-vision-2026", "fm-team-a-2026", "seoul-llm-q4")
POOL_NUMBERS = ("CAPACITY", "PROGRAM", "GRANTED", "AVAILABLE", "QUEUED")
CRDS = ("gpupools.gpuaas.io", "gpuallocations.gpuaas.io", "gpuusages.gpuaas.io", "gpupoolusages.gpuaas.io")


def rows_by_name(cluster: E2ECluster, *resources: str) -> dict[str, dict[str, dict[str, str]]]:
    tables = cluster.get_table(",".join(resources))
    return {kind: {row["NAME"]: row for row in rows} for kind, rows in tables.items()}


def pools_table(cluster: E2ECluster) -> dict[str, dict[str, str]]:
    return {row["NAME"]: row for row in cluster.get_table("gpupools").get("default", [])}


def pool_numbers(cluster: E2ECluster, columns: tuple[str, ...] = POOL_NUMBERS) -> dict[str, tuple[str, ...]]:
    return {name: tuple(row[column] for column in columns) for name, row in pools_table(cluster).items()}


def allocations_table(cluster: E2ECluster) -> dict[str, dict[str, str]]:
    return {row["NAME"]: row for row in cluster.get_table("gpuallocations").get("default", [])}


def test_helm_install_provides_crds_rbac_and_pools(cluster: E2ECluster, release: Release) -> None:
    status = cluster.helm("status", RELEASE, "-n", RELEASE_NAMESPACE, "-o", "json").stdout
    assert '"status":"deployed"' in status.replace(" ", "")
    for crd in CRDS:
        annotations = cluster.get_json("crd", crd)["metadata"].get("annotations", {})
        assert annotations.get("helm.sh/resource-policy") == "keep", crd
    # External-operator mode: no Deployment, and no chart-rendered webhook configuration.
    assert cluster.kubectl("get", "deployments", "-n", RELEASE_NAMESPACE, "-o", "name").stdout.strip() == ""
    manifest = cluster.helm("get", "manifest", RELEASE, "-n", RELEASE_NAMESPACE).stdout
    assert "WebhookConfiguration" not in manifest
    for role in ("gpuaas-operator", "gpuaas-editor", "gpuaas-viewer"):
        cluster.kubectl("get", "clusterrole", role)
    # The pools come from values (post-install hooks), matching the small scenario's nodes.
    pools = {item["metadata"]["name"]: item["spec"] for item in cluster.get_json("gpupools")["items"]}
    assert pools["test-b200"]["gpuModel"] == "B200"
    assert pools["test-h200"]["nodeSelector"] == {
        "gpuaas.io/pool": "test-h200",
        "nvidia.com/gpu.product": "NVIDIA-H200",
    }


def test_pools_report_their_nodes(cluster: E2ECluster, operator: E2EOperator) -> None:
    def ready() -> dict[str, dict[str, str]] | None:
        table = pools_table(cluster)
        return table if table.get("test-b200", {}).get("CAPACITY") == "32" else None

    pools = wait_for(ready, message="pool status from the operator")
    pools = wait_for(
        lambda: (t := pools_table(cluster)) and t["test-h200"].get("CAPACITY") == "24" and t,
        message="test-h200 capacity",
    )
    b200, h200 = pools["test-b200"], pools["test-h200"]
    assert (b200["MODEL"], b200["PROVIDER"], b200["NODES"], b200["READY"]) == ("B200", "nhn", "4", "4")
    assert (b200["PROGRAM"], b200["GRANTED"], b200["AVAILABLE"]) == ("32", "0", "32")
    assert (h200["MODEL"], h200["PROVIDER"], h200["NODES"], h200["READY"]) == ("H200", "naver", "3", "3")
    assert (h200["PROGRAM"], h200["AVAILABLE"]) == ("24", "24")


def test_program_office_grants_gpus(cluster: E2ECluster, operator: E2EOperator) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    text = render_manifest(
        "allocations.yaml",
        WINDOW_START=(now - dt.timedelta(hours=1)).isoformat().replace("+00:00", "Z"),
        WINDOW_END=(now + dt.timedelta(days=30)).isoformat().replace("+00:00", "Z"),
    )
    applied = cluster.kubectl("apply", "-f", "-", stdin=text).stdout
    for name in ALLOCATIONS:
        assert f"gpuallocation.gpuaas.io/{name} created" in applied

    def settled() -> dict[str, dict[str, str]] | None:
        table = allocations_table(cluster)
        phases = {name: table.get(name, {}).get("PHASE") for name in ALLOCATIONS}
        expected = {"kaist-vision-2026": "Active", "fm-team-a-2026": "Active", "seoul-llm-q4": "Queued"}
        return table if phases == expected else None

    allocations = wait_for(settled, timeout=90, message="two Active grants and one Queued")
    # Two whole B200 nodes are reserved (labelled and tainted) for the exclusive grant; they stay in the pool's
    # capacity, held by that grant.
    exclusive = wait_for(
        lambda: cluster.get_json("gpuallocation", "fm-team-a-2026")["status"].get("nodes"),
        message="exclusive nodes of fm-team-a-2026",
    )
    assert len(exclusive) == 2
    assert all(node.startswith("test-b200-") for node in exclusive)
    reserved = cluster.kubectl("get", "nodes", "-l", "gpuaas.io/allocation=fm-team-a-2026", "-o", "name").stdout.split()
    assert sorted(reserved) == sorted(f"node/{node}" for node in exclusive)
    wait_for(
        lambda: all(
            any(t["key"] == "gpuaas.io/allocation" for t in cluster.get_json("node", node)["spec"].get("taints", []))
            for node in exclusive
        ),
        message="the reserved nodes tainted for fm-team-a-2026",
    )
    # CAPACITY, PROGRAM, GRANTED, AVAILABLE, QUEUED
    expected_pools = {"test-b200": ("32", "32", "16", "16", "1"), "test-h200": ("24", "24", "16", "8", "0")}
    kaist = allocations["kaist-vision-2026"]
    assert (kaist["TENANT"], kaist["POOL"], kaist["GPUS"]) == ("kaist-vision", "test-h200", "16")
    assert allocations["fm-team-a-2026"]["GPUS"] == "16"
    assert allocations["seoul-llm-q4"]["QUEUE"] == "1"
    wait_for_steady(lambda: pool_numbers(cluster), expected_pools, message=f"pool totals {expected_pools}")
    # The grant is a fenced tenant namespace with a GPU quota.
    quota = cluster.get_json("resourcequotas", "-n", "kaist-vision")["items"][0]["spec"]["hard"]
    assert quota["requests.nvidia.com/gpu"] == "16"
    wide = cluster.kubectl("get", "gpuallocations", "-o", "wide").stdout
    assert "Foundation Model Consortium A" in wide


def test_tenant_runs_a_gpu_pod_on_its_pool(cluster: E2ECluster, operator: E2EOperator) -> None:
    # alice is an owner of kaist-vision: the admin role in its namespace, nothing outside it.
    tenant = ("--as", "alice", "-n", "kaist-vision")
    assert cluster.kubectl("auth", "can-i", "create", "pods", *tenant).stdout.strip() == "yes"
    assert cluster.kubectl("auth", "can-i", "patch", "resourcequotas", *tenant, check=False).stdout.strip() == "no"
    cluster.kubectl("apply", *tenant, "-f", str(MANIFESTS / "training-pod.yaml"))

    def running() -> dict[str, str] | None:
        rows = cluster.get_table(
            "pod",
            "vit-pretrain-0",
            *tenant,
            "-o",
            "custom-columns=NAME:.metadata.name,STATUS:.status.phase,NODE:.spec.nodeName",
        ).get("default", [])
        return rows[0] if rows and rows[0]["STATUS"] == "Running" else None

    pod = wait_for(running, timeout=90, message="the tenant's pod Running")
    assert pod["NODE"].startswith("test-h200-"), pod
    spec = cluster.get_json("pod", "vit-pretrain-0", *tenant)
    assert spec["spec"]["nodeSelector"]["gpuaas.io/pool"] == "test-h200"
    assert "gpuaas.io/usage-ledger" in spec["metadata"].get("finalizers", [])
    # Leaving the pool is refused at admission.
    escape = cluster.kubectl("apply", *tenant, "-f", str(MANIFESTS / "escape-pod.yaml"), check=False)
    assert escape.returncode != 0
    assert "denied the request" in escape.stderr, escape.stderr
    wait_for(
        lambda: allocations_table(cluster)["kaist-vision-2026"]["IN-USE"] == "8",
        message="8 GPUs in use on the allocation",
    )
    wait_for(lambda: pools_table(cluster)["test-h200"]["IN-USE"] == "8", message="8 GPUs in use on test-h200")
    print("\n$ kubectl get gpuallocations,gpupools\n" + cluster.kubectl("get", "gpuallocations,gpupools").stdout)


def _metric(text: str, name: str, allocation: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'allocation="{allocation}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_operator_metrics(operator: E2EOperator) -> None:
    text = wait_for(
        lambda: (
            (t := operator.metrics()) and _metric(t, "gpuaas_allocation_in_use_gpus", "kaist-vision-2026") == 8 and t
        ),
        message="allocation metrics",
    )
    assert _metric(text, "gpuaas_allocation_granted_gpus", "kaist-vision-2026") == 16
    assert _metric(text, "gpuaas_allocation_granted_gpus", "fm-team-a-2026") == 16
    line = next(ln for ln in text.splitlines() if ln.startswith('gpuaas_allocation_granted_gpus{allocation="kaist'))
    for label in ('tenant="kaist-vision"', 'pool="test-h200"', 'gpu_model="H200"'):
        assert label in line, line
    capacity = re.findall(r'^gpuaas_pool_capacity_gpus\{[^}]*pool="test-b200"[^}]*\} (\S+)$', text, re.MULTILINE)
    assert capacity == ["32.0"], f"test-b200 capacity with two nodes reserved for fm-team-a-2026: {capacity}"


def test_monthly_report(cluster: E2ECluster, operator: E2EOperator, tmp_path: Path) -> None:
    month = seoul_month()
    # The ledger has booked some of the pod's GPU-seconds.
    wait_for(
        lambda: (
            (cluster.get_json("gpuusage", f"kaist-vision-2026-{month}", "--ignore-not-found") or {})
            .get("ledger", {})
            .get("usedGPUSeconds", 0)
            > 0
        ),
        timeout=90,
        message="used GPU-seconds booked in the ledger",
    )
    # Each allocation's record is first written at its own first flush (within the flush interval).
    wait_for(
        lambda: (
            {row["ALLOCATION"] for row in cluster.get_table("gpuusages").get("default", [])}
            >= {"kaist-vision-2026", "fm-team-a-2026"}
        ),
        timeout=90,
        message="ledger records of both granted allocations",
    )
    out = tmp_path / "reports"
    out.mkdir()
    result = subprocess.run(
        [
            sys.executable, "-m", "gpuaas", "report",
            "--month", month, "--format", "csv", "--out", str(out),
            "--kubeconfig", str(cluster.kubeconfig),
        ],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    files = sorted(out.glob("*.csv"))
    assert len(files) == 1, files
    data = files[0].read_bytes()
    assert data.startswith(b"\xef\xbb\xbf"), "CSV for Excel: UTF-8 with BOM"
    rows = [[csv_cell_text(field) for field in row] for row in csv.reader(io.StringIO(data.decode("utf-8-sig")))]
    header = rows[0]
    records = [dict(zip(header, row, strict=False)) for row in rows[1:] if row and row[0] == month]
    by_allocation = {record["Allocation"]: record for record in records}
    kaist = by_allocation["kaist-vision-2026"]
    assert kaist["Organization"] == "KAIST 시각지능연구실 (Visual Intelligence Lab)"
    assert (kaist["Pool"], kaist["GPU model"], kaist["Granted GPUs"]) == ("test-h200", "H200", "16")
    assert float(kaist["Used GPU-hours"]) > 0
    assert float(kaist["Granted GPU-hours"]) > 0
    assert "fm-team-a-2026" in by_allocation

    # The report finds a month's records by their month label: the chart's admission policy refuses to change it,
    # even for a cluster admin, and leaves other labels alone.
    record = f"kaist-vision-2026-{month}"
    moved = cluster.kubectl("label", "gpuusage", record, "gpuaas.io/month=1999-01", "--overwrite", check=False)
    assert moved.returncode != 0
    assert f"label gpuaas.io/month must be {month}" in moved.stderr
    removed = cluster.kubectl("label", "gpuusage", record, "gpuaas.io/pool-", check=False)
    assert "label gpuaas.io/pool must be test-h200" in removed.stderr
    cluster.kubectl("label", "gpuusage", record, "backup.example/keep=true")
    labels = cluster.get_json("gpuusage", record)["metadata"]["labels"]
    assert (labels["gpuaas.io/month"], labels["gpuaas.io/pool"], labels["backup.example/keep"]) == (
        month,
        "test-h200",
        "true",
    )


def test_helm_upgrade_changes_a_pool(cluster: E2ECluster, operator: E2EOperator, release: Release) -> None:
    release.upgrade(MANIFESTS / "pools-upgrade-values.yaml")
    revision = cluster.helm("history", RELEASE, "-n", RELEASE_NAMESPACE, "-o", "json").stdout
    assert '"revision":2' in revision.replace(" ", "")
    assert cluster.get_json("gpupool", "test-h200")["spec"]["programGPUs"] == 16
    pools = wait_for(
        lambda: (t := pools_table(cluster)) and t["test-h200"]["PROGRAM"] == "16" and t,
        message="test-h200 status.programGPUs following the values",
    )
    assert (pools["test-h200"]["GRANTED"], pools["test-h200"]["AVAILABLE"]) == ("16", "0")
    assert allocations_table(cluster)["kaist-vision-2026"]["PHASE"] == "Active"


def test_queue_advances_when_a_grant_ends(cluster: E2ECluster, operator: E2EOperator) -> None:
    month = seoul_month()
    cluster.kubectl("delete", "gpuallocation", "fm-team-a-2026", "--wait=true", "--timeout=90s")
    table = wait_for(
        lambda: (t := allocations_table(cluster)) and t["seoul-llm-q4"]["PHASE"] == "Active" and t,
        timeout=90,
        message="the queued allocation admitted",
    )
    assert "fm-team-a-2026" not in table
    pools = wait_for(
        lambda: (t := pools_table(cluster)) and t["test-b200"]["QUEUED"] == "0" and t,
        message="test-b200 queue empty",
    )
    assert (pools["test-b200"]["GRANTED"], pools["test-b200"]["AVAILABLE"]) == ("24", "8")
    # Retain: the namespace stays; the ledger record outlives the allocation.
    cluster.kubectl("get", "namespace", "fm-team-a-train")
    cluster.kubectl("get", "gpuusage", f"fm-team-a-2026-{month}")


def test_helm_uninstall_keeps_crds_allocations_and_ledger(cluster: E2ECluster, release: Release) -> None:
    before = cluster.get_table("gpuallocations,gpupools,gpuusages")
    print(
        "\n$ kubectl get gpuallocations,gpupools,gpuusages\n"
        + cluster.kubectl("get", "gpuallocations,gpupools,gpuusages").stdout
    )
    release.uninstall()
    assert cluster.helm("status", RELEASE, "-n", RELEASE_NAMESPACE, check=False).returncode != 0
    for crd in CRDS:
        cluster.kubectl("get", "crd", crd)
    after = cluster.get_table("gpuallocations,gpupools,gpuusages")
    for kind in ("gpuallocation", "gpupool", "gpuusage"):
        names_before = {row["NAME"] for row in before[kind]}
        names_after = {row["NAME"] for row in after[kind]}
        assert names_before, kind
        assert names_after == names_before, kind
    # Only the release's own objects went.
    assert cluster.kubectl("get", "clusterrole", "gpuaas-operator", check=False).returncode != 0
