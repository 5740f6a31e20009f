"""Who may read /metrics: the API server decides, as it does for the kubelet's and kube-rbac-proxy's metrics.

/metrics names every tenant's organisation and usage, so a pod that can reach the operator is not enough. A scraper
sends a bearer token (its ServiceAccount's); a TokenReview says whose it is, a SubjectAccessReview whether that
subject may `get` the non-resource URL /metrics (the chart's `<release>-metrics-reader` ClusterRole grants it).
Answers are cached briefly, so a scrape every few seconds costs no API calls.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

logger = logging.getLogger(__name__)
METRICS_PATH = "/metrics"
ALLOWED_FOR_SECONDS = 60.0
REFUSED_FOR_SECONDS = 10.0


@dataclass(frozen=True)
class MetricsAccess:
    """The HTTP answer to one scrape's credentials: 200, 401 (no or bad token) or 403 (not allowed)."""

    status: int
    reason: str


def review_token(token: str) -> MetricsAccess:
    """A TokenReview, then a SubjectAccessReview for `get` on /metrics, with the operator's own client."""
    api = client.ApiClient.get_default()
    review = client.AuthenticationV1Api(api).create_token_review(
        client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
    )
    status = review.status
    if status is None or not status.authenticated or status.user is None:
        return MetricsAccess(401, "the bearer token is not valid")
    user = status.user
    spec = client.V1SubjectAccessReviewSpec(
        user=user.username,
        uid=user.uid,
        groups=user.groups or [],
        extra=cast(dict[str, list[str]], user.extra or {}),
        non_resource_attributes=client.V1NonResourceAttributes(path=METRICS_PATH, verb="get"),
    )
    access = client.AuthorizationV1Api(api).create_subject_access_review(client.V1SubjectAccessReview(spec=spec))
    if access.status is not None and access.status.allowed:
        return MetricsAccess(200, f"{user.username} may get {METRICS_PATH}")
    return MetricsAccess(403, f"{user.username} may not get {METRICS_PATH}")


class MetricsAuthorizer:
    """Decides a scrape from its Authorization header; callable from the metrics server's threads."""

    def __init__(
        self, review: Callable[[str], MetricsAccess] = review_token, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._review = review
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, MetricsAccess]] = {}

    def __call__(self, authorization: str | None) -> MetricsAccess:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return MetricsAccess(401, f"send a bearer token of a subject that may get {METRICS_PATH}")
        key = hashlib.sha256(token.strip().encode()).hexdigest()
        now = self._clock()
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            access = self._review(token.strip())
        except ApiException as error:
            logger.warning("metrics access review failed: %s %s", error.status, error.reason)
            return MetricsAccess(503, "the API server could not review the token")
        keep = ALLOWED_FOR_SECONDS if access.status == 200 else REFUSED_FOR_SECONDS
        with self._lock:
            if len(self._cache) > 1024:  # tokens rotate; never let the cache grow without bound
                self._cache.clear()
            self._cache[key] = (now + keep, access)
        return access
