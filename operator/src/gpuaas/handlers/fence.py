"""Admission webhooks served by the operator: the pool fence for pods, and guards for managed objects.

The API server calls these only for namespaces labelled gpuaas.io/managed=true (namespaceSelector). The handlers
are coroutines that never await, as the indexes are: kopf would run plain functions in its thread pool, and every
admission request would wait for a free thread and the GIL's hand-over there and back.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import jsonpatch
import kopf

from gpuaas.api.allocation import ALLOCATION_LABEL, ALLOCATION_PLURAL, GpuAllocationSpec
from gpuaas.api.common import GROUP, VERSION
from gpuaas.domain.access import binding_problems
from gpuaas.domain.dra import CLAIM_KINDS, claim_problems, generated_claim_problems, replaced_shared_claim_problems
from gpuaas.domain.fence import Fence, PoolRules, hide_devices_from_ephemeral_containers, mutate_pod, validate_pod
from gpuaas.domain.guard import (
    Requester,
    exposure_problems,
    is_trusted,
    managed_change_problem,
    pod_change_problems,
    unfenced_pod_problems,
)
from gpuaas.domain.namespaces import NamespaceClaim, namespace_problem
from gpuaas.domain.tenant import OWNERS_BINDING_NAME

logger = logging.getLogger("gpuaas.fence")


def _fence_for(namespace: str | None, indexes: dict[str, kopf.Index[Any, Any]]) -> Fence | None:
    """The fence of the allocation that owns the namespace (the oldest claim), or None if released."""
    claims: list[NamespaceClaim] = sorted(indexes["allocations_by_namespace"].get(namespace or "", []))
    pools = _pool_selectors(indexes)
    if not claims:
        return None
    owner = claims[0]
    rules: PoolRules = next(iter(indexes["pools_by_name"].get(owner.pool, [])), PoolRules(node_selector={}))
    return Fence(
        pool=owner.pool,
        node_selector=pools.get(owner.pool, {}),
        exclusive_label=(ALLOCATION_LABEL, owner.allocation) if owner.exclusive else None,
        other_pools={name: selector for name, selector in pools.items() if name != owner.pool},
        allowed_priority_classes=rules.allowed_priority_classes,
        max_grace_seconds=rules.max_grace_seconds,
        device_class=rules.device_class,
        claim_templates={t.name: t.devices for t in indexes["claim_templates_by_namespace"].get(namespace or "", [])},
        shared_claims={c.name: c for c in indexes["shared_claims_by_namespace"].get(namespace or "", [])},
    )


def _pool_selectors(indexes: dict[str, kopf.Index[Any, Any]]) -> dict[str, dict[str, str]]:
    return {name: rules.node_selector for name, store in indexes["pools_by_name"].items() for rules in store}


def _reject(problems: list[str]) -> None:
    if problems:
        raise kopf.AdmissionError("; ".join(problems), code=403)


@kopf.on.mutate("", "v1", "pods", id="mutate-pods", operations=["CREATE"])
async def pin_pod_to_pool(*, body: kopf.Body, namespace: str | None, patch: kopf.Patch, **indexes: Any) -> None:
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


@kopf.on.mutate("", "v1", "pods", id="mutate-pods", operations=["UPDATE"], subresource="ephemeralcontainers")
async def hide_devices_from_debug_containers(
    *, body: kopf.Body, namespace: str | None, patch: kopf.Patch, **_: Any
) -> None:
    ops = hide_devices_from_ephemeral_containers(dict(body))
    if ops:
        logger.info(f"ephemeral container in pod {namespace}/{(body.get('metadata') or {}).get('name')}: no devices")
        apply_ops: Callable[[Any], Any] = lambda raw: jsonpatch.apply_patch(raw, ops, in_place=True)  # noqa: E731
        patch.fns.append(apply_ops)


@kopf.on.validate("", "v1", "pods", id="validate-pods", operations=["CREATE", "UPDATE"])
async def check_pod_fence(
    *,
    body: kopf.Body,
    namespace: str | None,
    userinfo: kopf.UserInfo,
    memo: kopf.Memo,
    old: kopf.Body | None = None,
    operation: str = "CREATE",
    **indexes: Any,
) -> None:
    pod = dict(body)
    previous = dict(old) if old is not None else None
    problems = pod_change_problems(previous, pod, _requester(userinfo), memo.operator_username)
    fence = _fence_for(namespace, indexes)
    if fence is None:
        _reject(problems + unfenced_pod_problems(pod, _pool_selectors(indexes)))
        return
    _reject(problems + validate_pod(pod, fence, creating=operation == "CREATE", previous=previous))


# Ephemeral containers come through their own subresource; the same checks apply (tenant device variables refused).
kopf.on.validate("", "v1", "pods", id="validate-pods", operations=["UPDATE"], subresource="ephemeralcontainers")(
    check_pod_fence
)


def _requester(userinfo: Mapping[str, Any]) -> Requester:
    return Requester(username=str(userinfo.get("username", "")), groups=tuple(userinfo.get("groups") or ()))


def _owner_subjects(namespace: str, indexes: dict[str, kopf.Index[Any, Any]]) -> list[dict[str, Any]] | None:
    """The owners gpuaas bound to `admin` in the namespace; None when it has no owners binding (released)."""
    store = indexes["managed_role_bindings"].get(("RoleBinding", namespace, OWNERS_BINDING_NAME))
    binding = next(iter(store), None) if store is not None else None
    return None if binding is None else list(binding.get("subjects") or [])


def guard_managed(kind: str) -> Callable[..., Awaitable[None]]:
    async def guard(
        *,
        old: kopf.Body | None,
        new: kopf.Body | None,
        operation: str,
        userinfo: dict[str, Any],
        memo: kopf.Memo,
        namespace: str | None = None,
        **indexes: Any,
    ) -> None:
        requester = _requester(userinfo)
        problem = managed_change_problem(
            kind,
            operation,
            dict(old) if old is not None else None,
            dict(new) if new is not None else None,
            requester,
            memo.operator_username,
        )
        if problem:
            raise kopf.AdmissionError(problem, code=403)
        if kind == "RoleBinding" and new is not None and not is_trusted(requester, memo.operator_username):
            where = namespace or ""
            _reject(binding_problems(dict(new), _owner_subjects(where, indexes), where))

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


def guard_exposure(kind: str) -> Callable[..., Awaitable[None]]:
    async def guard(*, body: kopf.Body, userinfo: kopf.UserInfo, memo: kopf.Memo, **_: Any) -> None:
        _reject(exposure_problems(kind, dict(body), _requester(userinfo), memo.operator_username))

    guard.__name__ = f"guard_{kind.lower()}_exposure"
    return guard


for _group, _plural, _kind in (
    ("", "services", "Service"),
    ("", "endpoints", "Endpoints"),
    ("discovery.k8s.io", "endpointslices", "EndpointSlice"),
):
    _network = kopf.on.validate(_group, "v1", _plural, id="validate-network", operations=["CREATE", "UPDATE"])
    _network(guard_exposure(_kind))


def _recorded_devices_of_owner(
    claim: Mapping[str, Any], namespace: str | None, indexes: dict[str, kopf.Index[Any, Any]]
) -> dict[str, int] | None:
    """The DRA devices recorded on the pod that owns the claim; None when there is none the indexes know."""
    owners = (claim.get("metadata") or {}).get("ownerReferences") or []
    owner = next((o for o in owners if o.get("kind") == "Pod"), None)
    if owner is None:
        return None
    store = indexes["dra_pods_by_name"].get((namespace or "", owner.get("name", "")))
    return next(iter(store), None) if store is not None else None


def guard_claims(kind: str) -> Callable[..., Awaitable[None]]:
    async def guard(
        *, body: kopf.Body, namespace: str | None, userinfo: kopf.UserInfo, memo: kopf.Memo, **indexes: Any
    ) -> None:
        claim = dict(body)
        generated = []
        if kind == "ResourceClaim":
            generated = generated_claim_problems(claim, _recorded_devices_of_owner(claim, namespace, indexes))
        if is_trusted(_requester(userinfo), memo.operator_username):
            _reject(generated)  # the control plane's claim controller copies templates that were checked here
            return
        fence = _fence_for(namespace, indexes)
        if fence is None:
            _reject([f"{kind}s are not allowed in namespace {namespace}: it holds no GPU grant"])
            return
        replaced = []
        if kind == "ResourceClaim":
            name = str((claim.get("metadata") or {}).get("name", ""))
            users = sorted(indexes["shared_claim_users"].get((namespace or "", name), []))
            replaced = replaced_shared_claim_problems(name, users)
        _reject(generated + replaced + claim_problems(claim, kind, fence.pool, fence.device_class))

    guard.__name__ = f"guard_{kind.lower()}"
    return guard


for _plural, _kind in zip(("resourceclaims", "resourceclaimtemplates"), CLAIM_KINDS, strict=True):
    kopf.on.validate("resource.k8s.io", "v1", _plural, id="validate-claims", operations=["CREATE"])(guard_claims(_kind))


@kopf.on.validate(GROUP, VERSION, ALLOCATION_PLURAL, id="validate-allocations", operations=["CREATE", "UPDATE"])
async def check_allocation(*, name: str | None, spec: kopf.Spec, **indexes: Any) -> None:
    """Early, clear errors for what the schema cannot know: pools and namespaces that exist."""
    try:
        parsed = GpuAllocationSpec.model_validate(dict(spec))
    except ValueError as error:
        raise kopf.AdmissionError(str(error), code=422) from error
    problems = []
    pools = _pool_selectors(indexes)
    if parsed.pool not in pools:
        known = ", ".join(sorted(pools)) or "none"
        problems.append(f"spec.pool: pool {parsed.pool!r} does not exist (pools: {known})")
    namespace = parsed.target_namespace
    found = namespace_problem(
        name or "",
        namespace,
        list(indexes["allocations_by_namespace"].get(namespace, [])),
        next(iter(indexes["namespace_labels"].get(namespace, [])), None),
        next(iter(indexes["terminating_namespaces"].get(namespace, [])), None),
    )
    if found is not None:
        problems.append(f"spec.namespace: {found[1]}")
    if problems:
        raise kopf.AdmissionError("; ".join(problems), code=422)
