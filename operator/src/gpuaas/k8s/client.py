"""Kubernetes client configuration: the one place that decides how gpuaas reaches the API server."""

from __future__ import annotations

import os

from kubernetes import client, config

FIELD_MANAGER = "gpuaas"


def load_config(kubeconfig: str | None = None) -> None:
    """In-cluster config inside a pod, else the given kubeconfig or $KUBECONFIG."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        return
    if kubeconfig:
        # Libraries that load "the default kubeconfig" (kopf's login among them) read this module global,
        # which the client computed from $KUBECONFIG at import time.
        config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = kubeconfig
    config.load_kube_config(config_file=kubeconfig)


def new_api_client(kubeconfig: str | None = None, pool_size: int = 16) -> client.ApiClient:
    """A dedicated client, with a connection pool large enough for parallel writers."""
    configuration = client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)
