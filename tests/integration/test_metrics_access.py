"""/metrics names every tenant's organisation and usage: only subjects the API server allows may read it."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from kubernetes import client

from gpuaas.domain.scenarios import SCENARIOS
from tests.integration.allocations import allocation, allocation_manifest, unique, wait_for_ready
from tests.integration.conftest import LocalCluster, OperatorProcess

pytestmark = pytest.mark.integration
H200 = SCENARIOS["small"].pools[1]
READER_ROLE = "test-gpuaas-metrics-reader"


def scrape(operator: OperatorProcess, token: str | None, path: str = "/metrics") -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{operator.metrics_port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def service_account_token(cluster: LocalCluster, namespace: str, name: str) -> str:
    core = client.CoreV1Api(cluster.api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
    request = core.create_namespaced_service_account_token(name, namespace, {"spec": {"expirationSeconds": 600}})
    return str(request.status.token)


@pytest.fixture
def guarded_operator(operator: OperatorProcess) -> Iterator[OperatorProcess]:
    """The shared operator, restarted with --metrics-auth as the chart runs it, and back without it afterwards."""
    with operator.restarted_with("--metrics-auth") as guarded:
        yield guarded


def test_only_subjects_allowed_to_get_metrics_can_read_them(
    cluster: LocalCluster, guarded_operator: OperatorProcess
) -> None:
    rbac = client.RbacAuthorizationV1Api(cluster.api)
    tenant = unique("scraped")
    with allocation(cluster, allocation_manifest(tenant, H200.name, 8, organization="Secret Lab")):
        wait_for_ready(cluster, tenant)
        reader_namespace = unique("monitoring")
        client.CoreV1Api(cluster.api).create_namespace({"metadata": {"name": reader_namespace}})
        try:
            rbac.create_cluster_role(
                {"metadata": {"name": READER_ROLE}, "rules": [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]}
            )
            rbac.create_cluster_role_binding(
                {
                    "metadata": {"name": READER_ROLE},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": READER_ROLE},
                    "subjects": [{"kind": "ServiceAccount", "name": "prometheus", "namespace": reader_namespace}],
                }
            )
            prometheus = service_account_token(cluster, reader_namespace, "prometheus")
            robot = service_account_token(cluster, tenant, "robot")  # namespace admin's own ServiceAccount

            assert scrape(guarded_operator, None)[0] == 401
            assert scrape(guarded_operator, "not-a-token")[0] == 401
            status, body = scrape(guarded_operator, robot)
            assert (status, body.strip()) == (403, f"system:serviceaccount:{tenant}:robot may not get /metrics")
            status, body = scrape(guarded_operator, prometheus)
            assert status == 200
            assert 'organization="Secret Lab"' in body
            assert scrape(guarded_operator, None, "/readyz")[0] == 200  # the kubelet's probe sends no token
        finally:
            rbac.delete_cluster_role_binding(READER_ROLE)
            rbac.delete_cluster_role(READER_ROLE)
            client.CoreV1Api(cluster.api).delete_namespace(reader_namespace)
