"""The chart's static checks, which need helm but no cluster: `helm lint --strict` of every ci/*-values.yaml, and the
values schema refusing wrong values (the rendered objects meet a real API server in e2e/test_chart.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from gpuaas.k8s.localcluster import ensure_helm

CHART = Path(__file__).resolve().parents[2] / "helm" / "gpuaas"
CI_FILES = sorted((CHART / "ci").glob("*-values.yaml"))


@pytest.fixture(scope="module")
def helm() -> Path:
    return ensure_helm()


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, check=False)


def test_ci_values_exist() -> None:
    names = {path.name for path in CI_FILES}
    assert {"default-values.yaml", "external-operator-values.yaml", "two-replicas-values.yaml"} <= names


@pytest.mark.parametrize("values", CI_FILES, ids=[path.stem for path in CI_FILES])
def test_helm_lint(helm: Path, values: Path) -> None:
    result = run_helm(helm, "lint", str(CHART), "--strict", "-f", str(values))
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_rejects_wrong_values(helm: Path) -> None:
    result = run_helm(helm, "template", "gpuaas", str(CHART), "--set", "operator.replicas=two", "--set", "unknownKey=1")
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr


def service_monitor_relabelings(helm: Path, *values: str) -> list[dict[str, str]]:
    args = ["template", "gpuaas", str(CHART), "--set", "metrics.serviceMonitor.enabled=true"]
    result = run_helm(helm, *args, *(arg for value in values for arg in ("--set", value)))
    assert result.returncode == 0, result.stderr
    (monitor,) = [doc for doc in yaml.safe_load_all(result.stdout) if doc and doc["kind"] == "ServiceMonitor"]
    relabelings: list[dict[str, str]] = monitor["spec"]["endpoints"][0].get("relabelings", [])
    return relabelings


def test_the_cluster_name_labels_every_scraped_series(helm: Path) -> None:
    assert service_monitor_relabelings(helm) == []
    assert service_monitor_relabelings(helm, "clusterName=nhn") == [{"targetLabel": "cluster", "replacement": "nhn"}]
    # The provider's own relabelings come after it.
    assert service_monitor_relabelings(
        helm, "clusterName=nhn", "metrics.serviceMonitor.relabelings[0].targetLabel=region"
    ) == [{"targetLabel": "cluster", "replacement": "nhn"}, {"targetLabel": "region"}]


def report_args(helm: Path, *values: str) -> list[str]:
    args = ["template", "gpuaas", str(CHART), "--set", "report.enabled=true"]
    result = run_helm(helm, *args, *(arg for value in values for arg in ("--set", value)))
    assert result.returncode == 0, result.stderr
    (job,) = [doc for doc in yaml.safe_load_all(result.stdout) if doc and doc["kind"] == "CronJob"]
    container = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    arguments: list[str] = container["args"]
    return arguments


def test_the_report_job_asks_prometheus_for_busy_hours_only_when_given_one(helm: Path) -> None:
    assert not any(arg.startswith("--prometheus") for arg in report_args(helm))
    url = "http://prometheus.monitoring:9090"
    assert f"--prometheus={url}" in report_args(helm, f"report.prometheusURL={url}")
    refused = run_helm(helm, "template", "gpuaas", str(CHART), "--set", "report.prometheusURL=prometheus:9090")
    assert refused.returncode != 0
    assert "prometheusURL" in refused.stderr
