"""Starts kopf with gpuaas's settings and handlers."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import threading
import time

import kopf

from gpuaas import metrics
from gpuaas.domain.departed import DepartedPods
from gpuaas.domain.leadership import LeaseTiming
from gpuaas.k8s.client import load_config
from gpuaas.k8s.leadership import Leadership, LeaseElector, SoleReplica, own_identity
from gpuaas.k8s.metrics_access import review_or_unavailable
from gpuaas.options import OperatorOptions, WebhookRegistration


def elect(options: OperatorOptions, pool_wakeups: dict[str, asyncio.Event]) -> Leadership:
    """A Lease elector when replicas share a Lease; otherwise this process always leads."""
    if not options.leader_lease:
        metrics.set_leading(True)
        return SoleReplica(own_identity())

    def leadership_changed(leading: bool) -> None:
        metrics.set_leading(leading)
        for wake in pool_wakeups.values():  # pool daemons start or stop their passes now
            wake.set()

    namespace = options.leader_lease_namespace or os.environ.get("POD_NAMESPACE") or "default"
    metrics.set_leading(False)
    return LeaseElector(
        options.leader_lease,
        namespace,
        own_identity(),
        LeaseTiming(options.leader_lease_seconds),
        on_change=leadership_changed,
        may_lead=lambda: metrics.readiness.indexes_warm,
    )


# The collector's thresholds (CPython's default is 700, 10, 10). A young collection every 700 net allocations catches
# a pass's short-lived objects (snapshots, API responses) mid-life and promotes them to the old generation, whose
# count of newcomers then triggers a full collection every few seconds under churn: each walks every index entry
# and stalls every thread for most of a second (bench/results/usage-scrape-apart.json: 156 full collections,
# 103 s). With young collections every 50,000, such objects die by their reference counts first.
# The third threshold of 0 leaves full collections to the collector's own rule (one runs once the objects promoted
# since the last are a quarter of those it kept), and `freeze_survivors` keeps each small.
GC_THRESHOLDS = (50_000, 20, 0)


def freeze_survivors(phase: str, info: dict[str, int]) -> None:
    """A full collection walks every tracked object that is not frozen: at 10,000 allocations one took 3.5-3.8 s
    and stalled every pass (bench/results/allocations-10000-session2{0,1}.json). Right after one, every tracked
    object is reachable; frozen, it is never walked again, so the next walks only what survived since. The price: a
    frozen object that later dies in a reference cycle is not reclaimed (measured in docs/benchmarks.md)."""
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()


# glibc gives every thread that allocates an arena of its own (up to 8 per core), and keeps what is freed in each
# of them. This process has about 100 threads (each pool's pass executor, kopf's and the API client's pools), and
# the memory a burst of watch events or a pass used stayed with the thread that used it.
MALLOC_ARENAS = 2
M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h
TRIM_INTERVAL_SECONDS = 10.0


def limit_heap_growth() -> None:
    """Fewer malloc arenas, and free pages handed back to the kernel every few seconds. Only on glibc."""
    libc = ctypes.CDLL(None)
    mallopt, malloc_trim = getattr(libc, "mallopt", None), getattr(libc, "malloc_trim", None)
    if mallopt is None or malloc_trim is None:
        return
    mallopt(M_ARENA_MAX, MALLOC_ARENAS)

    def trim_forever() -> None:
        while True:
            time.sleep(TRIM_INTERVAL_SECONDS)
            malloc_trim(0)  # ctypes releases the GIL for the call

    threading.Thread(target=trim_forever, daemon=True, name="malloc-trim").start()


def run_operator(options: OperatorOptions) -> None:
    limit_heap_growth()
    gc.set_threshold(*GC_THRESHOLDS)
    gc.callbacks.append(freeze_survivors)
    if options.kubeconfig:
        os.environ["KUBECONFIG"] = options.kubeconfig
    load_config(options.kubeconfig)
    logging.basicConfig(
        level=logging.DEBUG if options.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not options.verbose:
        # kopf logs every handler and webhook call at INFO; gpuaas logs what matters under its own name.
        for name in ("kopf.objects", "aiohttp.access"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if options.metrics_port:
        metrics.serve(options.metrics_port, review_or_unavailable if options.metrics_auth else None)
    # Importing the handler modules registers them with kopf's default registry.
    from gpuaas.handlers import allocations, fence, indexes, operator_settings, pools, replica  # noqa: F401

    pool_wakeups: dict[str, asyncio.Event] = {}
    metrics.readiness.registration_needed = bool(options.webhook_url and options.webhook_port)
    kopf.run(
        clusterwide=True,
        # Leadership is gpuaas's own Lease, not kopf peering: a paused kopf replica closes its watches and would
        # take over cold, re-listing every node and pod first.
        standalone=True,
        liveness_endpoint=f"http://0.0.0.0:{options.health_port}/healthz" if options.health_port else None,
        # Each object gets a shallow copy of this memo, so the wake-up events must already live in it.
        # The webhook registration lock is shared too: the first pool daemon of a leading replica registers.
        memo=kopf.Memo(
            options=options,
            pool_wakeups=pool_wakeups,
            leadership=elect(options, pool_wakeups),
            webhook_registration=WebhookRegistration(),
            departed_pods=DepartedPods(),
            deciding_turn=threading.Lock(),  # one pool decides at a time (k8s.reconciler)
            allocation_generations={},
            quota_specs={},
        ),
    )
