"""Writes of the usage ledger (GpuUsage records) and the release of the pods' usage finalizer.

The usage finalizer keeps a pod's object until its GPUs are released and booked: a pod being deleted
keeps it until its containers are reported terminated or its deletionTimestamp (the kubelet's kill
deadline) has passed; meanwhile it is booked up to now.

Order matters for exactness: records are written first, finalizers removed after. A crash in between
leaves pods whose intervals are already booked; the next flush books nothing more for them (every
month record carries its own watermarks) and then releases them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.usage import USAGE_PLURAL, GpuUsage, GpuUsageSpec, GpuUsageStatus, usage_name
from gpuaas.domain.fence import USAGE_FINALIZER
from gpuaas.domain.ledger import GrantState, PodInterval, flush, months_touched, prune
from gpuaas.k8s.client import discard

logger = logging.getLogger(__name__)
JSON_PATCH = "application/json-patch+json"


@dataclass(frozen=True)
class LedgerPod:
    """A GPU pod of an allocation's namespace as the ledger sees it."""

    name: str
    namespace: str
    uid: str
    interval: PodInterval | None
    has_finalizer: bool
    # Terminal phase or being deleted: the pod's interval has an end. Its finalizer is removed only once
    # `flush` releases it, i.e. once now has passed that end (a pod being deleted that has not terminated
    # yet ends at its kill deadline, still ahead) and the whole interval is booked.
    finished: bool


@dataclass
class AllocationLedger:
    """The records of one allocation that this operator wrote or read, by month."""

    records: dict[str, GpuUsage] = field(default_factory=dict)
    last_write: datetime | None = None


def record_for(existing: Mapping[str, GpuUsage], spec: GpuUsageSpec) -> str:
    """The record name: `<allocation>-<month>`, suffixed when an earlier allocation of that name owns it."""
    name = usage_name(spec.allocation, spec.month)
    other = existing.get(name)
    if other is not None and other.spec.allocation_uid != spec.allocation_uid:
        return f"{name}-{spec.allocation_uid[:8]}"
    return name


def _create(record: GpuUsage) -> None:
    try:
        response = client.CustomObjectsApi().create_cluster_custom_object(
            GROUP, VERSION, USAGE_PLURAL, record.to_object(), _preload_content=False
        )
        discard(response)
    except ApiException as error:
        if error.status != 409:  # created before a crash; its status is patched next
            raise


def _write_status(name: str, status: GpuUsageStatus) -> None:
    response = client.CustomObjectsApi().patch_cluster_custom_object_status(
        GROUP, VERSION, USAGE_PLURAL, name, {"status": status.to_wire()}, _preload_content=False
    )
    discard(response)


def release_pod(pod: LedgerPod) -> None:
    """Remove the usage finalizer; a test op makes a stale view fail instead of removing the wrong entry."""
    try:
        current = client.CoreV1Api().read_namespaced_pod(pod.name, pod.namespace)
    except ApiException as error:
        if error.status == 404:
            return
        raise
    finalizers = list((current.metadata.finalizers if current.metadata else None) or [])
    if USAGE_FINALIZER not in finalizers:
        return
    index = finalizers.index(USAGE_FINALIZER)
    path = f"/metadata/finalizers/{index}"
    try:
        client.CoreV1Api().patch_namespaced_pod(
            pod.name,
            pod.namespace,
            [{"op": "test", "path": path, "value": USAGE_FINALIZER}, {"op": "remove", "path": path}],
            _content_type=JSON_PATCH,
        )
    except ApiException as error:
        if error.status not in (404, 409, 422):
            raise


def live_pod_uids(namespace: str) -> set[str]:
    """A fresh read (not the index), so pruning never forgets a pod that still exists."""
    pods = client.CoreV1Api().list_namespaced_pod(namespace).items
    return {pod.metadata.uid for pod in pods if pod.metadata and pod.metadata.uid}


