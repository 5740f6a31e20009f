"""Proof that the integration tier talks to a real kube-apiserver: freeze its process and reads fail;
thaw it and the operator, which never restarted, picks up changes again."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from kubernetes import client
from urllib3.exceptions import HTTPError

from gpuaas.domain.scenarios import SCENARIOS, node_name
from gpuaas.k8s import localcluster
from tests.integration.conftest import LocalCluster, OperatorProcess
from tests.integration.test_pools import wait_for_capacity

pytestmark = pytest.mark.integration
H200 = SCENARIOS["small"].pools[1]


def apiserver_pid(cluster: LocalCluster) -> int:
    """kwokctl's binary runtime keeps a pid file per component."""
    pid_file = Path.home() / ".kwok" / "clusters" / cluster.name / "pids" / "kube-apiserver.pid"
    pid = int(pid_file.read_text().strip())
    assert "kube-apiserver" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    return pid


def test_frozen_apiserver_fails_reads_and_operator_recovers(cluster: LocalCluster, operator: OperatorProcess) -> None:
    wait_for_capacity(cluster, H200.name, H200.gpus)
    pid = apiserver_pid(cluster)
    os.kill(pid, signal.SIGSTOP)  # the process is there but answers nothing, as in a hung control plane
    try:
        with pytest.raises((HTTPError, OSError, client.ApiException)):
            client.CoreV1Api(cluster.api).list_node(_request_timeout=3)
    finally:
        os.kill(pid, signal.SIGCONT)
    localcluster.wait_for_apiserver(cluster.kubeconfig)
    core = client.CoreV1Api(cluster.api)
    core.patch_node(node_name(H200, 0), {"spec": {"unschedulable": True}})
    try:
        wait_for_capacity(cluster, H200.name, H200.gpus - 8, timeout=90)
    finally:
        core.patch_node(node_name(H200, 0), {"spec": {"unschedulable": False}})
    wait_for_capacity(cluster, H200.name, H200.gpus, timeout=30)
