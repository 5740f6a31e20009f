"""Pods that go without gpuaas releasing them: booked from the DELETED event's last state, never twice."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from gpuaas.api.usage import GpuUsage
from gpuaas.domain.actions import CreateUsage, ReleasePod, WriteUsageLedger
from gpuaas.domain.booking import WrittenLedger, plan_booking
from gpuaas.domain.departed import DEPARTED_POD_MEMORY, WATERMARK_KEEP, DepartedPods, departed_pod
from gpuaas.domain.ledger import GrantState, LedgerPod
from gpuaas.k8s.ledger import LedgerWriter
from tests.builders import NOW, RecordingWriter, gpu_pod, usage_identity

STARTED = NOW - timedelta(minutes=10)
GRANT = GrantState(8, NOW - timedelta(hours=2))


def last_state(
    *, gpus: int = 2, deleted: datetime | None = None, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "p", "namespace": "t", "uid": "uid-p", "annotations": annotations or {}}
    if deleted is not None:
        metadata["deletionTimestamp"] = deleted.isoformat()
    container = {"name": "c", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}
    status = {
        "phase": "Running",
        "containerStatuses": [{"name": "c", "state": {"running": {"startedAt": STARTED.isoformat()}}}],
    }
    return {"metadata": metadata, "spec": {"containers": [container]}, "status": status}


def test_a_pod_deleted_without_its_finalizer_ends_at_its_deletion_or_when_it_was_seen_gone() -> None:
    deleted = NOW - timedelta(minutes=2)
    pod = departed_pod(last_state(deleted=deleted), NOW)
    assert pod is not None
    assert pod.interval is not None
    assert (pod.interval.start, pod.interval.end, pod.interval.gpus) == (STARTED, deleted, 2)
    assert (pod.finished, pod.has_finalizer, pod.departed) == (True, False, True)
    # A force deletion without a grace period leaves no deletionTimestamp: it ended when it was seen gone.
    forced = departed_pod(last_state(), NOW)
    assert forced is not None
    assert forced.interval is not None
    assert forced.interval.end == NOW
    # Its deadline was still ahead, yet the object is gone: it ended no later than that.
    early = departed_pod(last_state(deleted=NOW + timedelta(seconds=30)), NOW)
    assert early is not None
    assert early.interval is not None
    assert (early.interval.end, early.interval.end_is_deadline) == (NOW, False)


def test_a_pod_that_held_no_gpus_is_not_remembered() -> None:
    assert departed_pod(last_state(gpus=0, deleted=NOW), NOW) is None


def test_a_pod_gpuaas_released_departs_too_and_books_nothing_more() -> None:
    """Nothing on the object says who removed the last finalizer, so gpuaas's own releases are remembered as well:
    their watermarks hold their whole interval, and booking them again writes and reports nothing."""
    writer = RecordingWriter()
    ledger = LedgerWriter(time_zone="UTC", writer=writer, flush_interval=timedelta(hours=1))
    deleted = NOW - timedelta(minutes=2)
    pod = gpu_pod("p", "t", 2, started=STARTED, ended=deleted, finished=True).ledger
    ledger.book(usage_identity(), "t", {}, [pod], GRANT, NOW)
    assert [type(a) for a in writer.actions] == [CreateUsage, ReleasePod]
    record = booked_record(writer)
    gone = departed_pod(last_state(deleted=deleted), NOW)
    assert gone is not None
    written = WrittenLedger(last_write=NOW)  # no flush due: only a departure would write now
    later = NOW + timedelta(seconds=1)
    plan = plan_booking(
        usage_identity(), {record.name: record}, written, [gone], GRANT, later, "UTC", timedelta(hours=1)
    )
    assert plan.departures == ()
    assert plan.actions == []
    assert plan.booked["2026-11"].used_gpu_seconds == 2 * 8 * 60


def test_departed_pods_are_remembered_until_a_while_after_their_end() -> None:
    memory = DepartedPods()
    pod = departed_pod(last_state(deleted=NOW), NOW)
    assert pod is not None
    memory.remember(pod, NOW)
    assert memory.of("t") == [pod]
    assert memory.of("other") == []
    memory.forget_expired(NOW + DEPARTED_POD_MEMORY - timedelta(seconds=1))
    assert memory.of("t") == [pod]
    memory.forget_expired(NOW + DEPARTED_POD_MEMORY)
    assert memory.of("t") == []
    assert memory.by_namespace == {}


def booked_record(writer: RecordingWriter) -> GpuUsage:
    """The record as stored after the writer's creates and ledger writes."""
    (create,) = writer.of(CreateUsage)
    record = create.record
    for write in writer.of(WriteUsageLedger):
        record = record.model_copy(update={"ledger": write.ledger})
    return record


