"""One report across three providers' clusters: three local control planes, each with its own gpuaas, in one run.

Each cluster books a real GPU pod through its own operator; the allocations are then deleted, so every ledger is
final and the merged report can be compared with its parts and with itself on a re-run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.usage import USAGE_PLURAL, usage_name
from gpuaas.domain.ledger import month_of, seconds_to_hours
from gpuaas.domain.scenarios import Scenario, ScenarioPool
from gpuaas.k8s.localcluster import merged_kubeconfig
from tests.integration.allocations import (
    allocation_manifest,
    create_allocation,
    delete_allocation,
    gpu_pod,
    pod_phase,
    wait_for_ready,
)
from tests.integration.conftest import (
    CLUSTER_NAME,
    LocalCluster,
    OperatorProcess,
    free_port,
    start_cluster,
    stop_cluster,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

# Two clusters have a pool of the same name, as providers name pools independently.
PROVIDERS = {
    "nhn": ScenarioPool("b200-a", "B200", "nhn", 2),
    "kakao": ScenarioPool("b200-a", "B200", "kakao", 2),
    "naver": ScenarioPool("h200-a", "H200", "naver", 1),
}
GPUS = {"nhn": 8, "kakao": 4, "naver": 2}


def cluster_name(provider: str) -> str:
    return f"{CLUSTER_NAME}-{provider}"


def program_kubeconfig_file(clusters: dict[str, LocalCluster], path: Path, unreachable: str | None = None) -> Path:
    """One kubeconfig with a context per provider, named after it (and, if asked, one whose server is down)."""
    merged = merged_kubeconfig({provider: cluster.kubeconfig for provider, cluster in clusters.items()})
    if unreachable:
        first = merged["contexts"][0]["context"]
        server = {"server": f"https://127.0.0.1:{free_port()}", "insecure-skip-tls-verify": True}
        merged["clusters"].append({"name": unreachable, "cluster": server})
        merged["contexts"].append({"name": unreachable, "context": {"cluster": unreachable, "user": first["user"]}})
    path.write_text(yaml.safe_dump(merged))
    return path


@pytest.fixture(scope="module")
def provider_clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LocalCluster]]:
    logs = tmp_path_factory.mktemp("providers")
    clusters: dict[str, LocalCluster] = {}
    operators: list[OperatorProcess] = []
    try:
        # One after another: kwokctl clusters created at once can mix up their certificates.
        for provider, pool in PROVIDERS.items():
            clusters[provider] = start_cluster(cluster_name(provider), Scenario(provider, provider, (pool,)))
        for provider, cluster in clusters.items():
            operator = OperatorProcess(cluster.kubeconfig, logs / provider / "operator.log")
            operator.log_path.parent.mkdir()
            operator.start()
            operators.append(operator)
        book_one_pod_each(clusters)
        for operator in operators:
            operator.stop()  # every ledger is final: nothing may change between the reports below
        yield clusters
    finally:
        for operator in operators:
            operator.stop()
        for cluster in clusters.values():
            cluster.api.close()
        for provider in PROVIDERS:  # a cluster that failed to start is removed too
            stop_cluster(cluster_name(provider))


def book_one_pod_each(clusters: dict[str, LocalCluster]) -> None:
    """An allocation and a GPU pod that runs a few seconds in each cluster, then the allocation is deleted."""
    for provider, cluster in clusters.items():
        create_allocation(cluster, allocation_manifest(f"lab-{provider}", PROVIDERS[provider].name, GPUS[provider]))
    for provider, cluster in clusters.items():
        wait_for_ready(cluster, f"lab-{provider}", timeout=60)
        client.CoreV1Api(cluster.api).create_namespaced_pod(
            f"lab-{provider}", gpu_pod("train", f"lab-{provider}", GPUS[provider])
        )
    for provider, cluster in clusters.items():
        wait_for(lambda c=cluster, p=provider: pod_phase(c, "train", f"lab-{p}") == "Running", timeout=60)
    time.sleep(2)  # GPU-seconds to book
    for provider, cluster in clusters.items():
        client.CoreV1Api(cluster.api).delete_namespaced_pod("train", f"lab-{provider}")
    for provider, cluster in clusters.items():
        wait_for(lambda c=cluster, p=provider: pod_phase(c, "train", f"lab-{p}") is None, timeout=60)
        delete_allocation(cluster, f"lab-{provider}", timeout=90)


def used_seconds(cluster: LocalCluster, provider: str, month: str) -> int:
    record = client.CustomObjectsApi(cluster.api).get_cluster_custom_object(
        GROUP, VERSION, USAGE_PLURAL, usage_name(f"lab-{provider}", month)
    )
    seconds: int = record["ledger"]["usedGPUSeconds"]
    return seconds


def report(*args: str, month: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "gpuaas", "report", "--month", month, *args], capture_output=True, check=False
    )


def report_json(*args: str, month: str) -> dict[str, Any]:
    result = report(*args, "--format", "json", month=month)
    assert result.returncode == 0, result.stderr.decode()
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def program_total(document: dict[str, Any]) -> dict[str, Any]:
    (total,) = [t for t in document["totals"] if t["scope"] == "all"]
    return total


def this_month() -> str:
    return month_of(datetime.now(UTC), "Asia/Seoul")


@pytest.fixture
def program_kubeconfig(provider_clusters: dict[str, LocalCluster], tmp_path: Path) -> str:
    return str(program_kubeconfig_file(provider_clusters, tmp_path / "program.kubeconfig"))


ALL_CONTEXTS = [arg for provider in PROVIDERS for arg in ("--context", provider)]


def test_one_report_across_three_providers_is_the_sum_of_its_parts(
    provider_clusters: dict[str, LocalCluster], program_kubeconfig: str
) -> None:
    month, kubeconfig = this_month(), program_kubeconfig
    merged = report_json("--kubeconfig", kubeconfig, *ALL_CONTEXTS, month=month)

    assert merged["clusters"] == sorted(PROVIDERS)
    booked = {provider: used_seconds(cluster, provider, month) for provider, cluster in provider_clusters.items()}
    assert all(seconds >= 2 * GPUS[provider] for provider, seconds in booked.items()), booked
    for provider in PROVIDERS:
        alone = report_json("--kubeconfig", kubeconfig, "--context", provider, month=month)
        (row,) = [row for row in merged["rows"] if row["cluster"] == provider]
        assert row["allocation"] == f"lab-{provider}"
        assert row["provider"] == provider
        assert row | {"cluster": None} == alone["rows"][0] | {"cluster": None}
        (cluster_total,) = [t for t in merged["totals"] if t["scope"] == "cluster" and t["key"] == provider]
        assert cluster_total | {"scope": "all", "key": ""} == program_total(alone)
        assert row["usedGPUHours"] == float(seconds_to_hours(booked[provider]))
    # The program's used hours are its exact seconds, summed before the one rounding.
    assert program_total(merged)["usedGPUHours"] == float(seconds_to_hours(sum(booked.values())))
    pools = {t["key"] for t in merged["totals"] if t["scope"] == "pool"}
    assert pools == {"kakao/b200-a", "naver/h200-a", "nhn/b200-a"}


def test_the_merged_report_is_byte_identical_on_a_rerun(
    provider_clusters: dict[str, LocalCluster], program_kubeconfig: str
) -> None:
    month, kubeconfig, contexts = this_month(), program_kubeconfig, ALL_CONTEXTS
    for format_name in ("csv", "json", "xlsx", "html"):
        first, second = (
            report("--kubeconfig", kubeconfig, *contexts, "--format", format_name, month=month) for _ in range(2)
        )
        assert first.returncode == second.returncode == 0, first.stderr.decode()
        assert first.stdout == second.stdout, format_name
    # Several kubeconfigs, each at its current context, make the same report under the contexts' names.
    by_files = report_json(
        *(arg for c in provider_clusters.values() for arg in ("--kubeconfig", str(c.kubeconfig))), month=month
    )
    assert by_files["clusters"] == sorted(f"kwok-{cluster_name(provider)}" for provider in PROVIDERS)
    assert program_total(by_files) == program_total(report_json("--kubeconfig", kubeconfig, *contexts, month=month))


def test_a_cluster_that_cannot_be_read_fails_the_report(
    provider_clusters: dict[str, LocalCluster], tmp_path: Path
) -> None:
    month = this_month()
    kubeconfig = str(program_kubeconfig_file(provider_clusters, tmp_path / "program.kubeconfig", unreachable="down"))
    contexts = [*ALL_CONTEXTS, "--context", "down"]
    out = tmp_path / "out"
    result = report("--kubeconfig", kubeconfig, *contexts, "--out", f"{out}/", month=month)
    assert result.returncode == 1
    message = result.stderr.decode()
    assert "cannot read the ledger of cluster 'down' (context down" in message, message
    assert "no report was written" in message
    assert not out.exists() or not any(out.iterdir())
