"""Starts kopf with gpuaas's settings and handlers."""

from __future__ import annotations

import logging
import os
import random

import kopf

from gpuaas import metrics
from gpuaas.k8s.client import load_config
from gpuaas.options import OperatorOptions, WebhookRegistration


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
        # The webhook registration lock is shared too: the first pool daemon of an active replica registers.
        memo=kopf.Memo(options=options, pool_wakeups={}, serving=None, webhook_registration=WebhookRegistration()),
    )
