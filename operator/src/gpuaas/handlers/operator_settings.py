"""kopf settings: quiet events, watch timeouts that survive silent streams, gpuaas-named annotations,
and the admission webhook server."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import kopf

from gpuaas.api.pool import POOL_KIND
from gpuaas.k8s import webhooks
from gpuaas.options import OperatorOptions, webhook_cert_dir

# The kinds with change or daemon handlers: only theirs are diffed (tests/unit/test_handler_threads.py checks it).
DIFFED_KINDS = frozenset({POOL_KIND})


class DiffedKindsStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf builds a deep copy of every object on every watch event, to diff it for change and daemon handlers, even
    for kinds that have none: under churn, for about a hundred pod events a second. Other kinds get an empty copy."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        if body.get("kind") not in DIFFED_KINDS:
            return {}
        return super().build(body=body, extra_fields=extra_fields)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    info: kopf.ConnectionInfo | None = kopf.login_via_client(**kwargs)
    return info


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    options: OperatorOptions = memo.options
    # Handler-success events would be posted every resync; gpuaas posts its own meaningful events.
    settings.posting.level = logging.WARNING
    # Watch streams can go silent without an error; time them out and re-list.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.persistence.finalizer = "gpuaas.io/operator"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="gpuaas.io")
    settings.persistence.diffbase_storage = DiffedKindsStorage(prefix="gpuaas.io", key="last-handled-configuration")
    settings.execution.max_workers = 16
    memo.operator_username = webhooks.whoami()
    logger.info(f"operator identity: {memo.operator_username}")
    if not options.webhook_port:
        return
    cert_dir = webhook_cert_dir(options)
    if options.webhook_url:
        # The configurations are registered by the leader's first reconcile pass (see handlers.pools), so that
        # only the leading replica points the API server at itself.
        webhooks.ensure_self_signed(cert_dir, webhooks.url_host(options.webhook_url))
    settings.admission.server = kopf.WebhookServer(
        addr="0.0.0.0",  # noqa: S104 - the API server must reach it
        port=options.webhook_port,
        certfile=str(cert_dir / "tls.crt"),
        pkeyfile=str(cert_dir / "tls.key"),
    )
    settings.admission.managed = None  # configurations come from the chart, or from apply_configurations
