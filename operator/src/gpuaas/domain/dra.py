"""Dynamic Resource Allocation: which GPUs a node publishes, and which ResourceClaims a tenant may make.

A pool with `spec.dra` hands out its GPUs as devices of one DeviceClass. Its nodes' capacity is what the driver
publishes in ResourceSlices (a DRA node has no `nvidia.com/gpu` allocatable), and a tenant's claims may name only
that class, a counted number of devices, without admin access.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

CLAIM_KINDS = ("ResourceClaim", "ResourceClaimTemplate")


@dataclass(frozen=True)
class PublishedDevices:
    """One ResourceSlice of a node: `devices` of `driver` in generation `generation` of the driver's pool."""

    slice_name: str
    node: str
    driver: str
    pool: str
    generation: int
    devices: int


def published_devices(resource_slice: Mapping[str, Any]) -> PublishedDevices | None:
    """A node-local ResourceSlice reduced to its device count; None for slices not tied to one node."""
    spec = resource_slice.get("spec") or {}
    node = spec.get("nodeName")
    if not node:
        return None
    pool = spec.get("pool") or {}
    return PublishedDevices(
        slice_name=str((resource_slice.get("metadata") or {}).get("name", "")),
        node=str(node),
        driver=str(spec.get("driver", "")),
        pool=str(pool.get("name", "")),
        generation=int(pool.get("generation", 0)),
        devices=len(spec.get("devices") or []),
    )


def node_devices(slices: Iterable[PublishedDevices], driver: str) -> int:
    """Devices the driver publishes on one node: of each of its pools, only the newest generation counts (older
    slices are being replaced, as the DRA scheduler plugin treats them)."""
    newest: dict[str, int] = {}
    counts: dict[tuple[str, int], int] = {}
    for published in slices:
        if published.driver != driver:
            continue
        newest[published.pool] = max(newest.get(published.pool, published.generation), published.generation)
        key = (published.pool, published.generation)
        counts[key] = counts.get(key, 0) + published.devices
    return sum(counts.get((pool, generation), 0) for pool, generation in newest.items())


def _claim_spec(obj: Mapping[str, Any], kind: str) -> tuple[str, Mapping[str, Any]]:
    spec = obj.get("spec") or {}
    if kind == "ResourceClaimTemplate":
        return "spec.spec", spec.get("spec") or {}
    return "spec", spec


def claim_problems(obj: Mapping[str, Any], kind: str, pool: str, device_class: str | None) -> list[str]:
    """Why a tenant's ResourceClaim or ResourceClaimTemplate may not exist in its namespace; empty when it may.

    Only the pool's own DeviceClass, and only a counted number of devices: `allocationMode: All` takes whatever a
    node has, `adminAccess` reaches devices allocated to others, and device tolerations reach devices an
    administrator tainted (for example, failed GPUs)."""
    where, spec = _claim_spec(obj, kind)
    devices = spec.get("devices") or {}
    if device_class is None:
        return [
            f"{kind}s are not allowed here: pool {pool} grants GPUs as nvidia.com/gpu through its device plugin, "
            "not through DRA; request nvidia.com/gpu in the containers' resources instead"
        ]
    problems: list[str] = []
    for index, request in enumerate(devices.get("requests") or []):
        name = request.get("name") or str(index)
        path = f"{where}.devices.requests[{name}]"
        if request.get("firstAvailable"):
            problems.append(
                f"{path}.firstAvailable: name the pool's class {device_class} with a count under `exactly` instead; "
                "the grant counts one class"
            )
            continue
        exact = request.get("exactly") or {}
        problems.extend(_exact_request_problems(exact, f"{path}.exactly", pool, device_class))
    return problems


def _exact_request_problems(request: Mapping[str, Any], path: str, pool: str, device_class: str) -> list[str]:
    problems: list[str] = []
    named = request.get("deviceClassName")
    if named != device_class:
        problems.append(
            f"{path}.deviceClassName {named} is not the GPU class of pool {pool}; claims here may name only "
            f"{device_class}"
        )
    if request.get("allocationMode") == "All":
        problems.append(
            f"{path}.allocationMode All would take every matching device of a node, beyond what the grant counts; "
            "use ExactCount with a count"
        )
    if request.get("adminAccess"):
        problems.append(f"{path}.adminAccess would reach devices allocated to other tenants; remove it")
    if request.get("tolerations"):
        problems.append(f"{path}.tolerations would reach devices an administrator took out of service; remove them")
    return problems
