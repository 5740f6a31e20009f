"""Every panel of every Grafana dashboard returns data from a real Prometheus scraping a real gpuaas.

Prometheus is the Debian package's binary (tests/integration/prometheus.py): no systemd service is involved.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from gpuaas.api.common import GROUP, VERSION
from gpuaas.domain.scenarios import SCENARIOS
from tests.dashboards import dashboards, panel_queries, template_variables
from tests.integration.allocations import allocation_manifest, delete_allocation, gpu_pod, wait_for_ready
from tests.integration.conftest import LocalCluster, OperatorProcess
from tests.integration.prometheus import Prometheus, running_prometheus
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
H200 = next(pool for pool in SCENARIOS["small"].pools if pool.name == "test-h200")
ORGANIZATION = "서울대학교 AI연구원"
CLUSTER = "nhn"  # the cluster name the scrape adds, as the chart's ServiceMonitor does with clusterName set

GRAFANA_DURATIONS = {
    "__rate_interval": "30s",
    "__interval": "5s",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
    "__interval_ms": "5000",
}
"""What Grafana's built-in variables stand for in the test (Prometheus scrapes every second)."""

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*(\w+)\s*\)\s*$", re.DOTALL)


# --- Prometheus ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(operator: OperatorProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    scrape = {
        "job_name": "gpuaas",
        # What the chart's ServiceMonitor adds with clusterName set.
        "static_configs": [{"targets": [f"127.0.0.1:{operator.metrics_port}"], "labels": {"cluster": CLUSTER}}],
    }
    with running_prometheus(tmp_path_factory.mktemp("prometheus"), [scrape]) as server:
        wait_for(lambda: server.values('up{job="gpuaas"}') == [1.0], timeout=30, message="gpuaas target up")
        yield server


# --- The allocation and its pod ------------------------------------------------------------------


@pytest.fixture(scope="module")
def busy_allocation(cluster: LocalCluster, operator: OperatorProcess) -> Iterator[str]:
    """An Active allocation of 8 H200 GPUs with an 8-GPU pod running, so the in-use series are not zero."""
    name = f"prom-{uuid.uuid4().hex[:6]}"
    client.CustomObjectsApi(cluster.api).create_cluster_custom_object(
        GROUP, VERSION, "gpuallocations", allocation_manifest(name, H200.name, 8, organization=ORGANIZATION)
    )
    try:
        assert wait_for_ready(cluster, name, timeout=60)["phase"] == "Active"
        core = client.CoreV1Api(cluster.api)
        core.create_namespaced_pod(name, gpu_pod("train-0", name, 8))
        wait_for(
            lambda: core.read_namespaced_pod("train-0", name).status.phase == "Running",
            timeout=60,
            message="GPU pod Running",
        )
        yield name
    finally:
        delete_allocation(cluster, name, timeout=90)


# --- The dashboards ------------------------------------------------------------------------------


def substitute(expr: str, variables: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in GRAFANA_DURATIONS:
            return GRAFANA_DURATIONS[name]
        if name in variables:
            return variables[name]
        raise AssertionError(f"unknown template variable ${name} in {expr!r}")

    return _VARIABLE.sub(replace, expr)


def run_queries(server: Prometheus, variables: dict[str, str]) -> tuple[int, list[str]]:
    """Run every panel query; return how many ran and a description of each failure."""
    failures: list[str] = []
    count = 0
    for file_name, board in dashboards().items():
        for where, expr in panel_queries(board):
            count += 1
            query = substitute(expr, variables)
            body = server.query(query)
            if body.get("status") != "success":
                failures.append(f"{file_name} {where}: {body.get('errorType')}: {body.get('error')}\n    {query}")
            elif not body["data"]["result"]:
                failures.append(f"{file_name} {where}: no data\n    {query}")
    return count, failures


def wait_for_scrapes(server: Prometheus, allocation: str) -> None:
    """Enough samples of the allocation's series that rate() and increase() over 30s have two points."""
    wait_for(
        lambda: server.values(f'gpuaas_allocation_in_use_gpus{{allocation="{allocation}"}}') == [8.0],
        timeout=60,
        message="Prometheus sees the allocation's 8 GPUs in use",
    )
    samples = f'count_over_time(gpuaas_allocation_used_gpu_seconds_total{{allocation="{allocation}"}}[30s])'
    wait_for(
        lambda: (v := server.values(samples)) and v[0] >= 5,
        timeout=60,
        message="five scrapes of the allocation's counters",
    )
    time.sleep(2)


# --- Tests ---------------------------------------------------------------------------------------


def test_every_panel_query_returns_data(prometheus: Prometheus, busy_allocation: str) -> None:
    wait_for_scrapes(prometheus, busy_allocation)
    # As Grafana sends them with "All" selected ...
    count, failures = run_queries(prometheus, {"cluster": ".*", "provider": ".*", "pool": ".*", "tenant": ".*"})
    assert count >= 30
    assert not failures, "panel queries failed:\n" + "\n".join(failures)
    # ... and with one provider, pool and tenant (a Korean organisation) picked.
    picked = {"cluster": CLUSTER, "provider": H200.provider, "pool": H200.name, "tenant": busy_allocation}
    _, failures = run_queries(prometheus, picked)
    assert not failures, "panel queries failed for one tenant:\n" + "\n".join(failures)


def test_in_use_and_phase_series_describe_the_allocation(prometheus: Prometheus, busy_allocation: str) -> None:
    wait_for_scrapes(prometheus, busy_allocation)
    pool = f'pool="{H200.name}"'
    assert prometheus.values(f"gpuaas_pool_in_use_gpus{{{pool}}}")[0] >= 8
    assert prometheus.values(f"gpuaas_pool_granted_gpus{{{pool}}}")[0] >= 8
    body = prometheus.query(f'gpuaas_allocation_phase{{allocation="{busy_allocation}"}} == 1')
    (series,) = body["data"]["result"]
    assert series["metric"]["phase"] == "Active"
    assert series["metric"]["organization"] == ORGANIZATION
    assert series["metric"]["gpu_model"] == "H200"


def test_template_variable_queries_find_values(prometheus: Prometheus, busy_allocation: str) -> None:
    wait_for_scrapes(prometheus, busy_allocation)
    for file_name, board in dashboards().items():
        for name, variable in template_variables(board).items():
            if variable["type"] != "query":
                continue
            definition = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = _LABEL_VALUES.match(definition)
            assert match, (file_name, name, definition)
            selector = substitute(match.group(1), {"cluster": ".*", "provider": ".*", "pool": ".*", "tenant": ".*"})
            body = prometheus.get(f"/api/v1/label/{match.group(2)}/values", **{"match[]": selector})
            assert body["status"] == "success", (file_name, name, body)
            assert body["data"], f"{file_name}: variable {name} has no values ({definition})"
            if name == "tenant":
                assert busy_allocation in body["data"]
            if name == "pool":
                assert H200.name in body["data"]
            if name == "cluster":
                assert body["data"] == [CLUSTER]