@dataclass
class LedgerWriter:
    time_zone: str
    # Records are rewritten at most this often while nothing ends; ends are booked on the next pass.
    flush_interval: timedelta = timedelta(seconds=60)
    ledgers: dict[str, AllocationLedger] = field(default_factory=dict)
    writes: int = 0
    _writes_lock: threading.Lock = field(default_factory=threading.Lock)

    def _count_write(self) -> None:
        with self._writes_lock:  # passes book allocations on several threads
            self.writes += 1

    def book(
        self,
        identity: GpuUsageSpec,
        namespace: str,
        indexed: Mapping[str, GpuUsage],
        pods: Sequence[LedgerPod],
        grant: GrantState | None,
        now: datetime,
        force: bool = False,
    ) -> dict[str, GpuUsageStatus]:
        """Book one allocation up to `now`. `identity` is the record spec without month; `indexed`
        holds the records the index has (by name). Returns every touched month's status as booked up to
        now, written or not (for live metrics)."""
        ledger = self.ledgers.get(identity.allocation_uid)
        if ledger is None:
            # The first write waits for the flush interval like any other: nothing is lost meanwhile,
            # because the watermarks in the records (or their absence) say what is not booked yet.
            ledger = self.ledgers[identity.allocation_uid] = AllocationLedger(last_write=now)
        intervals = [pod.interval for pod in pods if pod.interval is not None]
        months = months_touched(intervals, grant, now, self.time_zone)
        current: dict[str, GpuUsage] = {}
        for month in months:
            spec = identity.model_copy(update={"month": month})
            name = record_for(indexed, spec)
            known = ledger.records.get(month) or indexed.get(name)
            current[month] = known if known is not None else GpuUsage(name=name, spec=spec)
        statuses = {m: r.status for m, r in current.items() if r.name in indexed or m in ledger.records}
        due = force or ledger.last_write is None or now - ledger.last_write >= self.flush_interval
        pruned: set[str] = set()
        known_uids = {pod.uid for pod in pods}
        if due and any(uid not in known_uids for status in statuses.values() for uid in status.pods):
            live = live_pod_uids(namespace)
            for month, status in list(statuses.items()):
                kept = prune(status, live)
                if kept != status:
                    statuses[month] = kept
                    pruned.add(month)
        result = flush(statuses, intervals, grant, now, self.time_zone)
        to_write = dict(result.records)
        for month in pruned - set(to_write):
            to_write[month] = statuses[month]
        finished_unbooked = [p for p in pods if p.has_finalizer and p.finished and p.interval is None]
        released = set(result.released)
        ending = any(p.has_finalizer and p.finished and p.uid in released for p in pods) or bool(finished_unbooked)
        booked = {**statuses, **to_write}
        if to_write and (due or ending):
            for month, status in sorted(to_write.items()):
                record = current[month]
                if month in result.created and record.name not in indexed and month not in ledger.records:
                    _create(record)
                    self._count_write()
                _write_status(record.name, status)
                self._count_write()
                ledger.records[month] = record.model_copy(update={"status": status})
            ledger.last_write = now
        elif to_write:
            return booked  # booked in memory only; written at the next due flush
        for pod in pods:
            if pod.has_finalizer and pod.finished and (pod.uid in released or pod.interval is None):
                release_pod(pod)
        return booked

    def next_due(self, allocation_uid: str, now: datetime) -> datetime:
        ledger = self.ledgers.get(allocation_uid)
        return now if ledger is None or ledger.last_write is None else ledger.last_write + self.flush_interval

    def forget(self, allocation_uid: str) -> None:
        self.ledgers.pop(allocation_uid, None)


def to_ledger_pod(meta: Mapping[str, Any], interval: PodInterval | None, phase: str | None) -> LedgerPod:
    return LedgerPod(
        name=str(meta.get("name")),
        namespace=str(meta.get("namespace")),
        uid=str(meta.get("uid")),
        interval=interval,
        has_finalizer=USAGE_FINALIZER in (meta.get("finalizers") or []),
        finished=bool(meta.get("deletionTimestamp")) or phase in ("Succeeded", "Failed"),
    )
