"""Admission webhooks served by the operator: the pool fence for pods, and guards for managed objects.

The API server calls these only for namespaces labelled gpuaas.io/managed=true (namespaceSelector).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jsonpatch
import kopf

from gpuaas.api.allocation import ALLOCATION_LABEL, ALLOCATION_PLURAL, GpuAllocationSpec, is_reserved_namespace
from gpuaas.api.common import GROUP, VERSION
from gpuaas.domain.fence import Fence, mutate_pod, validate_pod
from gpuaas.domain.guard import Requester, managed_change_problem, unfenced_pod_problems

logger = logging.getLogger("gpuaas.fence")


def _fence_for(namespace: str | None, indexes: dict[str, kopf.Index[Any, Any]]) -> Fence | None:
    """The fence of the allocation that owns the namespace (the oldest claim), or None if released."""
    claims = sorted(indexes["allocations_by_namespace"].get(namespace or "", []))
    pools = _other_pools(indexes)
    if not claims:
        return None
    _created, allocation, pool, exclusive = claims[0]
    return Fence(
        pool=pool,
        node_selector=pools.get(pool, {}),
        exclusive_label=(ALLOCATION_LABEL, allocation) if exclusive else None,
        other_pools={name: selector for name, selector in pools.items() if name != pool},
    )


def _other_pools(indexes: dict[str, kopf.Index[Any, Any]]) -> dict[str, dict[str, str]]:
    return {name: selector for name, store in indexes["pools_by_name"].items() for selector in store}


def _reject(problems: list[str]) -> None:
    if problems:
        raise kopf.AdmissionError("; ".join(problems), code=403)


@kopf.on.mutate("", "v1", "pods", id="mutate-pods", operations=["CREATE"])
def pin_pod_to_pool(*, body: kopf.Body, namespace: str | None, patch: kopf.Patch, **indexes: Any) -> None:
    fence = _fence_for(namespace, indexes)
    if fence is None:
        return  # a released namespace: validation refuses GPU pods and pool tolerations
    ops = mutate_pod(dict(body), fence)
    # Which replica fenced which pod: an audit trail in the operator's log.
    meta = body.get("metadata") or {}
    logger.info(f"fenced pod {namespace}/{meta.get('name') or meta.get('generateName', '')} to pool {fence.pool}")
    if ops:
        apply_ops: Callable[[Any], Any] = lambda raw: jsonpatch.apply_patch(raw, ops, in_place=True)  # noqa: E731
        patch.fns.append(apply_ops)


@kopf.on.validate("", "v1", "pods", id="validate-pods", operations=["CREATE", "UPDATE"])
def check_pod_fence(*, body: kopf.Body, namespace: str | None, **indexes: Any) -> None:
    operation = str(indexes.get("operation", "CREATE"))
    fence = _fence_for(namespace, indexes)
    if fence is None:
        _reject(unfenced_pod_problems(dict(body), _other_pools(indexes)))
        return
    _reject(validate_pod(dict(body), fence, creating=operation == "CREATE"))


def _requester(userinfo: dict[str, Any]) -> Requester:
    return Requester(username=str(userinfo.get("username", "")), groups=tuple(userinfo.get("groups") or ()))


def guard_managed(kind: str) -> Callable[..., None]:
    def guard(
        *,
        old: kopf.Body | None,
        new: kopf.Body | None,
        operation: str,
        userinfo: dict[str, Any],
        memo: kopf.Memo,
        **_: Any,
    ) -> None:
        problem = managed_change_problem(
            kind,
            operation,
            dict(old) if old is not None else None,
            dict(new) if new is not None else None,
            _requester(userinfo),
            memo.operator_username,
        )
        if problem:
            raise kopf.AdmissionError(problem, code=403)

    guard.__name__ = f"guard_{kind.lower()}"
    return guard


_GUARDED = (
    ("", "v1", "namespaces", "Namespace", None),
    ("", "v1", "namespaces", "Namespace", "status"),
    ("", "v1", "namespaces", "Namespace", "finalize"),
    ("", "v1", "resourcequotas", "ResourceQuota", None),
    ("", "v1", "limitranges", "LimitRange", None),
    ("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", None),
)
for _group, _version, _plural, _kind, _subresource in _GUARDED:
    _guard = guard_managed(_kind)
    # kopf skips DELETE for handlers that also take other operations, so DELETE gets its own registration.
    kopf.on.validate(
        _group, _version, _plural, id="validate-managed", operations=["CREATE", "UPDATE"], subresource=_subresource
    )(_guard)
    kopf.on.validate(_group, _version, _plural, id="validate-managed", operations=["DELETE"], subresource=_subresource)(
        _guard
    )


@kopf.on.validate(GROUP, VERSION, ALLOCATION_PLURAL, id="validate-allocations", operations=["CREATE", "UPDATE"])
def check_allocation(*, name: str | None, spec: kopf.Spec, **indexes: Any) -> None:
    """Early, clear errors for what the schema cannot know: pools and namespaces that exist."""
    try:
        parsed = GpuAllocationSpec.model_validate(dict(spec))
    except ValueError as error:
        raise kopf.AdmissionError(str(error), code=422) from error
    problems = []
    pools = _other_pools(indexes)
    if parsed.pool not in pools:
        known = ", ".join(sorted(pools)) or "none"
        problems.append(f"spec.pool: pool {parsed.pool!r} does not exist (pools: {known})")
    namespace = parsed.target_namespace
    if is_reserved_namespace(namespace):
        problems.append(f"spec.namespace: {namespace} is a system namespace")
    claims = [c for c in indexes["allocations_by_namespace"].get(namespace, []) if c[1] != name]
    if claims:
        problems.append(f"spec.namespace: namespace {namespace} already belongs to allocation {claims[0][1]}")
    labels = next(iter(indexes["namespace_labels"].get(namespace, [])), None)
    if (labels is not None and labels.get(ALLOCATION_LABEL) not in (None, name)) or (
        labels is not None and ALLOCATION_LABEL not in labels
    ):
        problems.append(
            f"spec.namespace: namespace {namespace} already exists and is not managed by gpuaas for this allocation"
        )
    if problems:
        raise kopf.AdmissionError("; ".join(problems), code=422)
