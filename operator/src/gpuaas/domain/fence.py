"""The pool fence: admission decisions for pods in a managed namespace.

`mutate_pod` runs on CREATE and pins the pod to its pool (nodeSelector, toleration of the pool
taint, and the allocation's node label and taint when nodes are exclusive), sets NVIDIA_VISIBLE_DEVICES=void
on every container that requests no GPU, and adds the usage finalizer to GPU pods. `validate_pod` runs
after mutation, on the final pod, and rejects what would let a pod escape the fence (also NVIDIA_* device
variables a tenant sets itself). Validation accepts every pod that mutation produced, so the two can run
in either webhook order.

Pod placement fields are immutable after creation, except that tolerations may be added; on UPDATE
call `validate_pod(..., creating=False)`, which allows the nodeName the scheduler sets by binding.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpuaas.api.allocation import ALLOCATION_LABEL
from gpuaas.api.pool import POOL_LABEL
from gpuaas.domain.dra import (
    DRA_GPUS_ANNOTATION,
    SHARED_CLAIMS_ANNOTATION,
    SharedClaim,
    encode_claim_devices,
    pod_claim_devices,
    pod_claim_problems,
    pod_shared_claims,
    recorded_claim_devices,
    recorded_devices,
    recorded_shared_claims,
)

GPU_RESOURCE = "nvidia.com/gpu"
USAGE_FINALIZER = "gpuaas.io/usage-ledger"
FENCE_TAINT_EFFECT = "NoSchedule"

JsonPatch = list[dict[str, Any]]

# NVIDIA's container stack gives a container the GPUs its NVIDIA_VISIBLE_DEVICES names, whatever it requested; "void"
# means none. Containers that request no GPU get "void" explicitly: an env entry beats the image's ENV and envFrom.
VISIBLE_DEVICES_ENV = "NVIDIA_VISIBLE_DEVICES"
NO_DEVICES = "void"
# Variables the NVIDIA container toolkit reads to expose devices (GPUs, MIG control, IMEX channels, NVSwitch,
# GDRCopy, GDS, MOFED); only the device plugin may set them, from what was counted and allocated.
DEVICE_ENV = frozenset(
    {
        VISIBLE_DEVICES_ENV,
        "NVIDIA_MIG_CONFIG_DEVICES",
        "NVIDIA_MIG_MONITOR_DEVICES",
        "NVIDIA_IMEX_CHANNELS",
        "NVIDIA_NVSWITCH",
        "NVIDIA_GDRCOPY",
        "NVIDIA_GDS",
        "NVIDIA_MOFED",
    }
)
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


DEFAULT_MAX_GRACE_SECONDS = 300


@dataclass(frozen=True)
class PoolRules:
    """What the fence enforces for one pool, from its GpuPool spec."""

    node_selector: Mapping[str, str]
    allowed_priority_classes: frozenset[str] = frozenset()
    max_grace_seconds: int = DEFAULT_MAX_GRACE_SECONDS
    # The DRA DeviceClass of the pool's GPUs; None when they are the device plugin's nvidia.com/gpu.
    device_class: str | None = None


@dataclass(frozen=True)
class Fence:
    """Where the pods of one allocation may run."""

    pool: str
    node_selector: Mapping[str, str]
    # (key, value) of the node label and taint that reserve exclusive nodes, e.g. (gpuaas.io/allocation, name).
    exclusive_label: tuple[str, str] | None = None
    # Every other pool's name and nodeSelector.
    other_pools: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    taint_key: str = POOL_LABEL
    allowed_priority_classes: frozenset[str] = frozenset()
    max_grace_seconds: int = DEFAULT_MAX_GRACE_SECONDS
    device_class: str | None = None
    # ResourceClaimTemplates of the namespace -> the devices each asks for (DRA pools).
    claim_templates: Mapping[str, int] = field(default_factory=dict)
    # ResourceClaims of the namespace that pods may share, by name (DRA pools).
    shared_claims: Mapping[str, SharedClaim] = field(default_factory=dict)

    @property
    def labels(self) -> dict[str, str]:
        """Node labels every pod must select."""
        labels = dict(self.node_selector)
        if self.exclusive_label is not None:
            labels[self.exclusive_label[0]] = self.exclusive_label[1]
        return labels

    @property
    def taints(self) -> dict[str, str]:
        """Taints (key -> value, effect NoSchedule) every pod must tolerate."""
        taints = {self.taint_key: self.pool}
        if self.exclusive_label is not None:
            taints[self.exclusive_label[0]] = self.exclusive_label[1]
        return taints

    @property
    def guarded_keys(self) -> frozenset[str]:
        """Label keys tenants may only use to select this fence's own nodes."""
        keys = set(self.labels) | {self.taint_key, ALLOCATION_LABEL}
        for selector in self.other_pools.values():
            keys.update(selector)
        return frozenset(keys)


