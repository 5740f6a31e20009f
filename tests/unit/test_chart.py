"""The chart's static checks, which need helm but no cluster: `helm lint --strict` of every ci/*-values.yaml, and the
values schema refusing wrong values (the rendered objects meet a real API server in e2e/test_chart.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from gpuaas.k8s.localcluster import ensure_helm
from gpuaas.k8s.webhooks import desired_configurations

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


def hooks_by_path(configurations: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each webhook of the configurations, by the path it calls (the chart and the local ones name them apart)."""
    hooks = {}
    for configuration in configurations:
        for hook in configuration.get("webhooks", []):
            client_config = hook["clientConfig"]
            path = (
                client_config["service"]["path"] if "service" in client_config else urlparse(client_config["url"]).path
            )
            hooks[path] = hook
    return hooks


def test_the_local_webhooks_match_the_charts_where_the_operator_writes(helm: Path) -> None:
    """Outside the cluster the operator registers its own webhooks: the same rules, and the same exemptions on the
    guards its own writes go through (each skipped call is a round trip less per managed object it writes)."""
    result = run_helm(
        helm, "template", "gpuaas", str(CHART), "-n", "gpuaas-system", "--show-only", "templates/webhook.yaml"
    )
    assert result.returncode == 0, result.stderr
    chart = hooks_by_path([doc for doc in yaml.safe_load_all(result.stdout) if doc])
    operator = "system:serviceaccount:gpuaas-system:gpuaas"
    local = hooks_by_path(list(desired_configurations("https://127.0.0.1:9443", b"ca", operator)))
    assert set(local) == set(chart)
    for path, hook in chart.items():
        for key in ("rules", "namespaceSelector", "failurePolicy", "sideEffects"):
            assert local[path].get(key) == hook.get(key), (path, key)
    for path in ("/validate-managed", "/validate-network"):
        assert local[path]["matchConditions"] == chart[path]["matchConditions"], path
    # The pod and claim guards still see the local operator's user: outside the cluster it is often the admin
    # whose pods the tests create.
    assert "matchConditions" not in local["/validate-pods"]
    assert "matchConditions" not in local["/validate-claims"]
