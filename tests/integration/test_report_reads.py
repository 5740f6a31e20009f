"""How `gpuaas report` reads the ledger from a real API server: its month only, by the month label, and the same
records whichever way the kubeconfig proves who is reading (client certificates, a ServiceAccount token limited to
the ledger, an exec plugin handled by the Kubernetes client)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.usage import USAGE_PLURAL, GpuUsage, GpuUsageSpec, UsageLedger, UsageTenant, usage_name
from tests.integration.conftest import LocalCluster

pytestmark = pytest.mark.integration

MONTH, NEXT_MONTH = "2031-01", "2031-02"  # months no other test books


def record(allocation: str, month: str, used_gpu_seconds: int) -> GpuUsage:
    return GpuUsage(
        name=usage_name(allocation, month),
        spec=GpuUsageSpec(
            allocation=allocation,
            allocation_uid=f"uid-{allocation}",
            tenant=UsageTenant(name=allocation, organization="연구소"),
            pool="test-b200",
            gpu_model="B200",
            provider="nhn",
            month=month,
        ),
        ledger=UsageLedger(
            used_gpu_seconds=used_gpu_seconds,
            granted_gpu_seconds=8 * 86400,
            granted_gpus=8,
            booked_until=datetime(int(month[:4]), int(month[5:]), 2, tzinfo=UTC),
        ),
    )


@pytest.fixture
def two_months(cluster: LocalCluster) -> Iterator[tuple[str, list[GpuUsage]]]:
    """Three allocations with records in MONTH and two of them again in NEXT_MONTH."""
    prefix = f"rr-{uuid.uuid4().hex[:6]}"
    records = [record(f"{prefix}-{index}", MONTH, 3600 * (index + 1)) for index in range(3)]
    records += [record(f"{prefix}-{index}", NEXT_MONTH, 60) for index in range(2)]
    objects = client.CustomObjectsApi(cluster.api)
    for each in records:
        objects.create_cluster_custom_object(GROUP, VERSION, USAGE_PLURAL, each.to_object())
    yield prefix, records
    for each in records:
        objects.delete_cluster_custom_object(GROUP, VERSION, USAGE_PLURAL, each.name)


def report(kubeconfig: Path, month: str, format_name: str = "json") -> bytes:
    result = subprocess.run(
        [sys.executable, "-m", "gpuaas", "report", "--month", month, "--format", format_name],
        capture_output=True,
        timeout=120,
        check=False,
        env={"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin:/bin", "HOME": str(kubeconfig.parent)},
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def rows_of(document: bytes, prefix: str) -> dict[str, dict[str, Any]]:
    rows = json.loads(document)["rows"]
    return {row["allocation"]: row for row in rows if row["allocation"].startswith(prefix)}


def cluster_entry(cluster: LocalCluster) -> tuple[dict[str, Any], dict[str, Any]]:
    """The local cluster's cluster and user entries (paths absolute, as localcluster writes them)."""
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    return config["clusters"][0]["cluster"], config["users"][0]["user"]


def kubeconfig_with(path: Path, cluster_fields: dict[str, Any], user: dict[str, Any]) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "reader",
                "clusters": [{"name": "c", "cluster": cluster_fields}],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "reader", "context": {"cluster": "c", "user": "u"}}],
            }
        )
    )
    return path


@pytest.fixture
def ledger_reader_token(cluster: LocalCluster) -> Iterator[str]:
    """A ServiceAccount token that may list the two ledger kinds and nothing else."""
    name = f"ledger-reader-{uuid.uuid4().hex[:6]}"
    manifest = f"""
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {name}, namespace: default}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: {name}}}
rules:
  - apiGroups: [gpuaas.io]
    resources: [gpuusages, gpupoolusages]
    verbs: [list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: {name}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {name}}}
subjects: [{{kind: ServiceAccount, name: {name}, namespace: default}}]
"""
    cluster.kubectl("apply", "-f", "-", stdin=manifest)
    yield cluster.kubectl("create", "token", "-n", "default", name).stdout.strip()
    cluster.kubectl("delete", "-f", "-", "--ignore-not-found", stdin=manifest)


def test_a_report_reads_its_month_and_the_same_records_through_every_credential(
    cluster: LocalCluster, two_months: tuple[str, list[GpuUsage]], ledger_reader_token: str, tmp_path: Path
) -> None:
    prefix, records = two_months
    rows = rows_of(report(cluster.kubeconfig, MONTH), prefix)
    assert {name: float(row["usedGPUHours"]) for name, row in rows.items()} == {
        each.spec.allocation: each.ledger.used_gpu_seconds / 3600 for each in records if each.spec.month == MONTH
    }
    assert {row["month"] for row in rows.values()} == {MONTH}
    assert set(rows_of(report(cluster.kubeconfig, NEXT_MONTH), prefix)) == {f"{prefix}-0", f"{prefix}-1"}

    certificates = report(cluster.kubeconfig, MONTH, "csv")
    cluster_fields, admin = cluster_entry(cluster)
    # A token: the standard library's reader, with only the right to list the ledger.
    token_config = kubeconfig_with(tmp_path / "token.yaml", cluster_fields, {"token": ledger_reader_token})
    assert report(token_config, MONTH, "csv") == certificates
    # An exec plugin: handed to the Kubernetes client, which runs it for the client certificate.
    ran = tmp_path / "plugin-ran"
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": {
            "clientCertificateData": Path(admin["client-certificate"]).read_text(),
            "clientKeyData": Path(admin["client-key"]).read_text(),
        },
    }
    plugin = f"import json, pathlib; pathlib.Path({str(ran)!r}).touch(); print(json.dumps({credential!r}))"
    exec_config = kubeconfig_with(
        tmp_path / "exec.yaml",
        cluster_fields,
        {
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1",
                "command": sys.executable,
                "args": ["-c", plugin],
                "interactiveMode": "Never",
            }
        },
    )
    assert report(exec_config, MONTH, "csv") == certificates
    assert ran.exists(), "the exec plugin never ran"


def test_a_token_without_the_right_to_list_fails_the_report_with_the_servers_reason(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    cluster_fields, _ = cluster_entry(cluster)
    config = kubeconfig_with(tmp_path / "nobody.yaml", cluster_fields, {"token": "not-a-token"})
    result = subprocess.run(
        [sys.executable, "-m", "gpuaas", "report", "--month", MONTH, "--kubeconfig", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "cannot read the ledger of the cluster" in result.stderr
    assert "401 Unauthorized" in result.stderr
