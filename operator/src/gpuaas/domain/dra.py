"""Dynamic Resource Allocation: which GPUs a node publishes, and which ResourceClaims a tenant may make.

A pool with `spec.dra` hands out its GPUs as devices of one DeviceClass. Its nodes' capacity is what the driver
publishes in ResourceSlices (a DRA node has no `nvidia.com/gpu` allocatable), and a tenant's claims may name only
that class, a counted number of devices, without admin access.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
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


# On a pod of a DRA pool: {"<pod claim name>": devices} of the claims its templates make, fixed at admission. The
# ledger bills the pod for their sum, like nvidia.com/gpu; gpuaas alone writes it (tenants cannot change it).
DRA_GPUS_ANNOTATION = "gpuaas.io/dra-gpus"
# On a pod of a DRA pool: {"<claim uid>": devices} of the ResourceClaims it shares with other pods (named by
# resourceClaimName), fixed at admission. The ledger bills each such claim once, over the union of its pods' lives.
SHARED_CLAIMS_ANNOTATION = "gpuaas.io/dra-shared-claims"
# The annotation the control plane's claim controller puts on a claim it makes from a pod's template.
POD_CLAIM_NAME_ANNOTATION = "resource.kubernetes.io/pod-claim-name"


def claim_devices(claim_spec: Mapping[str, Any]) -> int:
    """Devices a claim spec asks for: the counts of its requests (ExactCount, 1 by default; the fence refuses All
    and firstAvailable, so this is what the scheduler allocates)."""
    requests = (claim_spec.get("devices") or {}).get("requests") or []
    return sum(int((request.get("exactly") or {}).get("count", 1)) for request in requests)


@dataclass(frozen=True)
class SharedClaim:
    """A ResourceClaim a tenant made for its pods to share (not one made from a pod's template)."""

    name: str
    uid: str
    devices: int


def shared_claim(claim: Mapping[str, Any]) -> SharedClaim | None:
    metadata = claim.get("metadata") or {}
    if any(o.get("kind") == "Pod" for o in metadata.get("ownerReferences") or []):
        return None  # made from a pod's template: that pod's own
    return SharedClaim(
        str(metadata.get("name", "")), str(metadata.get("uid", "")), claim_devices(claim.get("spec") or {})
    )


def pod_shared_claims(spec: Mapping[str, Any], claims: Mapping[str, SharedClaim]) -> dict[str, int]:
    """The shared claims the pod names that exist, by uid, with their devices."""
    found: dict[str, int] = {}
    for entry in spec.get("resourceClaims") or []:
        claim = claims.get(str(entry.get("resourceClaimName") or ""))
        if claim is not None:
            found[claim.uid] = claim.devices
    return found


@dataclass(frozen=True)
class ClaimTemplate:
    """A ResourceClaimTemplate of a tenant namespace, and the devices each claim made from it asks for."""

    name: str
    devices: int


def claim_template(template: Mapping[str, Any]) -> ClaimTemplate:
    name = str((template.get("metadata") or {}).get("name", ""))
    return ClaimTemplate(name, claim_devices(((template.get("spec") or {}).get("spec")) or {}))


def pod_claim_devices(spec: Mapping[str, Any], templates: Mapping[str, int]) -> dict[str, int]:
    """The devices of each of the pod's template claims, by the pod's claim name (templates it names that do not
    exist are left out: validation refuses them)."""
    devices: dict[str, int] = {}
    for entry in spec.get("resourceClaims") or []:
        template = entry.get("resourceClaimTemplateName")
        if template and template in templates:
            devices[str(entry.get("name", ""))] = templates[template]
    return devices


def recorded_claim_devices(metadata: Mapping[str, Any]) -> dict[str, int]:
    """The devices of the pod's own (template) claims that admission recorded; {} when absent or not gpuaas's form."""
    return _recorded(metadata, DRA_GPUS_ANNOTATION)


def recorded_shared_claims(metadata: Mapping[str, Any]) -> dict[str, int]:
    """The shared claims (by uid) and their devices that admission recorded on the pod."""
    return _recorded(metadata, SHARED_CLAIMS_ANNOTATION)


def recorded_devices(metadata: Mapping[str, Any]) -> int:
    """Every DRA device recorded on the pod: its own claims' and those of the claims it shares (each in full)."""
    return sum(recorded_claim_devices(metadata).values()) + sum(recorded_shared_claims(metadata).values())


def _recorded(metadata: Mapping[str, Any], annotation: str) -> dict[str, int]:
    text = (metadata.get("annotations") or {}).get(annotation)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, int) and v >= 0 for v in value.values()):
        return {}
    return {str(k): v for k, v in value.items()}


def encode_claim_devices(devices: Mapping[str, int]) -> str:
    return json.dumps(dict(sorted(devices.items())), separators=(",", ":"))


def pod_claim_problems(
    spec: Mapping[str, Any], templates: Mapping[str, int], claims: Mapping[str, SharedClaim], pool: str
) -> list[str]:
    """Claims a pod of a DRA pool may use: ones that exist now in its namespace (its own, made from a template, or
    one it shares), so that the devices it bills are known at admission."""
    problems = []
    for entry in spec.get("resourceClaims") or []:
        name = entry.get("name", "")
        template = entry.get("resourceClaimTemplateName")
        claim = entry.get("resourceClaimName")
        if claim and claim not in claims:
            problems.append(
                f"spec.resourceClaims[{name}] names ResourceClaim {claim}, which does not exist in pool {pool}'s "
                "namespace yet: create it first (gpuaas bills the devices it asks for)"
            )
        elif template and template not in templates:
            problems.append(
                f"spec.resourceClaims[{name}] names ResourceClaimTemplate {template}, which does not exist in pool "
                f"{pool}'s namespace yet: create it first (gpuaas bills the devices it asks for)"
            )
    return problems


def generated_claim_problems(claim: Mapping[str, Any], recorded: Mapping[str, int] | None) -> list[str]:
    """A claim the control plane makes from a pod's template must ask for what the pod was admitted (and is billed)
    for; a template deleted and made again with more devices in between would otherwise go unbilled. `recorded` is
    the owning pod's record, None when the pod is not known (yet)."""
    metadata = claim.get("metadata") or {}
    pod_claim = (metadata.get("annotations") or {}).get(POD_CLAIM_NAME_ANNOTATION)
    owner = next(
        (o for o in metadata.get("ownerReferences") or [] if o.get("kind") == "Pod" and o.get("controller")), None
    )
    if owner is None or pod_claim is None:
        return []  # not made for a pod: a tenant's own claim, checked like any other
    devices = claim_devices(claim.get("spec") or {})
    if recorded is None:
        return [f"pod {owner.get('name')} of this claim is not known to gpuaas yet; the claim controller retries"]
    if recorded.get(pod_claim) != devices:
        return [
            f"claim {pod_claim} of pod {owner.get('name')} asks for {devices} devices, but the pod was admitted for "
            f"{recorded.get(pod_claim, 0)}: its template changed after the pod was created; delete the pod"
        ]
    return []


def replaced_shared_claim_problems(claim: str, users: Sequence[str]) -> list[str]:
    """A shared claim made again under the name that unfinished pods were admitted for would reach them with other
    devices than they are billed for."""
    if not users:
        return []
    return [
        f"pods {', '.join(users)} were admitted for an earlier ResourceClaim {claim} and are billed for its devices; "
        "make the new claim under another name, or delete those pods first"
    ]
