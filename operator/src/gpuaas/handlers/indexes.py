"""kopf indexes: the in-memory, watch-fed view of the cluster that reconcile passes read.

The index functions are coroutines that never await: kopf runs a plain function in its thread pool, a hop to another
thread and back for every watch event (thousands a second under churn), while these are quick and pure.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import kopf

from gpuaas.api.allocation import ALLOCATION_LABEL, ALLOCATION_PLURAL
from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.pool import POOL_LABEL
from gpuaas.api.usage import USAGE_PLURAL, GpuUsage
from gpuaas.domain.access import TenantBinding
from gpuaas.domain.actions import DEFAULT_POD_GRACE_SECONDS
from gpuaas.domain.dra import (
    DRA_GPUS_ANNOTATION,
    SHARED_CLAIMS_ANNOTATION,
    ClaimTemplate,
    PublishedDevices,
    SharedClaim,
    claim_template,
    published_devices,
    recorded_claim_devices,
    recorded_devices,
    shared_claim,
)
from gpuaas.domain.fence import DEFAULT_MAX_GRACE_SECONDS, PoolRules
from gpuaas.domain.history import HISTORY_ANNOTATIONS
from gpuaas.domain.ledger import TERMINAL_PHASES, ledger_pod, parse_timestamp, pod_gpus, pod_interval_from_pod
from gpuaas.domain.namespaces import NamespaceClaim, TerminatingNamespace, terminating_namespace
from gpuaas.domain.nodes import NodeInfo, node_info_from_manifest
from gpuaas.domain.snapshot import AllocationView, PodView
from gpuaas.domain.tenant import MANAGED_LABEL

MANAGED = {MANAGED_LABEL: "true"}


@kopf.index("", "v1", "nodes")
async def nodes_by_name(*, name: str, body: kopf.Body, **_: Any) -> dict[str, NodeInfo]:
    # gpuaas's own taints (the pool fence, exclusive reservations) do not make a node unhealthy.
    return {name: node_info_from_manifest(body, (POOL_LABEL, ALLOCATION_LABEL))}


def allocation_view(body: kopf.Body) -> AllocationView:
    meta = body.get("metadata", {})
    annotations = meta.get("annotations") or {}
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
        history_stamps={key: annotations[key] for key in HISTORY_ANNOTATIONS if key in annotations},
        deletion_timestamp=parse_timestamp(meta.get("deletionTimestamp")),
    )


@kopf.index(GROUP, VERSION, ALLOCATION_PLURAL)
async def allocations_by_pool(*, body: kopf.Body, spec: kopf.Spec, **_: Any) -> dict[str, AllocationView]:
    return {str(spec.get("pool", "")): allocation_view(body)}


@kopf.index(GROUP, VERSION, ALLOCATION_PLURAL)
async def allocations_by_namespace(
    *, name: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any
) -> dict[str, NamespaceClaim]:
    namespace = spec.get("namespace") or (spec.get("tenant") or {}).get("name", "")
    created = str(meta.get("creationTimestamp", ""))
    pool, exclusive = str(spec.get("pool", "")), bool(spec.get("exclusiveNodes", False))
    return {str(namespace): NamespaceClaim(created, name, pool, exclusive)}


@kopf.index(GROUP, VERSION, "gpupools")
async def pools_by_name(*, name: str, spec: kopf.Spec, **_: Any) -> dict[str, PoolRules]:
    """pool -> what the fence enforces for it."""
    return {
        name: PoolRules(
            node_selector=dict(spec.get("nodeSelector") or {}),
            allowed_priority_classes=frozenset(spec.get("allowedPriorityClasses") or ()),
            max_grace_seconds=int(spec.get("maxTerminationGracePeriodSeconds", DEFAULT_MAX_GRACE_SECONDS)),
            device_class=(spec.get("dra") or {}).get("deviceClassName"),
        )
    }


@kopf.index("resource.k8s.io", "v1", "resourceclaimtemplates")
async def claim_templates_by_namespace(*, namespace: str | None, body: kopf.Body, **_: Any) -> dict[str, ClaimTemplate]:
    """namespace -> its templates and the devices each asks for: what a DRA pod's claims will bill."""
    return {str(namespace): claim_template(body)}


@kopf.index("resource.k8s.io", "v1", "resourceclaims")
async def shared_claims_by_namespace(
    *, namespace: str | None, body: kopf.Body, **_: Any
) -> dict[str, SharedClaim] | None:
    """namespace -> the ResourceClaims its pods may share (not those made from a pod's template)."""
    claim = shared_claim(body)
    return {str(namespace): claim} if claim is not None else None


@kopf.index("", "v1", "pods", annotations={DRA_GPUS_ANNOTATION: kopf.PRESENT})
async def dra_pods_by_name(*, name: str, namespace: str | None, meta: kopf.Meta, **_: Any) -> dict[Any, dict[str, int]]:
    """(namespace, pod) -> the DRA devices recorded at its admission, to check the claims made for it."""
    return {(str(namespace), name): recorded_claim_devices(meta)}


