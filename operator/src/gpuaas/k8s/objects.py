"""Writes of Kubernetes built-in objects on behalf of allocations: server-side apply, deletes, events."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpuaas.api.common import API_VERSION, GROUP, VERSION
from gpuaas.domain.access import TenantBinding
from gpuaas.k8s.client import FIELD_MANAGER, discard

logger = logging.getLogger(__name__)
APPLY = "application/apply-patch+yaml"


def apply(manifest: Mapping[str, Any], api: client.ApiClient | None = None) -> None:
    """Server-side apply a Namespace, ResourceQuota, LimitRange or RoleBinding, forcing ownership."""
    kind = manifest["kind"]
    name = manifest["metadata"]["name"]
    namespace = manifest["metadata"].get("namespace")
    body = dict(manifest)
    options: dict[str, Any] = {
        "field_manager": FIELD_MANAGER,
        "force": True,
        "_content_type": APPLY,
        "_preload_content": False,
    }
    core = client.CoreV1Api(api)
    response: Any  # raw responses: _preload_content=False
    if kind == "Namespace":
        response = core.patch_namespace(name, body, **options)
    elif kind == "ResourceQuota":
        response = core.patch_namespaced_resource_quota(name, namespace, body, **options)
    elif kind == "LimitRange":
        response = core.patch_namespaced_limit_range(name, namespace, body, **options)
    elif kind == "RoleBinding":
        response = client.RbacAuthorizationV1Api(api).patch_namespaced_role_binding(name, namespace, body, **options)
    else:
        raise ValueError(f"gpuaas does not apply {kind}")
    discard(response)


def read_namespace_labels(name: str) -> dict[str, str] | None:
    """The namespace's labels, or None when it does not exist."""
    try:
        namespace = client.CoreV1Api().read_namespace(name)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return dict((namespace.metadata.labels if namespace.metadata else None) or {})


def delete_namespace(name: str, api: client.ApiClient | None = None) -> None:
    try:
        client.CoreV1Api(api).delete_namespace(name)
    except ApiException as error:
        if error.status not in (404, 409):  # 409: already being deleted
            raise


def delete_role_binding(name: str, namespace: str, api: client.ApiClient | None = None) -> None:
    try:
        client.RbacAuthorizationV1Api(api).delete_namespaced_role_binding(name, namespace)
    except ApiException as error:
        if error.status != 404:
            raise


def set_role_binding_subjects(
    binding: TenantBinding, subjects: list[Mapping[str, Any]], api: client.ApiClient | None = None
) -> None:
    """Rewrite a tenant RoleBinding's subjects; the resourceVersion makes a binding changed meanwhile fail (409) and
    wait for the next pass instead of losing that change. The API server lets the operator rewrite only bindings to
    roles it may bind (`admin`); any other such binding is deleted, as it names someone who must lose access."""
    body = {"metadata": {"resourceVersion": binding.resource_version}, "subjects": [dict(s) for s in subjects]}
    try:
        client.RbacAuthorizationV1Api(api).patch_namespaced_role_binding(binding.name, binding.namespace, body)
    except ApiException as error:
        if error.status == 403:
            logger.info("deleting RoleBinding %s/%s: it may not be rewritten", binding.namespace, binding.name)
            delete_role_binding(binding.name, binding.namespace, api)
        elif error.status not in (404, 409):
            raise


def delete_pod(name: str, namespace: str, grace_period_seconds: int, api: client.ApiClient | None = None) -> None:
    try:
        client.CoreV1Api(api).delete_namespaced_pod(name, namespace, grace_period_seconds=grace_period_seconds)
    except ApiException as error:
        if error.status != 404:
            raise


def patch_node(name: str, patch: Mapping[str, Any], api: client.ApiClient | None = None) -> None:
    """Strategic-merge patch of a node's labels or taints. A taint list read at an older version
    (planner.node_patch) is refused with 409 and raised like any refusal: the write did not happen, and whoever
    planned it must not report it as done (a pass plans it again from the fresh node)."""
    discard(client.CoreV1Api(api).patch_node(name, dict(patch), _preload_content=False))


def _patch_allocation(name: str, json_patch: list[dict[str, Any]], api: client.ApiClient | None = None) -> None:
    try:
        response = client.CustomObjectsApi(api).patch_cluster_custom_object(
            GROUP,
            VERSION,
            "gpuallocations",
            name,
            json_patch,
            _content_type="application/json-patch+json",
            _preload_content=False,
        )
        discard(response)
    except ApiException as error:
        # 422: a stale view (the test op failed); 404: already gone. The next pass sees fresh state.
        if error.status not in (404, 409, 422):
            raise


def add_allocation_finalizer(name: str, finalizer: str, has_any: bool, api: client.ApiClient | None = None) -> None:
    """JSON patch add, so finalizers other controllers add concurrently are kept."""
    op = (
        {"op": "add", "path": "/metadata/finalizers/-", "value": finalizer}
        if has_any
        else {"op": "add", "path": "/metadata/finalizers", "value": [finalizer]}
    )
    _patch_allocation(name, [op], api)


def annotate_allocation(name: str, key: str, value: str, api: client.ApiClient | None = None) -> None:
    client.CustomObjectsApi(api).patch_cluster_custom_object(
        GROUP, VERSION, "gpuallocations", name, {"metadata": {"annotations": {key: value}}}
    )


def suspend_allocation(name: str, api: client.ApiClient | None = None) -> None:
    client.CustomObjectsApi(api).patch_cluster_custom_object(
        GROUP, VERSION, "gpuallocations", name, {"spec": {"suspend": True}}
    )


def remove_allocation_finalizer(
    name: str, finalizer: str, finalizers: list[str], api: client.ApiClient | None = None
) -> None:
    """Remove by index, guarded by a test op so a stale view never removes someone else's finalizer."""
    if finalizer not in finalizers:
        return
    index = finalizers.index(finalizer)
    path = f"/metadata/finalizers/{index}"
    _patch_allocation(name, [{"op": "test", "path": path, "value": finalizer}, {"op": "remove", "path": path}], api)


def post_event(
    kind: str,
    name: str,
    uid: str,
    reason: str,
    message: str,
    event_type: str = "Normal",
    now: datetime | None = None,
    api: client.ApiClient | None = None,
) -> None:
    """An Event about a cluster-scoped gpuaas object (they live in the default namespace, as kubectl expects)."""
    moment = now or datetime.now(UTC)
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{name}.", "namespace": "default"},
        "involvedObject": {"apiVersion": API_VERSION, "kind": kind, "name": name, "uid": uid},
        "reason": reason,
        "message": message[:1024],
        "type": event_type,
        "source": {"component": "gpuaas"},
        "firstTimestamp": moment.isoformat(),
        "lastTimestamp": moment.isoformat(),
        "count": 1,
        "reportingComponent": "gpuaas",
        "reportingInstance": "gpuaas",
    }
    try:
        response = client.CoreV1Api(api).create_namespaced_event(
            "default",
            event,  # type: ignore[arg-type]
            _preload_content=False,
        )
        discard(response)
    except ApiException as error:  # an event is best effort; never fail a reconcile for it
        logger.warning("could not post event %s for %s: %s", reason, name, error.reason)