def _pointer(token: str) -> str:
    """Escape one JSON Pointer token (RFC 6901)."""
    return token.replace("~", "~0").replace("/", "~1")


def parse_gpu_count(value: object) -> int:
    """A whole-GPU quantity ("8", 8, "1k"); fractions are invalid for extended resources."""
    if isinstance(value, bool):
        raise ValueError(f"invalid {GPU_RESOURCE} quantity {value!r}")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    match = re.fullmatch(r"([0-9]+)(k|M|G)?", text)
    if match is None:
        raise ValueError(f"invalid {GPU_RESOURCE} quantity {value!r}: GPUs are counted in whole numbers")
    multiplier = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9}[match.group(2) or ""]
    return int(match.group(1)) * multiplier


def container_gpus(container: Mapping[str, Any]) -> int:
    """A container's GPU request; for extended resources an unset request defaults to the limit."""
    resources = container.get("resources") or {}
    requests = resources.get("requests") or {}
    limits = resources.get("limits") or {}
    if GPU_RESOURCE in requests:
        return parse_gpu_count(requests[GPU_RESOURCE])
    if GPU_RESOURCE in limits:
        return parse_gpu_count(limits[GPU_RESOURCE])
    return 0


def pod_gpus(pod: Mapping[str, Any]) -> int:
    """The pod's effective GPU request as the scheduler computes it.

    max(sum of app containers + restartable init (sidecar) containers, peak of the init sequence),
    where each regular init container runs alongside the sidecars started before it.
    """
    spec = pod.get("spec") or {}
    sidecars = 0
    init_peak = 0
    for container in spec.get("initContainers") or []:
        gpus = container_gpus(container)
        if container.get("restartPolicy") == "Always":
            sidecars += gpus
            init_peak = max(init_peak, sidecars)
        else:
            init_peak = max(init_peak, sidecars + gpus)
    app = sum(container_gpus(c) for c in spec.get("containers") or [])
    return max(app + sidecars, init_peak)


def _tolerates(toleration: Mapping[str, Any], key: str, value: str) -> bool:
    """Whether a toleration already covers the NoSchedule taint key=value the fence adds."""
    operator = toleration.get("operator") or "Equal"
    effect = toleration.get("effect") or ""
    return (
        toleration.get("key") == key
        and operator == "Equal"
        and (toleration.get("value") or "") == value
        and effect in ("", FENCE_TAINT_EFFECT)
    )


def mutate_pod(pod: Mapping[str, Any], fence: Fence) -> JsonPatch:
    """JSON Patch ops that pin the pod to the fence and add the usage finalizer to GPU pods."""
    spec = pod.get("spec") or {}
    patch: JsonPatch = []

    selector = spec.get("nodeSelector")
    if not selector:
        patch.append({"op": "add", "path": "/spec/nodeSelector", "value": fence.labels})
    else:
        for key, value in fence.labels.items():
            if key not in selector:
                patch.append({"op": "add", "path": f"/spec/nodeSelector/{_pointer(key)}", "value": value})
            elif selector[key] != value:
                patch.append({"op": "replace", "path": f"/spec/nodeSelector/{_pointer(key)}", "value": value})

    tolerations = spec.get("tolerations")
    missing = [
        {"key": key, "operator": "Equal", "value": value, "effect": FENCE_TAINT_EFFECT}
        for key, value in fence.taints.items()
        if not any(_tolerates(t, key, value) for t in tolerations or [])
    ]
    if missing and tolerations is None:
        patch.append({"op": "add", "path": "/spec/tolerations", "value": missing})
    else:
        patch.extend({"op": "add", "path": "/spec/tolerations/-", "value": t} for t in missing)

    patch.extend(_hide_devices(spec))

    metadata = pod.get("metadata") or {}
    claimed = pod_claim_devices(spec, fence.claim_templates) if fence.device_class else {}
    shared = pod_shared_claims(spec, fence.shared_claims) if fence.device_class else {}
    patch.extend(_record_devices(metadata, {DRA_GPUS_ANNOTATION: claimed, SHARED_CLAIMS_ANNOTATION: shared}))
    if _safe_pod_gpus(pod) > 0 or sum(claimed.values()) > 0 or shared:
        finalizers = metadata.get("finalizers")
        if finalizers is None:
            patch.append({"op": "add", "path": "/metadata/finalizers", "value": [USAGE_FINALIZER]})
        elif USAGE_FINALIZER not in finalizers:
            patch.append({"op": "add", "path": "/metadata/finalizers/-", "value": USAGE_FINALIZER})
    return patch


