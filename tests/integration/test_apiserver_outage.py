"""Proof that the integration tier talks to a real kube-apiserver: stop it and reads fail; start it and
the operator, which never restarted, picks up changes again."""

from __future__ import annotations

import pytest
from kubernetes import client
from urllib3.exceptions import HTTPError

from gpuaas.domain.scenarios import SCENARIOS, node_name
from gpuaas.k8s import localcluster
from tests.integration.conftest import LocalCluster, OperatorProcess
from tests.integration.test_pools import wait_for_capacity

pytestmark = pytest.mark.integration
H200 = SCENARIOS["small"].pools[1]


def test_stopped_apiserver_fails_reads_and_operator_recovers(cluster: LocalCluster, operator: OperatorProcess) -> None:
    wait_for_capacity(cluster, H200.name, H200.gpus)
    cluster.kwokctl("stop", "cluster")
    try:
        with pytest.raises((HTTPError, OSError, client.ApiException)):
            client.CoreV1Api(cluster.api).list_node(_request_timeout=3)
    finally:
        cluster.kwokctl("start", "cluster")
        localcluster.wait_for_apiserver(cluster.kubeconfig)
    core = client.CoreV1Api(cluster.api)
    core.patch_node(node_name(H200, 0), {"spec": {"unschedulable": True}})
    try:
        wait_for_capacity(cluster, H200.name, H200.gpus - 8, timeout=90)
    finally:
        core.patch_node(node_name(H200, 0), {"spec": {"unschedulable": False}})
    wait_for_capacity(cluster, H200.name, H200.gpus, timeout=30)
