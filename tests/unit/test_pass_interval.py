"""How long a pool waits between passes (handlers/pools.py): a pool whose passes are heavy spends at most a fifth of
its time deciding; one slow pass of a small pool delays nothing."""

from __future__ import annotations

import pytest

from gpuaas.handlers.pools import MIN_PASS_INTERVAL_SECONDS, PASS_DUTY_FACTOR, next_pass_interval

RESYNC = 2.0


def test_light_passes_keep_the_shortest_interval() -> None:
    assert next_pass_interval(0.02, 0.03, RESYNC) == MIN_PASS_INTERVAL_SECONDS


def test_a_pool_whose_passes_are_heavy_waits_five_times_its_lighter_pass() -> None:
    assert next_pass_interval(0.3, 0.2, RESYNC) == pytest.approx(PASS_DUTY_FACTOR * 0.2)
    assert next_pass_interval(0.9, 1.2, RESYNC) == RESYNC  # never rarer than the resync


def test_one_slow_pass_of_a_small_pool_does_not_hold_back_the_next() -> None:
    """A collector pause made one pass take 0.2 s: the next allocation is not kept waiting a second for it."""
    assert next_pass_interval(0.2, 0.02, RESYNC) == MIN_PASS_INTERVAL_SECONDS
    assert next_pass_interval(0.02, 0.2, RESYNC) == MIN_PASS_INTERVAL_SECONDS
