"""kopf settings: quiet events, watch timeouts that survive silent streams, gpuaas-named annotations."""

from __future__ import annotations

import logging
from typing import Any

import kopf


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    info: kopf.ConnectionInfo | None = kopf.login_via_client(**kwargs)
    return info


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Handler-success events would be posted every resync; gpuaas posts its own meaningful events.
    settings.posting.level = logging.WARNING
    # Watch streams can go silent without an error; time them out and re-list.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.persistence.finalizer = "gpuaas.io/operator"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="gpuaas.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="gpuaas.io", key="last-handled-configuration"
    )
    settings.execution.max_workers = 16
