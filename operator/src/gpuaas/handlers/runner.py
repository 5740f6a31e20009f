"""Starts kopf with gpuaas's settings and handlers."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import kopf

from gpuaas import metrics
from gpuaas.k8s.client import load_config


@dataclass(frozen=True)
class OperatorOptions:
    kubeconfig: str | None = None
    metrics_port: int = 8080
    health_port: int = 8081
    pool_resync_seconds: float = 2.0
    peering: str | None = None
    # kopf pauses every peer that shares the top priority, so replicas must differ; None picks one at random.
    peering_priority: int | None = None
    peering_lifetime: int = 20
    verbose: bool = False
    webhook_port: int = 9443
    # Directory with tls.crt and tls.key (a mounted Secret in the cluster).
    webhook_cert_dir: str | None = None
    # When the operator runs outside the cluster: the URL the API server calls. The operator then makes
    # its own self-signed certificate (in webhook_cert_dir) and webhook configurations.
    webhook_url: str | None = None
    # Month boundaries of the usage ledger.
    time_zone: str = "Asia/Seoul"
    # How stale a running allocation's GpuUsage record may get; ended pods are written at once.
    ledger_flush_seconds: float = 60.0


def run_operator(options: OperatorOptions) -> None:
    if options.kubeconfig:
        os.environ["KUBECONFIG"] = options.kubeconfig
    load_config(options.kubeconfig)
    logging.basicConfig(
        level=logging.DEBUG if options.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not options.verbose:
        # kopf logs every handler and webhook call at INFO; gpuaas logs what matters under its own name.
        for name in ("kopf.objects", "aiohttp.access"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if options.metrics_port:
        metrics.serve(options.metrics_port)
    # Importing the handler modules registers them with kopf's default registry.
    from gpuaas.handlers import fence, indexes, operator_settings, pools  # noqa: F401

    priority = options.peering_priority
    if priority is None:
        priority = random.SystemRandom().randint(1, 2**31 - 1)
    kopf.run(
        clusterwide=True,
        standalone=options.peering is None,
        peering_name=options.peering,
        priority=priority,
        liveness_endpoint=f"http://0.0.0.0:{options.health_port}/healthz" if options.health_port else None,
        # Each object gets a shallow copy of this memo, so the wake-up events must already live in it.
        memo=kopf.Memo(options=options, pool_wakeups={}, serving=None),
    )


def webhook_cert_dir(options: OperatorOptions) -> Path:
    return Path(options.webhook_cert_dir or ".cluster/webhook")
