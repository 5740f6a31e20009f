"""GPUs taken from a grant: the pods that must stop, and the GPUs the pool may not offer until they have."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from gpuaas.domain.reclaim import HeldPod, held_beyond_grants, holds_devices, pods_to_stop, quota_held

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)


def pod(name: str, gpus: int, minute: int, *, running: bool = True, finished: bool = False) -> HeldPod:
    created = (NOW - timedelta(hours=1) + timedelta(minutes=minute)).isoformat()
    return HeldPod(name, gpus, created, finished, NOW - timedelta(minutes=30) if running else None, None)


def test_a_grant_not_in_force_stops_every_pod_holding_quota_gated_and_pending_too() -> None:
    pods = [pod("running", 8, 1), pod("gated", 8, 2, running=False), pod("done", 8, 3, finished=True)]
    for phase in ("Suspended", "Queued", "Scheduled"):
        assert [p.name for p in pods_to_stop(phase, 0, pods)] == ["running", "gated"]


def test_a_smaller_grant_stops_the_newest_pods_until_it_fits() -> None:
    pods = [pod("a", 4, 1), pod("b", 4, 2), pod("c", 4, 3)]
    assert [p.name for p in pods_to_stop("Active", 12, pods)] == []
    assert [p.name for p in pods_to_stop("Active", 8, pods)] == ["c"]
    assert [p.name for p in pods_to_stop("Active", 5, pods)] == ["c", "b"]


def test_expiry_keeps_its_own_grace_rule() -> None:
    assert pods_to_stop("Expired", 0, [pod("a", 8, 1)]) == []


def test_pods_still_stopping_keep_their_gpus_from_the_pool() -> None:
    stopping = HeldPod("s", 8, "", True, NOW - timedelta(hours=1), NOW + timedelta(seconds=20))
    stopped = HeldPod("t", 8, "", True, NOW - timedelta(hours=1), NOW - timedelta(seconds=1))
    gated = pod("g", 8, 1, running=False)
    assert holds_devices(stopping, NOW)
    assert not holds_devices(stopped, NOW)
    assert not holds_devices(gated, NOW)
    pods = {"suspended": [stopping, stopped, gated], "active": [pod("r", 8, 1)]}
    assert held_beyond_grants({"suspended": 0, "active": 8}, pods, NOW) == 8
    assert held_beyond_grants({"suspended": 0, "active": 8}, pods, NOW + timedelta(seconds=30)) == 0


@given(
    sizes=st.lists(st.integers(min_value=1, max_value=8), max_size=12),
    granted=st.integers(min_value=0, max_value=64),
)
def test_after_stopping_what_remains_fits_the_grant(sizes: list[int], granted: int) -> None:
    pods = [pod(f"p{i}", gpus, i) for i, gpus in enumerate(sizes)]
    stopping = pods_to_stop("Active", granted, pods)
    remaining = [p for p in pods if p not in stopping]
    assert quota_held(remaining) <= granted
    # Newest first, and no further than needed: keeping the last one it stops would exceed the grant.
    assert [p.created for p in stopping] == sorted((p.created for p in stopping), reverse=True)
    assert all(p.created > q.created for p in stopping for q in remaining)
    if stopping:
        assert quota_held(remaining) + stopping[-1].gpus > granted
