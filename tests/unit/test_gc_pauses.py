"""The garbage collector's pauses are exported without taking a lock in its callback."""

from __future__ import annotations

import gc

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