def _record_devices(metadata: Mapping[str, Any], records: Mapping[str, Mapping[str, int]]) -> JsonPatch:
    """Set (or remove) gpuaas's records of the pod's DRA devices (annotation -> devices), replacing whatever the pod
    came with."""
    annotations = metadata.get("annotations")
    wanted = {annotation: encode_claim_devices(devices) for annotation, devices in records.items() if devices}
    if annotations is None:
        return [{"op": "add", "path": "/metadata/annotations", "value": wanted}] if wanted else []
    patch: JsonPatch = []
    for annotation in records:
        path = f"/metadata/annotations/{_pointer(annotation)}"
        if annotation in wanted:
            patch.append({"op": "add", "path": path, "value": wanted[annotation]})
        elif annotation in annotations:
            patch.append({"op": "remove", "path": path})
    return patch


def _requests_gpus(container: Mapping[str, Any]) -> bool:
    try:
        return container_gpus(container) > 0
    except ValueError:
        return False  # validate_pod rejects the malformed quantity


def _hide_devices(spec: Mapping[str, Any]) -> JsonPatch:
    """NVIDIA_VISIBLE_DEVICES=void for every container that requests no GPU (and sets no such variable itself:
    validation refuses that)."""
    patch: JsonPatch = []
    forced = {"name": VISIBLE_DEVICES_ENV, "value": NO_DEVICES}
    for kind in CONTAINER_LISTS:
        for index, container in enumerate(spec.get(kind) or []):
            if _requests_gpus(container):
                continue
            env = container.get("env")
            if env is None:
                patch.append({"op": "add", "path": f"/spec/{kind}/{index}/env", "value": [forced]})
            elif not any(entry.get("name") == VISIBLE_DEVICES_ENV for entry in env):
                patch.append({"op": "add", "path": f"/spec/{kind}/{index}/env/-", "value": forced})
    return patch


def hide_devices_from_ephemeral_containers(pod: Mapping[str, Any]) -> JsonPatch:
    """`kubectl debug` adds ephemeral containers to a running pod (the pods/ephemeralcontainers subresource): they
    request no GPU, so they get NVIDIA_VISIBLE_DEVICES=void like any other such container."""
    return [op for op in _hide_devices(pod.get("spec") or {}) if op["path"].startswith("/spec/ephemeralContainers/")]


