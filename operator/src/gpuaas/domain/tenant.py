"""The desired tenant objects of an allocation, as plain dicts ready for server-side apply.

The quota holds GPUs as ``requests.nvidia.com/gpu`` (Kubernetes rejects ``limits.`` quota items for
extended resources: they cannot be overcommitted, and a GPU request defaults to its limit, so the
requests item already counts limit-only pods), or, in a pool that hands GPUs out through DRA, as the devices of
its DeviceClass that the namespace's ResourceClaims request; GPU items of other pools are held at 0.
CPU and memory are quota'd on requests only; memory
and CPU limits stay the tenant's choice, so pods that set large requests without limits are not
broken by a LimitRange default limit smaller than their request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from gpuaas.api.allocation import ALLOCATION_LABEL, QUANTITY_PATTERN, GpuAllocationSpec, Owner, Phase
from gpuaas.api.pool import POOL_LABEL

MANAGED_LABEL = "gpuaas.io/managed"
TENANT_LABEL = "gpuaas.io/tenant"
RELEASED_LABEL = "gpuaas.io/released"
MANAGED_BY = "gpuaas"

QUOTA_NAME = "gpuaas-quota"
LIMIT_RANGE_NAME = "gpuaas-limits"
OWNERS_BINDING_NAME = "gpuaas-owners"
OWNER_CLUSTER_ROLE = "admin"

GPU_RESOURCE = "nvidia.com/gpu"
GPU_QUOTA_KEY = f"requests.{GPU_RESOURCE}"

DEVICE_CLASS_QUOTA_SUFFIX = ".deviceclass.resource.k8s.io/devices"


def device_class_quota_key(device_class: str) -> str:
    """The quota item counting the devices of a DRA DeviceClass that a namespace's ResourceClaims request."""
    return f"{device_class}{DEVICE_CLASS_QUOTA_SUFFIX}"


@dataclass(frozen=True)
class GpuQuotaItems:
    """The quota items that count GPUs: `granted` carries the grant; `closed` are held at 0."""

    granted: str = GPU_QUOTA_KEY
    closed: tuple[str, ...] = ()


def gpu_quota_items(pool_device_class: str | None, other_pools_classes: Iterable[str]) -> GpuQuotaItems:
    """A device-plugin pool grants nvidia.com/gpu; a DRA pool grants its class's devices and holds nvidia.com/gpu at
    0 (nodes that also ran the device plugin would otherwise give the grant twice). Either way, the classes of
    other pools are held at 0, so a claim for them is refused by the quota as well as by the fence."""
    others = {device_class_quota_key(c) for c in other_pools_classes if c != pool_device_class}
    if pool_device_class is None:
        return GpuQuotaItems(GPU_QUOTA_KEY, tuple(sorted(others)))
    return GpuQuotaItems(device_class_quota_key(pool_device_class), tuple(sorted(others | {GPU_QUOTA_KEY})))


# Containers without requests still get a share the scheduler and quota can count.
DEFAULT_CONTAINER_CPU_REQUEST = "1"
DEFAULT_CONTAINER_MEMORY_REQUEST = "4Gi"
# A few pods per GPU (workers, launchers, sidecar jobs) plus a floor for small grants.
PODS_PER_GPU = 4
PODS_FLOOR = 32
PODS_CEILING = 50_000
# GPUs' worth of CPU and memory left while the GPU quota is closed, so tenants can reach their data.
CLOSED_ALLOWANCE_GPUS = 1


def quota_open(phase: Phase) -> bool:
    """GPUs are usable only while Active; every other phase holds the GPU quota at 0."""
    return phase == "Active"


def scale_quantity(quantity: str, factor: int) -> str:
    """Multiply a Kubernetes quantity exactly, keeping its suffix ("224Gi" x 8 -> "1792Gi")."""
    match = re.fullmatch(QUANTITY_PATTERN, quantity)
    if match is None:
        raise ValueError(f"unsupported quantity {quantity!r}")
    suffix = match.group(2) or ""
    number = Decimal(quantity.removesuffix(suffix)) * factor
    text = format(number.normalize(), "f") if number else "0"
    return f"{text}{suffix}"


