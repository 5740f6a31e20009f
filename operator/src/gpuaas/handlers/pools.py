"""GpuPool: one daemon per pool runs that pool's reconcile passes (admission, tenant objects, status).

Passes are level-triggered: each starts from the current indexes. Events only wake a pass early;
a missed event is corrected by the next periodic pass.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf

from gpuaas import metrics
from gpuaas.api.allocation import ALLOCATION_LABEL, ALLOCATION_PLURAL
from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.pool import POOL_LABEL, POOL_PLURAL, GpuPoolSpec
from gpuaas.domain.nodes import NodeInfo
from gpuaas.domain.tenant import LIMIT_RANGE_NAME, OWNERS_BINDING_NAME, QUOTA_NAME
from gpuaas.handlers.indexes import MANAGED, exclusive_holders
from gpuaas.k8s import webhooks
from gpuaas.k8s.ledger import LedgerWriter
from gpuaas.k8s.reconciler import AllocationView, PodView, PoolReconciler, PoolSnapshot
from gpuaas.options import OperatorOptions, WebhookRegistration, webhook_cert_dir

MIN_PASS_INTERVAL_SECONDS = 0.2
PASS_DUTY_FACTOR = 5.0
# Passes that processed at least this many allocations are heavy: only they stretch the interval.
HEAVY_PASS_ALLOCATIONS = 20


def register_webhooks(options: OperatorOptions) -> None:
    """Outside the cluster: point the webhook configurations at this (now active) replica."""
    assert options.webhook_url is not None
    tls = webhooks.ensure_self_signed(webhook_cert_dir(options), webhooks.url_host(options.webhook_url))
    webhooks.apply_configurations(options.webhook_url, tls.ca_file.read_bytes())


async def _register_once(memo: kopf.Memo) -> None:
    registration: WebhookRegistration = memo.webhook_registration
    async with registration.lock:
        if not registration.done:
            await asyncio.to_thread(register_webhooks, memo.options)
            registration.done = True


def wakeup(memo: kopf.Memo, pool: str) -> asyncio.Event:
    """The pool daemon's wake-up call. Handlers that set it are async: asyncio events are not thread-safe."""
    events: dict[str, asyncio.Event] = memo.pool_wakeups
    return events.setdefault(pool, asyncio.Event())


def _one(index: kopf.Index[Any, Any], key: Any) -> Any:
    store = index.get(key)
    return next(iter(store), None) if store is not None else None


def snapshot(name: str, body: kopf.Body, indexes: dict[str, kopf.Index[Any, Any]]) -> PoolSnapshot:
    """Copy what one pass needs out of the indexes, synchronously, so it is consistent. Only this pool's
    allocations' namespaces are looked up: a pass costs what its pool holds, not what the cluster holds."""
    allocations: list[AllocationView] = list(indexes["allocations_by_pool"].get(name, []))
    namespaces = {str(a.spec.get("namespace") or (a.spec.get("tenant") or {}).get("name", "")) for a in allocations}
    observed: dict[tuple[str, str, str], Any] = {}
    claims: dict[str, list[tuple[datetime, str]]] = {}
    pods: dict[str, list[PodView]] = {}
    labels: dict[str, Any] = {}
    for namespace in namespaces:
        for index_name, key in (
            ("managed_namespaces", ("Namespace", "", namespace)),
            ("managed_quotas", ("ResourceQuota", namespace, QUOTA_NAME)),
            ("managed_limit_ranges", ("LimitRange", namespace, LIMIT_RANGE_NAME)),
            ("managed_role_bindings", ("RoleBinding", namespace, OWNERS_BINDING_NAME)),
        ):
            found = _one(indexes[index_name], key)
            if found is not None:
                observed[key] = found
        claims[namespace] = [
            (datetime.fromisoformat(created.replace("Z", "+00:00")), allocation)
            for created, allocation, _pool, _exclusive in indexes["allocations_by_namespace"].get(namespace, [])
        ]
        pods[namespace] = list(indexes["gpu_pods_by_namespace"].get(namespace, []))
        found_labels = _one(indexes["namespace_labels"], namespace)
        if found_labels is not None:
            labels[namespace] = found_labels
    uids = {a.uid for a in allocations}
    usage = {uid: {r.name: r for r in indexes["usage_by_allocation"].get(uid, [])} for uid in uids}
    nodes: list[NodeInfo] = [info for store in indexes["nodes_by_name"].values() for info in store]
    return PoolSnapshot(
        pool=name,
        spec=dict(body.get("spec") or {}),
        generation=body.get("metadata", {}).get("generation"),
        status=dict(body.get("status") or {}),
        nodes=nodes,
        allocations=allocations,
        observed=observed,
        namespaces=labels,
        namespace_claims=claims,
        pods_by_namespace=pods,
        exclusive_holders=exclusive_holders(indexes["nodes_by_name"]),
        usage=usage,
    )


