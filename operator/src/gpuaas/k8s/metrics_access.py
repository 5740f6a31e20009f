"""Who may read /metrics: the API server decides, as it does for the kubelet's and kube-rbac-proxy's metrics.

/metrics names every tenant's organisation and usage, so a pod that can reach the operator is not enough. A scraper
sends a bearer token (its ServiceAccount's); a TokenReview says whose it is, a SubjectAccessReview whether that
subject may `get` the non-resource URL /metrics (the chart's `<release>-metrics-reader` ClusterRole grants it).
The metrics server (gpuaas/metrics_server.py) caches the answers briefly, so a scrape every few seconds costs no
API calls.
"""

from __future__ import annotations

import logging
from typing import cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpuaas.metrics_server import METRICS_PATH, MetricsAccess

logger = logging.getLogger(__name__)


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


def review_or_unavailable(token: str) -> MetricsAccess:
    """`review_token`, or 503 when the API server does not answer (not cached: the next scrape asks again)."""
    try:
        return review_token(token)
    except ApiException as error:
        logger.warning("metrics access review failed: %s %s", error.status, error.reason)
        return MetricsAccess(503, "the API server could not review the token")