def _device_env_problems(spec: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    for kind in CONTAINER_LISTS:
        for container in spec.get(kind) or []:
            where = f"spec.{kind}[{container.get('name', '')}]"
            gpus = _requests_gpus(container)
            for entry in container.get("env") or []:
                name = entry.get("name") or ""
                if name not in DEVICE_ENV:
                    continue
                if not gpus and entry == {"name": VISIBLE_DEVICES_ENV, "value": NO_DEVICES}:
                    continue  # the fence's own entry
                problems.append(
                    f"{where}.env sets {name}, which makes NVIDIA's container runtime expose devices that were not "
                    f"requested; remove it and request {GPU_RESOURCE} instead (the device plugin sets it)"
                )
            if gpus:
                for source in container.get("envFrom") or []:
                    prefix = source.get("prefix") or ""
                    if not prefix or prefix.startswith("NVIDIA_") or "NVIDIA_".startswith(prefix):
                        problems.append(
                            f"{where}.envFrom without a safe prefix could set {VISIBLE_DEVICES_ENV} and override the "
                            f"GPUs the device plugin allocated; give it a prefix such as APP_"
                        )
    return problems


# Annotation domains through which a container runtime hands devices to a container without any resource request:
# containerd and CRI-O inject CDI devices named in `cdi.k8s.io/*` pod annotations, NRI plugins devices named in
# `*.nri.io` ones (cdi-devices.nri.io, devices.nri.io). NVIDIA's CDI spec then exposes any GPU of the node.
DEVICE_ANNOTATION_DOMAINS = ("cdi.k8s.io", "nri.io")
# NVIDIA's other extended resources (MIG slices such as nvidia.com/mig-1g.18gb, time-sliced nvidia.com/gpu.shared)
# are GPUs the quota and the ledger do not count.
NVIDIA_RESOURCE_DOMAIN = "nvidia.com/"


def _device_annotation_problems(metadata: Mapping[str, Any], before: Mapping[str, Any] | None) -> list[str]:
    """On an update, only annotations it adds or changes: a pod admitted earlier can still be released."""
    annotations = metadata.get("annotations") or {}
    unchanged = (before or {}).get("annotations") or {}
    problems = []
    for key in sorted(k for k, v in annotations.items() if unchanged.get(k) != v):
        domain = key.split("/", 1)[0]  # `devices.nri.io` alone is a pod-wide key too
        if any(domain == d or domain.endswith(f".{d}") for d in DEVICE_ANNOTATION_DOMAINS):
            problems.append(
                f"metadata.annotations[{key}] asks the container runtime for devices outside any resource "
                f"request; remove it and request {GPU_RESOURCE} instead"
            )
    return problems


def _resource_problems(pod: Mapping[str, Any], fence: Fence) -> list[str]:
    """GPUs only as whole nvidia.com/gpu, or in a DRA pool as devices of its own claims, which the quota and the
    ledger count."""
    spec = pod.get("spec") or {}
    problems = []
    for kind in CONTAINER_LISTS:
        for container in spec.get(kind) or []:
            resources = container.get("resources") or {}
            names = set(resources.get("requests") or {}) | set(resources.get("limits") or {})
            for name in sorted(names):
                if name.startswith(NVIDIA_RESOURCE_DOMAIN) and name != GPU_RESOURCE:
                    problems.append(
                        f"spec.{kind}[{container.get('name', '')}] requests {name}, which this grant's quota and "
                        f"usage ledger do not count; request whole GPUs as {GPU_RESOURCE}"
                    )
    if fence.device_class is None:
        if spec.get("resourceClaims"):
            problems.append(
                f"spec.resourceClaims: pool {fence.pool} grants GPUs as {GPU_RESOURCE}, not through DRA "
                "ResourceClaims; remove the claims and request the GPUs in the containers' resources"
            )
        return problems
    problems.extend(pod_claim_problems(spec, fence.claim_templates, fence.shared_claims, fence.pool))
    metadata = pod.get("metadata") or {}
    records = (
        (DRA_GPUS_ANNOTATION, recorded_claim_devices(metadata), pod_claim_devices(spec, fence.claim_templates)),
        (SHARED_CLAIMS_ANNOTATION, recorded_shared_claims(metadata), pod_shared_claims(spec, fence.shared_claims)),
    )
    for annotation, recorded, expected in records:
        if not problems and recorded != expected:
            problems.append(
                f"metadata.annotations[{annotation}] is gpuaas's record of the pod's DRA devices and does not "
                "match its claims; remove it (gpuaas writes it)"
            )
    return problems


def _safe_pod_gpus(pod: Mapping[str, Any]) -> int:
    try:
        return pod_gpus(pod)
    except ValueError:
        return 0  # validate_pod rejects the malformed quantity


def validate_pod(
    pod: Mapping[str, Any], fence: Fence, *, creating: bool = True, previous: Mapping[str, Any] | None = None
) -> list[str]:
    """Why the pod may not run in the fenced namespace (or take this update); empty when it may."""
    spec = pod.get("spec") or {}
    problems: list[str] = []
    if creating and spec.get("nodeName"):
        problems.append(
            f"spec.nodeName ({spec['nodeName']}) is not allowed in a gpuaas namespace: remove it and let "
            f"the scheduler place the pod on pool {fence.pool}"
        )
    problems.extend(_toleration_problems(spec.get("tolerations") or [], fence))
    problems.extend(_node_selector_problems(spec.get("nodeSelector") or {}, fence))
    problems.extend(_affinity_problems(spec.get("affinity") or {}, fence))
    problems.extend(_device_env_problems(spec))
    before = (previous or {}).get("metadata") if not creating else None
    problems.extend(_device_annotation_problems(pod.get("metadata") or {}, before))
    if creating:  # resources and claims cannot change afterwards
        problems.extend(_resource_problems(pod, fence))
    problems.extend(_priority_problems(spec, fence))
    try:
        gpus = pod_gpus(pod)
    except ValueError as error:
        problems.append(str(error))
        gpus = 0
    gpus += recorded_devices(pod.get("metadata") or {})
    grace = spec.get("terminationGracePeriodSeconds")
    if gpus and grace is not None and int(grace) > fence.max_grace_seconds:
        problems.append(
            f"spec.terminationGracePeriodSeconds {grace} is longer than pool {fence.pool} allows for GPU pods "
            f"({fence.max_grace_seconds}s): the GPUs would stay held that long after a delete, expiry or reclaim"
        )
    return problems


def _priority_problems(spec: Mapping[str, Any], fence: Fence) -> list[str]:
    """Priority decides preemption: a tenant with a higher class could evict other tenants' pods on shared nodes."""
    name = spec.get("priorityClassName")
    if not name or name in fence.allowed_priority_classes:
        return []
    allowed = ", ".join(sorted(fence.allowed_priority_classes)) or "none"
    return [
        f"spec.priorityClassName {name} is not allowed in pool {fence.pool} (allowed: {allowed}); "
        "ask the program office, which sets the pool's allowedPriorityClasses"
    ]


def _toleration_problems(tolerations: list[Mapping[str, Any]], fence: Fence) -> list[str]:
    problems: list[str] = []
    allowed = fence.taints
    reserved = {fence.taint_key, ALLOCATION_LABEL} | set(allowed)
    for index, toleration in enumerate(tolerations):
        key = toleration.get("key") or ""
        operator = toleration.get("operator") or "Equal"
        where = f"spec.tolerations[{index}]"
        if not key and operator == "Exists":
            problems.append(
                f"{where} tolerates every taint (operator Exists without a key), which would let the pod "
                f"onto other pools' nodes; tolerate specific taints instead (gpuaas adds "
                f"{fence.taint_key}={fence.pool}:{FENCE_TAINT_EFFECT} itself)"
            )
        elif key in reserved and operator == "Exists":
            problems.append(
                f"{where} tolerates {key} with any value; gpuaas adds the toleration for pool "
                f"{fence.pool} itself, remove this one"
            )
        elif key in reserved and (toleration.get("value") or "") != allowed.get(key):
            problems.append(
                f"{where} tolerates {key}={toleration.get('value') or ''}, which is not this namespace's "
                f"{'pool ' + fence.pool if key == fence.taint_key else 'node reservation'}; remove it"
            )
    return problems


def _pool_of(key: str, value: str, fence: Fence) -> str | None:
    for pool, selector in sorted(fence.other_pools.items()):
        if selector.get(key) == value:
            return pool
    return None


def _node_selector_problems(selector: Mapping[str, str], fence: Fence) -> list[str]:
    problems: list[str] = []
    labels = fence.labels
    for key, value in sorted(selector.items()):
        if key not in fence.guarded_keys:
            continue
        if key in labels:
            if value != labels[key]:
                problems.append(
                    f"spec.nodeSelector {key}={value} contradicts the fence of pool {fence.pool} "
                    f"({key}={labels[key]}); remove it, gpuaas sets it"
                )
            continue
        other = _pool_of(key, value, fence)
        if other is not None or key in (fence.taint_key, ALLOCATION_LABEL):
            target = f"pool {other}" if other else "nodes reserved for another allocation"
            problems.append(
                f"spec.nodeSelector {key}={value} targets {target}; this namespace may only use pool {fence.pool}"
            )
    return problems


def _affinity_problems(affinity: Mapping[str, Any], fence: Fence) -> list[str]:
    node_affinity = affinity.get("nodeAffinity") or {}
    expressions: list[tuple[str, Mapping[str, Any]]] = []
    required = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    for t, term in enumerate(required.get("nodeSelectorTerms") or []):
        for e, expression in enumerate(term.get("matchExpressions") or []):
            where = f"requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[{t}].matchExpressions[{e}]"
            expressions.append((where, expression))
    preferred = node_affinity.get("preferredDuringSchedulingIgnoredDuringExecution") or []
    for p, weighted in enumerate(preferred):
        for e, expression in enumerate((weighted.get("preference") or {}).get("matchExpressions") or []):
            where = f"preferredDuringSchedulingIgnoredDuringExecution[{p}].preference.matchExpressions[{e}]"
            expressions.append((where, expression))

    problems: list[str] = []
    labels = fence.labels
    for where, expression in expressions:
        key = expression.get("key") or ""
        if key not in fence.guarded_keys:
            continue
        # Conservative: the only use of a fence key is selecting exactly this fence's value.
        if expression.get("operator") == "In" and key in labels and expression.get("values") == [labels[key]]:
            continue
        allowed = f"'{key} In [{labels[key]}]' or nothing" if key in labels else "nothing"
        problems.append(
            f"spec.affinity.nodeAffinity.{where} uses {key} {expression.get('operator')} "
            f"{expression.get('values') or []}; pods in this namespace are pinned to pool {fence.pool}, "
            f"so on {key} only {allowed} is allowed"
        )
    return problems