@kopf.daemon(GROUP, VERSION, POOL_PLURAL, cancellation_timeout=10.0)
async def reconcile_pool(
    *,
    name: str,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **indexes: Any,
) -> None:
    ledger = LedgerWriter(
        time_zone=memo.options.time_zone, flush_interval=timedelta(seconds=memo.options.ledger_flush_seconds)
    )
    reconciler = PoolReconciler(pool=name, ledger=ledger)
    wake = wakeup(memo, name)
    metrics.daemon_started()
    try:
        await _run_passes(name, body, stopped, memo, logger, indexes, reconciler, wake)
    finally:
        metrics.daemon_stopped()
        if not metrics.running_daemons():
            # Paused or stopping: another replica may point the webhooks elsewhere; register again on resume.
            memo.webhook_registration.done = False
        if memo.serving is not None:
            await asyncio.to_thread(memo.serving.release, name)


async def _run_passes(
    name: str,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    memo: kopf.Memo,
    logger: kopf.Logger,
    indexes: dict[str, Any],
    reconciler: PoolReconciler,
    wake: asyncio.Event,
) -> None:
    serving = False
    while not stopped:
        wake.clear()
        snap = snapshot(name, body, indexes)
        started = datetime.now(UTC)
        heavy = False
        try:
            with metrics.reconcile_duration.labels(name).time():
                writes_before = reconciler.ledger.writes
                result = await asyncio.to_thread(reconciler.run_pass, snap, started)
            metrics.ledger_writes.inc(reconciler.ledger.writes - writes_before)
            metrics.record_pool(name, GpuPoolSpec.model_validate(snap.spec), result.pool)
            metrics.record_allocations(name, result.samples)
            heavy = result.processed >= HEAVY_PASS_ALLOCATIONS
            if memo.options.webhook_url:
                await _register_once(memo)
            if not serving and memo.serving is not None:
                # Admission requests come here only now that this replica's indexes are live.
                await asyncio.to_thread(memo.serving.acquire, name)
                serving = True
            metrics.mark_pass()
        except Exception:
            metrics.reconcile_errors.labels(name).inc()
            logger.exception(f"pool {name}: reconcile pass failed; retrying")
        pass_seconds = (datetime.now(UTC) - started).total_seconds()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=memo.options.pool_resync_seconds)
        # Coalesce bursts of events (our own status writes wake us too) into one pass per interval, and
        # keep a pool busy with heavy passes to about a fifth of the time (never rarer than the resync);
        # a light pass (one new allocation) keeps the short interval, so apply-to-Ready stays fast.
        elapsed = (datetime.now(UTC) - started).total_seconds()
        interval = min(
            max(MIN_PASS_INTERVAL_SECONDS, PASS_DUTY_FACTOR * pass_seconds if heavy else 0.0),
            memo.options.pool_resync_seconds,
        )
        await asyncio.sleep(max(0.0, interval - elapsed))


@kopf.on.delete(GROUP, VERSION, POOL_PLURAL, optional=True)
def forget_pool(*, name: str, spec: kopf.Spec, **_: Any) -> None:
    metrics.forget_pool(name, GpuPoolSpec.model_validate(dict(spec)))


@kopf.on.event(GROUP, VERSION, ALLOCATION_PLURAL)
async def allocation_changed(*, spec: kopf.Spec, memo: kopf.Memo, **_: Any) -> None:
    wakeup(memo, str(spec.get("pool", ""))).set()


def _wake_owner_pool(labels: kopf.Labels, memo: kopf.Memo) -> None:
    pool = labels.get(POOL_LABEL)
    if pool:
        wakeup(memo, pool).set()


@kopf.on.event("", "v1", "namespaces", labels={ALLOCATION_LABEL: kopf.PRESENT})
async def namespace_changed(*, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    _wake_owner_pool(labels, memo)


@kopf.on.event("", "v1", "namespaces", labels=MANAGED)
async def managed_namespace_changed(*, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    _wake_owner_pool(labels, memo)


@kopf.on.event("", "v1", "resourcequotas", labels={ALLOCATION_LABEL: kopf.PRESENT})
async def quota_changed(*, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    _wake_owner_pool(labels, memo)


@kopf.on.event("", "v1", "limitranges", labels={ALLOCATION_LABEL: kopf.PRESENT})
async def limit_range_changed(*, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    _wake_owner_pool(labels, memo)


@kopf.on.event("rbac.authorization.k8s.io", "v1", "rolebindings", labels={ALLOCATION_LABEL: kopf.PRESENT})
async def role_binding_changed(*, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    _wake_owner_pool(labels, memo)
