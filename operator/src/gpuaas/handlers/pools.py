"""GpuPool: one daemon per pool runs that pool's reconcile passes (admission, tenant objects, status).

Passes are level-triggered: each starts from the current indexes. Events only wake a pass early;
a missed event is corrected by the next periodic pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from time import monotonic
from typing import Any

import kopf

from gpuaas import metrics
from gpuaas.api.allocation import ALLOCATION_LABEL, ALLOCATION_PLURAL
from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.pool import POOL_LABEL, POOL_PLURAL, GpuPoolSpec
from gpuaas.domain.access import TenantBinding
from gpuaas.domain.departed import DepartedPods, departed_pod
from gpuaas.domain.dra import node_devices
from gpuaas.domain.fence import PoolRules
from gpuaas.domain.ledger import LedgerPod
from gpuaas.domain.namespaces import NamespaceClaim, TerminatingNamespace
from gpuaas.domain.nodes import NodeInfo
from gpuaas.domain.snapshot import AllocationView, PodView, PoolSnapshot
from gpuaas.domain.tenant import tenant_object_keys
from gpuaas.handlers.indexes import MANAGED, exclusive_holders
from gpuaas.k8s import webhooks
from gpuaas.k8s.client import new_api_client
from gpuaas.k8s.leadership import Leadership
from gpuaas.k8s.ledger import LedgerWriter
from gpuaas.k8s.reconciler import POOL_CONNECTIONS, PassResult, PoolReconciler
from gpuaas.k8s.writer import cluster_writer
from gpuaas.options import OperatorOptions, WebhookRegistration, webhook_cert_dir

MIN_PASS_INTERVAL_SECONDS = 0.05
# How long a pass waits for the writes it handed out; those still running stay in flight for later passes, and the
# workers wake the pool when they run low. Long enough for one allocation's writes on a quiet cluster (its sample is
# then current at once, and `gpuaas_pool_allocations_in_flight` stays 0); short, so that under a backlog a pass is
# its own work: at 10,000 allocations nearly every pass waited the whole second that this was before (and then this
# quarter second; now a pass waits for nothing under a backlog, `PoolReconciler.end_pass`).
PASS_WAIT_SECONDS = 0.25
# The indexes of the objects `tenant_object_keys` names, in its order.
MANAGED_OBJECT_INDEXES = ("managed_namespaces", "managed_quotas", "managed_limit_ranges", "managed_role_bindings")
# A pool whose passes are heavy spends at most about a fifth of the time taking snapshots and deciding: at thousands
# of allocations a pool deciding without pause held the GIL from kopf's event handling and the webhooks (creates
# slowed, the indexes lagged). A light pass (a pool of tens of allocations) keeps the short interval, so that
# apply-to-Ready, which takes two passes, stays fast.
PASS_DUTY_FACTOR = 5.0
HEAVY_PASS_SECONDS = 0.1


def register_webhooks(options: OperatorOptions, operator_username: str) -> None:
    """Outside the cluster: point the webhook configurations at this (now active) replica."""
    assert options.webhook_url is not None
    tls = webhooks.ensure_self_signed(webhook_cert_dir(options), webhooks.url_host(options.webhook_url))
    webhooks.apply_configurations(options.webhook_url, tls.ca_file.read_bytes(), operator_username)


async def _register_once(memo: kopf.Memo) -> None:
    registration: WebhookRegistration = memo.webhook_registration
    async with registration.lock:
        if not registration.done:
            await asyncio.to_thread(register_webhooks, memo.options, memo.operator_username)
            registration.done = True
            metrics.readiness.registered = True


def _forget_registration(memo: kopf.Memo) -> None:
    """Another replica may point the webhooks at itself now; register again on the next lead."""
    memo.webhook_registration.done = False
    metrics.readiness.registered = False


def wakeup(memo: kopf.Memo, pool: str) -> asyncio.Event:
    """The pool daemon's wake-up call. Handlers that set it are async: asyncio events are not thread-safe."""
    events: dict[str, asyncio.Event] = memo.pool_wakeups
    return events.setdefault(pool, asyncio.Event())


def _all(index: kopf.Index[Any, Any], key: Any) -> list[Any]:
    """The values under `key`. Not `index.get`: Mapping's get raises and catches a KeyError for every absent key,
    and most of a pass's lookups (terminating namespaces, departed pods, bindings) find none."""
    return list(index[key]) if key in index else []


