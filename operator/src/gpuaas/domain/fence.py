"""The pool fence: admission decisions for pods in a managed namespace.

`mutate_pod` runs on CREATE and pins the pod to its pool (nodeSelector, toleration of the pool
taint, and the allocation's node label and taint when nodes are exclusive) and adds the usage
finalizer to GPU pods. `validate_pod` runs after mutation, on the final pod, and rejects what would
let a pod escape the fence. Validation accepts every pod that mutation produced, so the two can run
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

GPU_RESOURCE = "nvidia.com/gpu"
USAGE_FINALIZER = "gpuaas.io/usage-ledger"
FENCE_TAINT_EFFECT = "NoSchedule"

JsonPatch = list[dict[str, Any]]


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

    if _safe_pod_gpus(pod) > 0:
        metadata = pod.get("metadata") or {}
        finalizers = metadata.get("finalizers")
        if finalizers is None:
            patch.append({"op": "add", "path": "/metadata/finalizers", "value": [USAGE_FINALIZER]})
        elif USAGE_FINALIZER not in finalizers:
            patch.append({"op": "add", "path": "/metadata/finalizers/-", "value": USAGE_FINALIZER})
    return patch


def _safe_pod_gpus(pod: Mapping[str, Any]) -> int:
    try:
        return pod_gpus(pod)
    except ValueError:
        return 0  # validate_pod rejects the malformed quantity


def validate_pod(pod: Mapping[str, Any], fence: Fence, *, creating: bool = True) -> list[str]:
    """Why the pod may not run in the fenced namespace; empty when it may."""
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
    try:
        pod_gpus(pod)
    except ValueError as error:
        problems.append(str(error))
    return problems


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
