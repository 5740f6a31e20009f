"""When the ledger writes, against the real API server: a record whose only news is the time of pods it already
holds is written QUIET_FLUSH_FACTOR flush intervals apart; a pod's end keeps the flush interval.

The operator runs with a one-second flush here, so the quiet writes come ten seconds apart. The gaps are read from
the records' `bookedUntil` watermarks, the operator's own clock at each write: no assert depends on this machine's
speed, only on which writes the operator chose to make.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from itertools import pairwise

import pytest

from gpuaas.domain.booking import QUIET_FLUSH_FACTOR
from gpuaas.domain.scenarios import SCENARIOS
from tests.integration.allocations import allocation, allocation_manifest, pod_phase, unique, wait_for_ready
from tests.integration.conftest import LocalCluster, OperatorProcess
from tests.integration.test_usage import Timeline, assert_exact, parse_time, usage_records
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
H200 = SCENARIOS["small"].pools[1]
FLUSH = timedelta(seconds=1)
QUIET_GAP = FLUSH * QUIET_FLUSH_FACTOR


@pytest.fixture
def fast_flush_operator(operator: OperatorProcess) -> Iterator[OperatorProcess]:
    """The shared operator, restarted with a one-second ledger flush, and back to the default afterwards."""
    with operator.restarted_with("--ledger-flush-seconds", str(FLUSH.total_seconds())) as restarted:
        yield restarted


def booked_until(cluster: LocalCluster, name: str, with_pods: bool = True) -> datetime | None:
    """The watermark of the allocation's one record (with `with_pods`, once it holds a pod's)."""
    records = usage_records(cluster, name)
    if len(records) != 1:
        return None
    ledger = records[0].get("ledger") or {}
    if not ledger.get("bookedUntil") or (with_pods and not ledger.get("pods")):
        return None
    return parse_time(ledger["bookedUntil"])


def writes_seen(cluster: LocalCluster, name: str, seconds: float) -> list[datetime]:
    """Every distinct watermark the record shows over `seconds`, polled faster than any flush."""
    seen: list[datetime] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        current = booked_until(cluster, name)
        if current is not None and (not seen or current != seen[-1]):
            seen.append(current)
        time.sleep(0.2)
    return seen


def test_running_pods_are_written_ten_flushes_apart_and_an_end_at_the_next_flush(
    cluster: LocalCluster, fast_flush_operator: OperatorProcess
) -> None:
    name = unique("flush")
    with allocation(cluster, allocation_manifest(name, H200.name, 8)):
        wait_for_ready(cluster, name)
        timeline = Timeline(cluster, name)
        timeline.start("steady", 4)
        # The start is news: written at the next flush. From then on, only the running pod's time accrues.
        wait_for(lambda: booked_until(cluster, name), timeout=30, message="the start written")
        writes = writes_seen(cluster, name, 2.5 * QUIET_GAP.total_seconds())
        gaps = [later - earlier for earlier, later in pairwise(writes)]
        assert len(gaps) >= 2, f"the record stopped moving: writes at {writes}"
        assert min(gaps) >= QUIET_GAP, f"time-only writes closer than {QUIET_GAP}: {gaps}"

        # Right after a quiet write, the pod ends: its end may not wait for the next quiet one.
        quiet = wait_for(
            lambda: (current := booked_until(cluster, name)) != writes[-1] and current,
            timeout=2 * QUIET_GAP.total_seconds(),
            message="the next quiet write",
        )
        timeline.end("steady")
        wait_for(lambda: pod_phase(cluster, "steady", name) is None, timeout=30, message="the end booked and released")
        ended = booked_until(cluster, name, with_pods=False)
        assert ended is not None
        assert quiet <= ended < quiet + QUIET_GAP, f"the end waited for a quiet flush: {quiet} then {ended}"
        assert_exact(cluster, name, timeline)