def _one(index: kopf.Index[Any, Any], key: Any) -> Any:
    return next(iter(index[key]), None) if key in index else None


def snapshot(
    name: str, body: kopf.Body, indexes: dict[str, kopf.Index[Any, Any]], departed: DepartedPods
) -> PoolSnapshot:
    """Copy what one pass needs out of the indexes, synchronously, so it is consistent. Only this pool's
    allocations' namespaces are looked up: a pass costs what its pool holds, not what the cluster holds."""
    allocations: list[AllocationView] = _all(indexes["allocations_by_pool"], name)
    namespaces = {allocation.target_namespace for allocation in allocations}
    observed: dict[tuple[str, str, str], Any] = {}
    claims: dict[str, list[NamespaceClaim]] = {}
    terminating: dict[str, TerminatingNamespace] = {}
    pods: dict[str, list[PodView]] = {}
    bindings: dict[str, list[TenantBinding]] = {}
    labels: dict[str, Any] = {}
    gone: dict[str, list[LedgerPod]] = {}
    for namespace in namespaces:
        for index_name, key in zip(MANAGED_OBJECT_INDEXES, tenant_object_keys(namespace), strict=True):
            found = _one(indexes[index_name], key)
            if found is not None:
                observed[key] = found
        claims[namespace] = _all(indexes["allocations_by_namespace"], namespace)
        found_terminating = _one(indexes["terminating_namespaces"], namespace)
        if found_terminating is not None:
            terminating[namespace] = found_terminating
        pods[namespace] = _all(indexes["gpu_pods_by_namespace"], namespace)
        bindings[namespace] = _all(indexes["tenant_role_bindings"], namespace)
        gone[namespace] = departed.of(namespace)
        found_labels = _one(indexes["namespace_labels"], namespace)
        if found_labels is not None:
            labels[namespace] = found_labels
    uids = {a.uid for a in allocations}
    usage = {uid: {r.name: r for r in _all(indexes["usage_by_allocation"], uid)} for uid in uids}
    nodes: list[NodeInfo] = [info for store in indexes["nodes_by_name"].values() for info in store]
    holders = exclusive_holders(nodes)
    spec = GpuPoolSpec.model_validate(dict(body.get("spec") or {}))
    if spec.dra is not None:  # a DRA node's GPUs are the devices its driver publishes, not an allocatable count
        published = indexes["devices_by_node"]
        driver = spec.dra.driver_name
        nodes = [replace(node, allocatable_gpus=node_devices(_all(published, node.name), driver)) for node in nodes]
    pools: kopf.Index[str, PoolRules] = indexes["pools_by_name"]
    other_classes = {r.device_class for pool, store in pools.items() if pool != name for r in store if r.device_class}
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
        exclusive_holders=holders,
        tenant_bindings=bindings,
        terminating_namespaces=terminating,
        usage=usage,
        departed_by_namespace=gone,
        other_pools_device_classes=frozenset(other_classes),
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
    """Runs on every replica; only the leader's passes run. A standby's daemon waits, its indexes kept warm."""
    wake = wakeup(memo, name)
    metrics.daemon_started()
    try:
        await _run_passes(name, body, stopped, memo, logger, indexes, wake)
    finally:
        metrics.daemon_stopped()
        if not metrics.running_daemons():
            _forget_registration(memo)
            if stopped.reason is not None and stopped.reason & kopf.DaemonStoppingReason.OPERATOR_EXITING:
                # The last pass has ended: a standby may take over now rather than when the Lease runs out.
                leadership: Leadership = memo.leadership
                await leadership.release()


def _new_reconciler(
    name: str, options: OperatorOptions, drained: asyncio.Event, deciding_turn: threading.Lock
) -> PoolReconciler:
    connections = new_api_client(pool_size=POOL_CONNECTIONS)
    writer = cluster_writer(connections)
    flush_interval = timedelta(seconds=options.ledger_flush_seconds)
    ledger = LedgerWriter(time_zone=options.time_zone, flush_interval=flush_interval, writer=writer)
    loop = asyncio.get_running_loop()

    def wake_from_worker() -> None:
        """The workers are running out of writes: what waited for them gets a pass now."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: the operator is exiting
            loop.call_soon_threadsafe(drained.set)

    return PoolReconciler(
        pool=name,
        ledger=ledger,
        writer=writer,
        deciding_turn=deciding_turn,
        on_work_done=wake_from_worker,
        on_stop=connections.close,
    )


@dataclass(frozen=True)
class _ThreadPass:
    result: PassResult
    started: float  # monotonic, when the thread began the pass
    ended: float  # and when it was done with it


def _pass_and_samples(reconciler: PoolReconciler, snap: PoolSnapshot, now: datetime) -> _ThreadPass:
    """One pass, and its allocations' series rendered for /metrics on the same worker thread, not the event loop."""
    started = monotonic()
    result = reconciler.run_pass(snap, now, PASS_WAIT_SECONDS)
    metrics.record_allocations(snap.pool, result.samples)
    return _ThreadPass(result, started, monotonic())


