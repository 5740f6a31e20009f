"""The garbage collector: its pauses are exported without taking a lock in its callback, and what survives a full
collection is frozen."""

from __future__ import annotations

import gc

from gpuaas.handlers.runner import freeze_survivors
from gpuaas.metrics import GcPauses, gc_pauses


def test_each_collection_is_counted_by_generation_with_its_longest_pause() -> None:
    pauses = GcPauses()
    pauses.on_collection("start", {"generation": 2})
    pauses.on_collection("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
    families = {family.name: family for family in pauses.collect()}
    by_generation = {s.labels["generation"]: s.value for s in families["gpuaas_gc_pauses"].samples}
    assert by_generation == {"0": 0, "1": 0, "2": 1}
    longest = {s.labels["generation"]: s.value for s in families["gpuaas_gc_pause_max_seconds"].samples}
    assert longest["2"] > 0
    assert longest["0"] == 0


def test_the_operators_collector_sees_real_collections() -> None:
    before = gc_pauses.count[2]
    gc.collect()
    assert gc_pauses.count[2] == before + 1


def test_a_full_collection_freezes_its_survivors_and_a_young_one_does_not() -> None:
    survivor: list[object] = [[]]
    gc.callbacks.append(freeze_survivors)
    try:
        gc.collect(0)
        assert any(tracked is survivor for tracked in gc.get_objects()), "a young collection froze its survivors"
        gc.collect()
        assert not any(tracked is survivor for tracked in gc.get_objects()), "the next full collection walks it"
    finally:
        gc.callbacks.remove(freeze_survivors)
        gc.unfreeze()