def test_a_departed_pod_is_booked_at_once_to_its_end_and_a_second_replica_books_it_not_again() -> None:
    writer = RecordingWriter()
    ledger = LedgerWriter(time_zone="UTC", writer=writer, flush_interval=timedelta(hours=1))
    running = gpu_pod("p", "t", 2, started=STARTED).ledger
    flushed = NOW - timedelta(minutes=5)
    ledger.book(usage_identity(), "t", {}, [running], GRANT, flushed, force=True)  # the last periodic flush
    record = booked_record(writer)
    assert record.ledger.used_gpu_seconds == 2 * 5 * 60

    # The tenant's pod went 2 minutes ago without its finalizer; the index no longer has it.
    gone = departed_pod(last_state(deleted=NOW - timedelta(minutes=2)), NOW)
    assert gone is not None
    indexed = {record.name: record}
    ledger.book(usage_identity(), "t", indexed, [gone], GRANT, NOW)  # written at once, not at the next flush
    record = booked_record(writer)
    assert record.ledger.used_gpu_seconds == 2 * 8 * 60  # started 10 minutes ago, deleted 2 minutes ago
    assert writer.of(ReleasePod) == []  # nothing to release: the object is gone

    # A standby remembered it too; having taken over, it books nothing more.
    standby = RecordingWriter()
    LedgerWriter(time_zone="UTC", writer=standby).book(
        usage_identity(), "t", {record.name: record}, [gone], GRANT, NOW + timedelta(minutes=1), force=True
    )
    # (It writes the allocation's granted and idle time of that minute; the pod's GPU time stands.)
    assert [w.ledger.used_gpu_seconds for w in standby.of(WriteUsageLedger)] == [2 * 8 * 60]


def test_the_watermark_of_a_gone_pod_outlives_every_replica_s_memory_of_it() -> None:
    writer = RecordingWriter()
    ledger = LedgerWriter(time_zone="UTC", writer=writer, read_live_pod_uids=lambda namespace: set())
    gone = departed_pod(last_state(deleted=NOW), NOW)
    assert gone is not None
    ledger.book(usage_identity(), "t", {}, [gone], GRANT, NOW, force=True)
    record = booked_record(writer)
    assert "uid-p" in record.ledger.pods

    def pods_after(later: datetime, pods: list[LedgerPod]) -> set[str]:
        LedgerWriter(time_zone="UTC", writer=writer, read_live_pod_uids=lambda namespace: set()).book(
            usage_identity(), "t", {record.name: record}, pods, GRANT, later, force=True
        )
        writes = writer.of(WriteUsageLedger)
        return set(writes[-1].ledger.pods) if writes else set(record.ledger.pods)

    assert pods_after(NOW + DEPARTED_POD_MEMORY, []) == {"uid-p"}  # no replica remembers the pod; the mark stays
    assert pods_after(NOW + WATERMARK_KEEP - timedelta(seconds=1), []) == {"uid-p"}
    assert pods_after(NOW + WATERMARK_KEEP, []) == set()
