"""The active replica's claim on the webhook Service: a label on its own pod, which the Service selects.

Every replica stays Ready (its process is healthy, so rollouts and `helm --wait` work), but only the replica that
reconciles, whose indexes are live, receives admission requests. kopf stops a replica's daemons when peering
pauses it and when it shuts down; the claim goes with the last of them. A replica killed outright loses its pod,
and with it the endpoint.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpuaas.k8s.client import discard

logger = logging.getLogger(__name__)
SERVING_LABEL = "gpuaas.io/webhook-serving"


@dataclass
class ServingClaim:
    pod: str
    namespace: str
    holders: set[str] = field(default_factory=set)  # pools whose daemon runs passes here
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self, pool: str) -> None:
        """A pool daemon of this replica ran a pass: label the pod (once) so the webhook Service routes here."""
        with self._lock:
            if not self.holders:
                self._label("true")
            self.holders.add(pool)

    def release(self, pool: str) -> None:
        """A pool daemon stopped; with the last one, this replica stops serving admission requests."""
        with self._lock:
            if pool not in self.holders:
                return
            self.holders.discard(pool)
            if not self.holders:
                self._label(None)

    def _label(self, value: str | None) -> None:
        try:
            response = client.CoreV1Api().patch_namespaced_pod(
                self.pod, self.namespace, {"metadata": {"labels": {SERVING_LABEL: value}}}, _preload_content=False
            )
            discard(response)
            logger.info(f"webhook Service {'routes to' if value else 'no longer routes to'} pod {self.pod}")
        except ApiException as error:
            if error.status != 404:
                raise


def claim_from_environment() -> ServingClaim | None:
    """In a pod of the chart's Deployment (POD_ID and POD_NAMESPACE from the downward API); None elsewhere."""
    pod, namespace = os.environ.get("POD_ID"), os.environ.get("POD_NAMESPACE")
    return ServingClaim(pod, namespace) if pod and namespace else None