async def _sleep(woken_by: list[asyncio.Event], stopped: kopf.DaemonStopped, seconds: float) -> None:
    """Until one of the events is set, stopped or `seconds` passed."""
    waiters = [asyncio.ensure_future(event.wait()) for event in woken_by] + [asyncio.ensure_future(stopped.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _run_passes(
    name: str,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    memo: kopf.Memo,
    logger: kopf.Logger,
    indexes: dict[str, Any],
    wake: asyncio.Event,
) -> None:
    leadership: Leadership = memo.leadership
    reconciler: PoolReconciler | None = None
    drained = asyncio.Event()
    try:
        while not stopped:
            wake.clear()
            drained.clear()
            if not leadership.is_leader():
                if reconciler is not None:
                    # Its writes in flight end first: another replica may lead now.
                    await asyncio.to_thread(reconciler.stop)
                    # A standby exports no pool series: only the leader's are current.
                    metrics.forget_pool(name, GpuPoolSpec.model_validate(dict(body.get("spec") or {})))
                    _forget_registration(memo)
                    reconciler = None
                await _sleep([wake], stopped, memo.options.pool_resync_seconds)
                continue
            if reconciler is None:
                # Fresh state on every takeover: while another replica led, the ledger records moved on.
                reconciler = _new_reconciler(name, memo.options, drained, memo.deciding_turn)
            started = datetime.now(UTC)
            interval, in_flight = await _one_pass(name, body, memo, logger, indexes, reconciler, started)
            # While the workers have a backlog, more passes would only lengthen it (and take the event loop from
            # the webhooks): the next pass comes when it runs low, whatever else happens meanwhile. Writes that
            # ended within the pass wake nothing: the pass has taken them in.
            if in_flight >= reconciler.low_water:
                woken_by: list[asyncio.Event] = [drained]
            else:
                woken_by = [wake, drained] if in_flight else [wake]
            await _sleep(woken_by, stopped, memo.options.pool_resync_seconds)
            elapsed = (datetime.now(UTC) - started).total_seconds()
            if not stopped:
                await asyncio.sleep(max(0.0, interval - elapsed))
    finally:
        if reconciler is not None:
            await asyncio.to_thread(reconciler.stop)


def _observe_parts(pool: str, snapshot_seconds: float, done: _ThreadPass, handoff_seconds: float) -> None:
    result, parts = done.result, metrics.reconcile_part
    parts.labels(pool, "turn").observe(result.turn_seconds)
    parts.labels(pool, "snapshot").observe(snapshot_seconds)
    parts.labels(pool, "deciding").observe(result.deciding_seconds)
    parts.labels(pool, "waiting").observe(result.waiting_seconds)
    # The pool's status and month records and its allocations' series, in the thread.
    in_thread = done.ended - done.started - result.turn_seconds
    parts.labels(pool, "ending").observe(max(0.0, in_thread - result.deciding_seconds - result.waiting_seconds))
    parts.labels(pool, "handoff").observe(handoff_seconds)


async def _one_pass(
    name: str,
    body: kopf.Body,
    memo: kopf.Memo,
    logger: kopf.Logger,
    indexes: dict[str, Any],
    reconciler: PoolReconciler,
    started: datetime,
) -> tuple[float, int]:
    """One pass; returns the least time until the next one starts, and the allocations it left in flight."""
    leadership: Leadership = memo.leadership
    departed: DepartedPods = memo.departed_pods
    departed.forget_expired(started)
    snapshot_started = monotonic()
    snap = snapshot(name, body, indexes, departed)
    busy_seconds = monotonic() - snapshot_started  # on the event loop
    in_flight = 0
    try:
        pass_started = monotonic()
        done = await asyncio.to_thread(_pass_and_samples, reconciler, snap, started)
        returned = monotonic()
        result = done.result
        # The pass's duration leaves out its wait for the turn (a part of its own, below).
        metrics.reconcile_duration.labels(name).observe(returned - pass_started - result.turn_seconds)
        _observe_parts(name, busy_seconds, done, (done.started - pass_started) + (returned - done.ended))
        busy_seconds += result.deciding_seconds
        metrics.ledger_writes.inc(reconciler.ledger.writes_since_last_asked())
        metrics.record_pool(name, GpuPoolSpec.model_validate(snap.spec), result.pool)
        metrics.record_terminating(name, result.terminating_namespaces)
        metrics.writes_in_flight.labels(name).set(result.in_flight)
        for kind, seconds in result.shown_after:
            metrics.watch_lag.labels(kind).observe(seconds)
        in_flight = result.in_flight
        if result.failed:
            metrics.reconcile_errors.labels(name).inc(result.failed)
        if memo.options.webhook_url:
            await _register_once(memo)
        leadership.note_pass(started)
    except Exception:
        metrics.reconcile_errors.labels(name).inc()
        logger.exception(f"pool {name}: reconcile pass failed; retrying")
    # Coalesce bursts of events (a bulk apply, the objects a pass applied) into one pass per interval (never rarer
    # than the resync). Waiting for writes or for the turn does not count as busy: the pass holds nothing then.
    resync: float = memo.options.pool_resync_seconds
    heavy = busy_seconds >= HEAVY_PASS_SECONDS
    return min(max(MIN_PASS_INTERVAL_SECONDS, PASS_DUTY_FACTOR * busy_seconds if heavy else 0.0), resync), in_flight


@kopf.on.delete(GROUP, VERSION, POOL_PLURAL, optional=True)
def forget_pool(*, name: str, spec: kopf.Spec, **_: Any) -> None:
    metrics.forget_pool(name, GpuPoolSpec.model_validate(dict(spec)))


@kopf.on.event("", "v1", "pods")
async def remember_departed_pod(
    *,
    type: str,  # kopf's name for the event type
    body: kopf.Body,
    namespace: str | None,
    memo: kopf.Memo,
    **indexes: Any,
) -> None:
    """A GPU pod of a granted namespace that is gone: booked from the last state its DELETED event carries, unless
    its time is booked already. Every replica remembers it (on the event loop, which also takes the snapshots)."""
    if type != "DELETED" or namespace not in indexes["allocations_by_namespace"]:
        return
    now = datetime.now(UTC)
    pod = departed_pod(dict(body), now)
    if pod is not None:
        departed: DepartedPods = memo.departed_pods
        departed.remember(pod, now)


@kopf.on.event(GROUP, VERSION, ALLOCATION_PLURAL)
async def allocation_changed(
    *, type: str | None, uid: str, meta: kopf.Meta, spec: kopf.Spec, memo: kopf.Memo, **_: Any
) -> None:
    """Wake the pool for what the program office did (a new, changed or deleted allocation), not for gpuaas's own
    status and finalizer writes: those would wake a pass after every pass."""
    seen: dict[str, tuple[object, object]] = memo.allocation_generations
    current = (meta.get("generation"), meta.get("deletionTimestamp"))
    if type == "DELETED":
        seen.pop(uid, None)
    elif seen.get(uid) == current:
        return
    else:
        seen[uid] = current
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
async def quota_changed(
    *, type: str | None, uid: str, labels: kopf.Labels, spec: kopf.Spec, memo: kopf.Memo, **_: Any
) -> None:
    """Not for status updates: the quota controller writes one for every pod that starts or ends in the namespace,
    and passes read pods, not quota usage."""
    seen: dict[str, str] = memo.quota_specs
    if type == "DELETED":
        seen.pop(uid, None)
    else:
        current = json.dumps(dict(spec), sort_keys=True)
        if seen.get(uid) == current:
            return
        seen[uid] = current
    _wake_owner_pool(labels, memo)


@kopf.on.event("", "v1", "limitranges", labels={ALLOCATION_LABEL: kopf.PRESENT})
async def limit_range_changed(*, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    _wake_owner_pool(labels, memo)


@kopf.on.event("rbac.authorization.k8s.io", "v1", "rolebindings", labels={ALLOCATION_LABEL: kopf.PRESENT})
async def role_binding_changed(*, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    _wake_owner_pool(labels, memo)
