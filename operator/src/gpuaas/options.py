"""The operator's options: a leaf module, so that the CLI and the handlers share them without importing each other
(and without loading kopf for `gpuaas report` or `gpuaas cluster`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class OperatorOptions:
    kubeconfig: str | None = None
    metrics_port: int = 8080
    # Serve /metrics only to bearer tokens whose subject may `get` it (TokenReview + SubjectAccessReview).
    metrics_auth: bool = False
    health_port: int = 8081
    pool_resync_seconds: float = 2.0
    # Name of the coordination.k8s.io Lease that elects the one replica that writes; None runs standalone.
    leader_lease: str | None = None
    # Namespace of that Lease; empty means the pod's own namespace (POD_NAMESPACE), else "default".
    leader_lease_namespace: str = ""
    # A standby takes over this long after the holder's last renewal; the holder renews every quarter of it.
    leader_lease_seconds: int = 4
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


def webhook_cert_dir(options: OperatorOptions) -> Path:
    return Path(options.webhook_cert_dir or ".cluster/webhook")


@dataclass
class WebhookRegistration:
    """Outside the cluster, the active replica registers the webhook configurations once, whatever its pool count
    (again after a pause: meanwhile another replica may have pointed them at itself)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    done: bool = False
