"""Watch and admission handlers run on the event loop: kopf hands every plain function to its thread pool, a hop to
another thread and back per watch event and per admission request (thousands a second under churn), and an admission
request waits there for a free thread."""

from __future__ import annotations

import inspect

import kopf

from gpuaas.handlers import allocations, fence, indexes, operator_settings, pools, replica  # noqa: F401


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
