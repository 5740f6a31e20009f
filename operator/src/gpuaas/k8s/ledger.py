"""The ledger writer: carries out each allocation's booking plan (domain/booking.py) and remembers what it wrote.

The usage finalizer keeps a pod's object until its GPUs are released and booked: a pod being deleted
keeps it until its containers are reported terminated or its deletionTimestamp (the kubelet's kill
deadline) has passed; meanwhile it is booked up to now.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from gpuaas.api.usage import GpuUsage, GpuUsageSpec, GrantChange, UsageLedger
from gpuaas.domain.actions import CreateUsage, WriteUsageLedger
from gpuaas.domain.booking import QUIET_FLUSH_FACTOR, WrittenLedger, plan_booking, unrecorded_changes
from gpuaas.domain.ledger import GrantState, LedgerPod
from gpuaas.k8s import usage
from gpuaas.k8s.writer import ClusterWriter, cluster_writer

logger = logging.getLogger(__name__)


@dataclass
class LedgerWriter:
    time_zone: str
    # Records are rewritten at most this often while nothing ends; ends are booked on the next pass.
    flush_interval: timedelta = timedelta(seconds=60)
    writer: ClusterWriter = field(default_factory=cluster_writer)
    # A fresh read of a namespace's pod uids (not the index), so pruning never forgets a pod that still exists.
    read_live_pod_uids: Callable[[str], set[str]] = usage.live_pod_uids
    ledgers: dict[str, WrittenLedger] = field(default_factory=dict)
    writes: int = 0
    _writes_lock: threading.Lock = field(default_factory=threading.Lock)
    _writes_reported: int = 0

    def book(
        self,
        identity: GpuUsageSpec,
        namespace: str,
        indexed: Mapping[str, GpuUsage],
        pods: Sequence[LedgerPod],
        grant: GrantState | None,
        now: datetime,
        force: bool = False,
        changes: Sequence[GrantChange] = (),
    ) -> dict[str, UsageLedger]:
        """Book one allocation up to `now` and write what is due. Returns every touched month's ledger as booked up
        to now, written or not (for live metrics)."""
        uid = identity.allocation_uid
        # The first write waits for the flush interval like any other: nothing is lost meanwhile, because the
        # watermarks in the records (or their absence) say what is not booked yet.
        ledger = self.ledgers.setdefault(uid, WrittenLedger(last_write=now))
        args = (identity, indexed, ledger, pods, grant, now, self.time_zone, self.flush_interval, force)
        plan = plan_booking(*args, changes=changes)
        if plan.needs_live_pods:
            live = frozenset(self.read_live_pod_uids(namespace))
            plan = plan_booking(*args, live_pod_uids=live, changes=changes)
        for action in plan.actions:
            self.writer.perform(action)
            if isinstance(action, CreateUsage | WriteUsageLedger):
                record = action.record if isinstance(action, CreateUsage) else plan.written[action.name]
                with self._writes_lock:  # passes book allocations on several threads
                    self.writes += 1
                written = {**self.ledgers[uid].records, record.spec.month: record}
                self.ledgers[uid] = replace(self.ledgers[uid], records=written)
        if plan.written:
            self.ledgers[uid] = replace(self.ledgers[uid], last_write=now, quiet=False)
        elif plan.quiet != self.ledgers[uid].quiet:
            self.ledgers[uid] = replace(self.ledgers[uid], quiet=plan.quiet)
        for name in plan.departures:
            logger.info(f"pod {namespace}/{name} went without gpuaas releasing it; booked from its last state")
        return plan.booked

    def writes_since_last_asked(self) -> int:
        """Record writes since the last call: workers write between passes too, so a pass's own delta misses some."""
        with self._writes_lock:
            new, self._writes_reported = self.writes - self._writes_reported, self.writes
        return new

    def unrecorded(self, allocation_uid: str, indexed: Mapping[str, GpuUsage], changes: Sequence[GrantChange]) -> bool:
        """Whether some of the changes are in no record the index has or this writer wrote."""
        if not changes:
            return False
        written = self.ledgers.get(allocation_uid)
        known = [*indexed.values(), *(written.records.values() if written else ())]
        return bool(unrecorded_changes(changes, allocation_uid, known))

    def next_due(self, allocation_uid: str, now: datetime) -> datetime:
        ledger = self.ledgers.get(allocation_uid)
        if ledger is None or ledger.last_write is None:
            return now
        return ledger.last_write + self.flush_interval * (QUIET_FLUSH_FACTOR if ledger.quiet else 1)

    def forget(self, allocation_uid: str) -> None:
        self.ledgers.pop(allocation_uid, None)
