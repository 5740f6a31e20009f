"""Leader election rules: who creates, renews, takes over or follows, and when a holder must stop writing."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gpuaas.domain.leadership import LeaseRecord, LeaseTiming, Sighting, Step, next_step, sighting, still_leader

TIMING = LeaseTiming(4)


def held_by(holder: str, version: str = "1") -> LeaseRecord:
    return LeaseRecord(holder=holder, lease_seconds=4, transitions=0, version=version)


def test_no_lease_is_created() -> None:
    assert next_step(None, "a", None, 0.0) is Step.CREATE


def test_own_lease_is_renewed() -> None:
    record = held_by("a")
    assert next_step(record, "a", sighting(record, None, 0.0), 100.0) is Step.RENEW


def test_released_lease_is_taken_at_once() -> None:
    record = held_by("")
    assert next_step(record, "b", sighting(record, None, 10.0), 10.0) is Step.TAKE


def test_holder_is_followed_until_its_lease_runs_out_by_the_followers_clock() -> None:
    record = held_by("a")
    seen = sighting(record, None, 10.0)
    assert next_step(record, "b", seen, 13.9) is Step.FOLLOW
    assert next_step(record, "b", seen, 14.0) is Step.TAKE


def test_a_renewal_restarts_the_followers_clock() -> None:
    first = sighting(held_by("a", "1"), None, 10.0)
    assert sighting(held_by("a", "1"), first, 12.0) == first  # the same version keeps its first sighting
    renewed = sighting(held_by("a", "2"), first, 13.0)
    assert renewed == Sighting("2", 13.0)
    assert next_step(held_by("a", "2"), "b", renewed, 15.0) is Step.FOLLOW


def test_holder_steps_down_before_anyone_may_take_over() -> None:
    assert TIMING.renew_every == 1.0
    assert TIMING.renew_deadline == 3.0
    assert still_leader(10.0, 12.9, TIMING)
    assert not still_leader(10.0, 13.0, TIMING)
    assert not still_leader(None, 0.0, TIMING)


@given(
    renewed_at=st.floats(min_value=0, max_value=1e6),
    seen_at=st.floats(min_value=0, max_value=1e6),
    now=st.floats(min_value=0, max_value=1e6),
    lease_seconds=st.integers(min_value=2, max_value=600),
)
def test_never_two_writers(renewed_at: float, seen_at: float, now: float, lease_seconds: int) -> None:
    """A follower sees a renewal no earlier than it was made, so while the holder still counts itself leader the
    follower cannot take over: the renew deadline is shorter than the lease."""
    timing = LeaseTiming(lease_seconds)
    seen_at = max(seen_at, renewed_at)
    record = LeaseRecord(holder="a", lease_seconds=lease_seconds, transitions=0, version="v")
    if still_leader(renewed_at, now, timing):
        assert next_step(record, "b", Sighting("v", seen_at), now) is Step.FOLLOW
