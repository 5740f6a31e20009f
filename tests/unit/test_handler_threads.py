"""Watch and admission handlers run on the event loop: kopf hands every plain function to its thread pool, a hop to
another thread and back per watch event and per admission request (thousands a second under churn), and an admission
request waits there for a free thread."""

from __future__ import annotations

import inspect

import kopf
from prometheus_client import REGISTRY

from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.pool import POOL_KIND, POOL_PLURAL, GpuPoolStatus
from gpuaas.handlers import allocations, fence, indexes, operator_settings, pools, replica  # noqa: F401
from gpuaas.k8s.reconciler import PassResult


def _handlers() -> list[tuple[str, str, bool]]:
    registry = kopf.get_default_registry()
    found = []
    for kind, handlers in (
        ("index", registry._indexing.get_all_handlers()),
        ("watch", registry._watching.get_all_handlers()),
        ("admission", registry._webhooks.get_all_handlers()),
        ("change", registry._changing.get_all_handlers()),
    ):
        found += [(kind, str(handler.id), inspect.iscoroutinefunction(handler.fn)) for handler in handlers]
    return found


def test_every_watch_and_admission_handler_is_a_coroutine_but_the_few_that_block() -> None:
    handlers = _handlers()
    plain = sorted({f"{kind} {handler}" for kind, handler, is_coroutine in handlers if not is_coroutine})
    # The delete stamp writes to the API server, so it stays in the thread pool (deletes are rare); so does a pool's
    # deletion, rarer still.
    assert plain == ["admission stamp-allocation-deletes", "change forget_pool"]
    # The check can fail: indexes and the pod fence are among the handlers it saw.
    seen = {handler for _, handler, _ in handlers}
    assert {"gpu_pods_by_namespace", "nodes_by_name", "validate-pods", "mutate-allocations"} <= seen


def test_a_pass_is_split_into_its_parts_and_the_hand_offs_to_and_from_its_thread_are_one_of_them() -> None:
    result = PassResult(pool=GpuPoolStatus(), samples=[], turn_seconds=3.0, deciding_seconds=0.5, waiting_seconds=0.25)
    # The thread began the pass at 10 and was done at 14.0: 3 s waiting for the turn, 0.25 s ending.
    done = pools._ThreadPass(result, started=10.0, ended=14.0)
    pools._observe_parts("parts-pool", 0.125, done, handoff_seconds=1.5)

    def observed(part: str) -> float | None:
        return REGISTRY.get_sample_value("gpuaas_reconcile_part_seconds_sum", {"pool": "parts-pool", "part": part})

    parts = {part: observed(part) for part in ("turn", "snapshot", "deciding", "waiting", "ending", "handoff")}
    assert parts == {
        "turn": 3.0,
        "snapshot": 0.125,
        "deciding": 0.5,
        "waiting": 0.25,
        "ending": 0.25,
        "handoff": 1.5,
    }


def test_only_kinds_with_change_or_daemon_handlers_are_diffed_on_every_event() -> None:
    registry = kopf.get_default_registry()
    handled = registry._changing.get_all_handlers() + registry._spawning.get_all_handlers()
    # A handler added for another kind must add its kind to DIFFED_KINDS, or it would never see a change.
    assert {str(handler.selector.any_name) for handler in handled} == {POOL_PLURAL}
    assert {POOL_KIND} == operator_settings.DIFFED_KINDS
    storage = operator_settings.DiffedKindsStorage(prefix="gpuaas.io", key="last-handled-configuration")
    spec = {"gpuModel": "H200", "nodeSelector": {"pool": "a"}}
    pool = kopf.Body({"apiVersion": f"{GROUP}/{VERSION}", "kind": POOL_KIND, "metadata": {"name": "a"}, "spec": spec})
    assert storage.build(body=pool) == {"spec": spec}
    pod = kopf.Body({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}})
    assert storage.build(body=pod) == {}