@kopf.index("", "v1", "pods", annotations={SHARED_CLAIMS_ANNOTATION: kopf.PRESENT})
async def shared_claim_users(
    *, name: str, namespace: str | None, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, **_: Any
) -> dict[tuple[str, str], str] | None:
    """(namespace, claim name) -> the unfinished pods admitted for the shared claim of that name."""
    if meta.get("deletionTimestamp") or status.get("phase") in TERMINAL_PHASES:
        return None
    claims = [str(e["resourceClaimName"]) for e in spec.get("resourceClaims") or [] if e.get("resourceClaimName")]
    return {(str(namespace), claim): name for claim in claims} or None


@kopf.index("resource.k8s.io", "v1", "resourceslices")
async def devices_by_node(*, body: kopf.Body, **_: Any) -> dict[str, PublishedDevices] | None:
    """node -> the device counts its DRA drivers publish (capacity of pools whose GPUs are DRA devices)."""
    published = published_devices(body)
    return {published.node: published} if published is not None else None


@kopf.index("", "v1", "namespaces")
async def terminating_namespaces(*, name: str, body: kopf.Body, **_: Any) -> dict[str, TerminatingNamespace] | None:
    """Namespaces being deleted, with what keeps them (their own status conditions)."""
    terminating = terminating_namespace(body)
    return {name: terminating} if terminating is not None else None


@kopf.index("", "v1", "namespaces")
async def namespace_labels(*, name: str, labels: kopf.Labels, **_: Any) -> dict[str, dict[str, str]]:
    return {name: dict(labels)}


def _observed(body: kopf.Body) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The object without its status and managedFields, which drift checks never read: 12,000 of them at program
    scale, and the field managers' records were most of their size."""
    meta = body.get("metadata", {})
    key = (str(body.get("kind")), str(meta.get("namespace") or ""), str(meta.get("name")))
    kept = {k: v for k, v in body.items() if k not in ("status", "metadata")}
    kept["metadata"] = {k: v for k, v in meta.items() if k != "managedFields"}
    return {key: kept}


@kopf.index("", "v1", "namespaces", labels=MANAGED)
async def managed_namespaces(*, body: kopf.Body, **_: Any) -> dict[tuple[str, str, str], dict[str, Any]]:
    return _observed(body)


@kopf.index("", "v1", "resourcequotas", labels={ALLOCATION_LABEL: kopf.PRESENT})
async def managed_quotas(*, body: kopf.Body, **_: Any) -> dict[tuple[str, str, str], dict[str, Any]]:
    return _observed(body)


@kopf.index("", "v1", "limitranges", labels={ALLOCATION_LABEL: kopf.PRESENT})
async def managed_limit_ranges(*, body: kopf.Body, **_: Any) -> dict[tuple[str, str, str], dict[str, Any]]:
    return _observed(body)


@kopf.index("rbac.authorization.k8s.io", "v1", "rolebindings", labels={ALLOCATION_LABEL: kopf.PRESENT})
async def managed_role_bindings(*, body: kopf.Body, **_: Any) -> dict[tuple[str, str, str], dict[str, Any]]:
    return _observed(body)


@kopf.index("rbac.authorization.k8s.io", "v1", "rolebindings", labels={ALLOCATION_LABEL: kopf.ABSENT})
async def tenant_role_bindings(
    *, name: str, namespace: str | None, meta: kopf.Meta, body: kopf.Body, **_: Any
) -> dict[str, TenantBinding]:
    """RoleBindings gpuaas did not write, by namespace (only those of tenant namespaces are ever read)."""
    subjects = tuple(dict(subject) for subject in body.get("subjects") or [])
    binding = TenantBinding(str(namespace), name, str(meta.get("resourceVersion", "")), subjects)
    return {str(namespace): binding}


@kopf.index("", "v1", "pods")
async def gpu_pods_by_namespace(
    *, body: kopf.Body, namespace: str | None, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status, **_: Any
) -> dict[str, PodView] | None:
    """GPU pods, and any pod still holding the usage finalizer (it must be released even without GPUs)."""
    # A shared claim counts in full for each of its pods: reclaim stops them all, and capacity is never promised
    # while one of them holds it (billing counts it once, `ledger.shared_claim_spans`).
    gpus = pod_gpus(dict(spec)) + recorded_devices(meta)
    interval = pod_interval_from_pod(dict(body)) if gpus else None
    pod_ledger = ledger_pod(meta, interval, status.get("phase"))
    if (gpus == 0 and not pod_ledger.has_finalizer) or namespace is None:
        return None
    running = status.get("phase") == "Running" and not meta.get("deletionTimestamp")
    return {
        namespace: PodView(
            name=pod_ledger.name,
            namespace=namespace,
            uid=pod_ledger.uid,
            gpus=gpus,
            running=running,
            ledger=pod_ledger,
            created=str(meta.get("creationTimestamp", "")),
            grace_seconds=int(spec.get("terminationGracePeriodSeconds", DEFAULT_POD_GRACE_SECONDS)),
        )
    }


@kopf.index(GROUP, VERSION, USAGE_PLURAL)
async def usage_by_allocation(*, name: str, body: kopf.Body, spec: kopf.Spec, **_: Any) -> dict[str, GpuUsage]:
    return {str(spec.get("allocationUID", "")): GpuUsage.from_object(body)}


def exclusive_holders(nodes: Iterable[NodeInfo]) -> dict[str, str]:
    """node -> the allocation that holds it whole."""
    return {info.name: info.labels[ALLOCATION_LABEL] for info in nodes if ALLOCATION_LABEL in info.labels}
