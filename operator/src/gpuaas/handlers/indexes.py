"""kopf indexes: the in-memory, watch-fed view of the cluster that reconcile passes read."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import kopf

from gpuaas.api.allocation import ALLOCATION_LABEL, ALLOCATION_PLURAL
from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.pool import POOL_LABEL
from gpuaas.api.usage import USAGE_PLURAL, GpuUsage
from gpuaas.domain.fence import pod_gpus
from gpuaas.domain.ledger import pod_interval_from_pod
from gpuaas.domain.nodes import NodeInfo, node_info_from_manifest
from gpuaas.domain.tenant import MANAGED_LABEL
from gpuaas.k8s.ledger import to_ledger_pod
from gpuaas.k8s.reconciler import AllocationView, PodView

MANAGED = {MANAGED_LABEL: "true"}


@kopf.index("", "v1", "nodes")
def nodes_by_name(*, name: str, body: kopf.Body, **_: Any) -> dict[str, NodeInfo]:
    # gpuaas's own taints (the pool fence, exclusive reservations) do not make a node unhealthy.
    return {name: node_info_from_manifest(body, (POOL_LABEL, ALLOCATION_LABEL))}


def allocation_view(body: kopf.Body) -> AllocationView:
    meta = body.get("metadata", {})
    return AllocationView(
        name=meta["name"],
        uid=meta["uid"],
        created=datetime.fromisoformat(meta["creationTimestamp"].replace("Z", "+00:00")),
        generation=meta.get("generation"),
        resource_version=meta.get("resourceVersion", ""),
        deleting=bool(meta.get("deletionTimestamp")),
        finalizers=tuple(meta.get("finalizers") or ()),
        spec=dict(body.get("spec") or {}),
        status=dict(body.get("status") or {}),
    )


@kopf.index(GROUP, VERSION, ALLOCATION_PLURAL)
def allocations_by_pool(*, body: kopf.Body, spec: kopf.Spec, **_: Any) -> dict[str, AllocationView]:
    return {str(spec.get("pool", "")): allocation_view(body)}


@kopf.index(GROUP, VERSION, ALLOCATION_PLURAL)
def allocations_by_namespace(
    *, name: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any
) -> dict[str, tuple[str, str, str, bool]]:
    """namespace -> (creationTimestamp, allocation, pool, exclusive)."""
    namespace = spec.get("namespace") or (spec.get("tenant") or {}).get("name", "")
    created = str(meta.get("creationTimestamp", ""))
    return {str(namespace): (created, name, str(spec.get("pool", "")), bool(spec.get("exclusiveNodes", False)))}


@kopf.index(GROUP, VERSION, "gpupools")
def pools_by_name(*, name: str, spec: kopf.Spec, **_: Any) -> dict[str, dict[str, str]]:
    """pool -> nodeSelector, for the fence."""
    return {name: dict(spec.get("nodeSelector") or {})}


@kopf.index("", "v1", "namespaces")
def namespace_labels(*, name: str, labels: kopf.Labels, **_: Any) -> dict[str, dict[str, str]]:
    return {name: dict(labels)}


def _observed(body: kopf.Body) -> dict[tuple[str, str, str], dict[str, Any]]:
    meta = body.get("metadata", {})
    key = (str(body.get("kind")), str(meta.get("namespace") or ""), str(meta.get("name")))
    return {key: {k: v for k, v in body.items() if k != "status"}}


@kopf.index("", "v1", "namespaces", labels=MANAGED)
def managed_namespaces(*, body: kopf.Body, **_: Any) -> dict[tuple[str, str, str], dict[str, Any]]:
    return _observed(body)


@kopf.index("", "v1", "resourcequotas", labels={ALLOCATION_LABEL: kopf.PRESENT})
def managed_quotas(*, body: kopf.Body, **_: Any) -> dict[tuple[str, str, str], dict[str, Any]]:
    return _observed(body)


@kopf.index("", "v1", "limitranges", labels={ALLOCATION_LABEL: kopf.PRESENT})
def managed_limit_ranges(*, body: kopf.Body, **_: Any) -> dict[tuple[str, str, str], dict[str, Any]]:
    return _observed(body)


@kopf.index("rbac.authorization.k8s.io", "v1", "rolebindings", labels={ALLOCATION_LABEL: kopf.PRESENT})
def managed_role_bindings(*, body: kopf.Body, **_: Any) -> dict[tuple[str, str, str], dict[str, Any]]:
    return _observed(body)


@kopf.index("", "v1", "pods")
def gpu_pods_by_namespace(
    *, body: kopf.Body, namespace: str | None, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status, **_: Any
) -> dict[str, PodView] | None:
    """GPU pods, and any pod still holding the usage finalizer (it must be released even without GPUs)."""
    try:
        gpus = pod_gpus({"spec": dict(spec)})
    except ValueError:
        gpus = 0
    ledger_pod = to_ledger_pod(meta, pod_interval_from_pod(dict(body)) if gpus else None, status.get("phase"))
    if (gpus == 0 and not ledger_pod.has_finalizer) or namespace is None:
        return None
    running = status.get("phase") == "Running" and not meta.get("deletionTimestamp")
    return {
        namespace: PodView(
            name=ledger_pod.name, namespace=namespace, uid=ledger_pod.uid, gpus=gpus, running=running, ledger=ledger_pod
        )
    }


@kopf.index(GROUP, VERSION, USAGE_PLURAL)
def usage_by_allocation(*, name: str, body: kopf.Body, spec: kopf.Spec, **_: Any) -> dict[str, GpuUsage]:
    return {str(spec.get("allocationUID", "")): GpuUsage.from_object(body)}


def exclusive_holders(nodes: kopf.Index[str, NodeInfo]) -> dict[str, str]:
    return {
        info.name: info.labels[ALLOCATION_LABEL]
        for store in nodes.values()
        for info in store
        if ALLOCATION_LABEL in info.labels
    }