def managed_labels(allocation: str, spec: GpuAllocationSpec) -> dict[str, str]:
    return {
        MANAGED_LABEL: "true",
        ALLOCATION_LABEL: allocation,
        TENANT_LABEL: spec.tenant.name,
        POOL_LABEL: spec.pool,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def desired_namespace(allocation: str, spec: GpuAllocationSpec, *, released: bool = False) -> dict[str, Any]:
    """The tenant Namespace. `released` marks a Retained namespace whose allocation is gone."""
    labels = managed_labels(allocation, spec) | {
        "pod-security.kubernetes.io/enforce": "baseline",
        "pod-security.kubernetes.io/enforce-version": "latest",
        "pod-security.kubernetes.io/warn": "baseline",
    }
    if released:
        labels[RELEASED_LABEL] = "true"
    # Free text goes to annotations: label values cannot hold spaces or Korean text.
    annotations = {
        "gpuaas.io/organization": spec.tenant.organization,
        "gpuaas.io/contact": spec.tenant.contact,
        "gpuaas.io/contract": spec.tenant.contract,
    }
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": spec.target_namespace, "labels": labels, "annotations": annotations},
    }


def pods_cap(gpus: int) -> int:
    return min(max(gpus * PODS_PER_GPU, PODS_FLOOR), PODS_CEILING)


def desired_resource_quota(
    allocation: str, spec: GpuAllocationSpec, *, is_open: bool, gpu_items: GpuQuotaItems = GpuQuotaItems()
) -> dict[str, Any]:
    """The ResourceQuota: granted GPUs when open, 0 otherwise; CPU/memory scaled by the GPUs."""
    scale = spec.gpus if is_open else CLOSED_ALLOWANCE_GPUS
    hard = {
        **dict.fromkeys(gpu_items.closed, "0"),
        gpu_items.granted: str(spec.gpus if is_open else 0),
        "requests.cpu": scale_quantity(spec.resources_per_gpu.cpu, scale),
        "requests.memory": scale_quantity(spec.resources_per_gpu.memory, scale),
        "pods": str(pods_cap(spec.gpus)),
        # Tenants may not expose services outside the cluster from shared GPU nodes.
        "services.loadbalancers": "0",
        "services.nodeports": "0",
    }
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {
            "name": QUOTA_NAME,
            "namespace": spec.target_namespace,
            "labels": managed_labels(allocation, spec),
        },
        "spec": {"hard": hard},
    }


def desired_limit_range(allocation: str, spec: GpuAllocationSpec) -> dict[str, Any]:
    """Default requests for containers that set none, so quota'd namespaces still accept them."""
    return {
        "apiVersion": "v1",
        "kind": "LimitRange",
        "metadata": {
            "name": LIMIT_RANGE_NAME,
            "namespace": spec.target_namespace,
            "labels": managed_labels(allocation, spec),
        },
        "spec": {
            "limits": [
                {
                    "type": "Container",
                    "defaultRequest": {
                        "cpu": DEFAULT_CONTAINER_CPU_REQUEST,
                        "memory": DEFAULT_CONTAINER_MEMORY_REQUEST,
                    },
                }
            ]
        },
    }


def rbac_subject(owner: Owner, namespace: str) -> dict[str, str]:
    if owner.kind == "ServiceAccount":
        return {"kind": "ServiceAccount", "name": owner.name, "namespace": owner.namespace or namespace}
    return {"kind": owner.kind, "name": owner.name, "apiGroup": "rbac.authorization.k8s.io"}


def desired_owner_binding(allocation: str, spec: GpuAllocationSpec) -> dict[str, Any]:
    """One RoleBinding giving every owner the ClusterRole admin in the namespace (fixed name, so
    drift repair is one apply; the subjects list is atomic, so removed owners lose access)."""
    namespace = spec.target_namespace
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {
            "name": OWNERS_BINDING_NAME,
            "namespace": namespace,
            "labels": managed_labels(allocation, spec),
        },
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": OWNER_CLUSTER_ROLE},
        "subjects": [rbac_subject(owner, namespace) for owner in spec.owners],
    }


def desired_tenant_objects(
    allocation: str, spec: GpuAllocationSpec, phase: Phase, gpu_items: GpuQuotaItems = GpuQuotaItems()
) -> list[dict[str, Any]]:
    """Everything to apply for an allocation in `phase`, Namespace first."""
    return [
        desired_namespace(allocation, spec),
        desired_resource_quota(allocation, spec, is_open=quota_open(phase), gpu_items=gpu_items),
        desired_limit_range(allocation, spec),
        desired_owner_binding(allocation, spec),
    ]


def tenant_object_keys(namespace: str) -> list[tuple[str, str, str]]:
    """(kind, namespace, name) of the objects gpuaas keeps in a tenant namespace: Namespace, ResourceQuota,
    LimitRange, the owners' RoleBinding, in that order."""
    return [
        ("Namespace", "", namespace),
        ("ResourceQuota", namespace, QUOTA_NAME),
        ("LimitRange", namespace, LIMIT_RANGE_NAME),
        ("RoleBinding", namespace, OWNERS_BINDING_NAME),
    ]
