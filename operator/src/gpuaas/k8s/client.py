"""Kubernetes client configuration: the one place that decides how gpuaas reaches the API server."""

from __future__ import annotations

import os
from typing import Any

from kubernetes import client, config

FIELD_MANAGER = "gpuaas"


def load_config(kubeconfig: str | None = None, pool_size: int = 32) -> None:
    """In-cluster config inside a pod, else the given kubeconfig or $KUBECONFIG. Installs one shared
    ApiClient: without a default, every `client.XxxApi()` makes its own connection pool, so every call
    would pay a new TLS handshake. Each pool's writes have a client of their own (reconciler.POOL_CONNECTIONS);
    this one serves the handlers, the webhooks and the ledger's reads."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        client.ApiClient.set_default(new_api_client(pool_size=pool_size))
        return
    if kubeconfig:
        # Libraries that load "the default kubeconfig" (kopf's login among them) read this module global,
        # which the client computed from $KUBECONFIG at import time.
        config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = kubeconfig
    config.load_kube_config(config_file=kubeconfig)
    client.ApiClient.set_default(new_api_client(kubeconfig, pool_size=pool_size))


def discard(response: Any) -> None:
    """Read and release a raw response (`_preload_content=False`), returning its connection to the pool;
    gpuaas's writes need no response body, and the client's deserialisation is costly."""
    response.read()
    response.release_conn()


def new_api_client(kubeconfig: str | None = None, pool_size: int = 16, context: str | None = None) -> client.ApiClient:
    """A dedicated client, with a connection pool large enough for parallel writers."""
    configuration = client.Configuration()
    if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)
