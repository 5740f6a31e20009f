"""The pool's month records (GpuPoolUsage): each pass books the breakdown that held since the previous pass
(domain/downtime.py); the records are written when the hardware changes (down, back, credited), else at the
ledger's flush interval.

Like the allocations' records, they are the watermark: a replica that starts, or takes over, reads this month's
record (or last month's) and books on from its bookedUntil, with the breakdown it sees first.

The writes run on a thread of the pool's own, one at a time, like its status (pool_status.py): under a burst the
API server took a second or more to answer, and the pass waited for it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from kubernetes.client.exceptions import ApiException

from gpuaas.api.pool import GpuPoolSpec
from gpuaas.api.usage import GpuPoolUsage, GpuPoolUsageSpec, pool_usage_labels
from gpuaas.domain.actions import CreatePoolUsage, WritePoolLedger
from gpuaas.domain.downtime import PoolBreakdown, book_pool
from gpuaas.domain.ledger import month_bounds, month_of
from gpuaas.k8s import usage
from gpuaas.k8s.write_thread import WriteThread
from gpuaas.k8s.writer import ClusterWriter

logger = logging.getLogger(__name__)


HEALTH_WRITE_INTERVAL = timedelta(seconds=1)


def _health(breakdown: PoolBreakdown) -> tuple[int, int, int]:
    return breakdown.program_gpus, breakdown.healthy_gpus, breakdown.credited_gpus


def pool_usage_name(pool: str, month: str) -> str:
    return f"{pool}-{month}"


@dataclass
class PoolLedgerWriter:
    pool: str
    time_zone: str
    flush_interval: timedelta
    writer: ClusterWriter
    read_record: Callable[[str], GpuPoolUsage | None] = usage.read_pool_usage
    # month -> the record as booked in memory; `stored` holds the months the API server has.
    records: dict[str, GpuPoolUsage] = field(default_factory=dict)
    stored: set[str] = field(default_factory=set)
    unwritten: set[str] = field(default_factory=set)
    since: datetime | None = None
    held: PoolBreakdown | None = None
    last_write: datetime | None = None
    hardware_unwritten: bool = False  # a change of the hardware booked, and no write handed out since
    # Guards the fields above between the pass that books and the thread that writes.
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _writing: Future[None] | None = None
    _thread: WriteThread = field(default_factory=lambda: WriteThread("pool-ledger"))

    def _load(self, now: datetime) -> datetime:
        """This month's record, else last month's; returns where booking carries on from (now, if neither exists)."""
        month = month_of(now, self.time_zone)
        previous = month_of(month_bounds(month, self.time_zone)[0] - timedelta(seconds=1), self.time_zone)
        self.last_write = now
        for candidate in (month, previous):
            record = self.read_record(pool_usage_name(self.pool, candidate))
            if record is not None:
                self.records[candidate] = record
                self.stored.add(candidate)
                return min(now, record.ledger.booked_until or now)
        return now

    def book(self, spec: GpuPoolSpec, breakdown: PoolBreakdown, now: datetime) -> Future[None] | None:
        """Book up to now what held since the previous pass; `breakdown` holds from now on. Returns the write it
        handed to the pool's ledger thread, if one came due (none while one runs: the next pass hands it out)."""
        with self._lock:
            if self.since is None or self.held is None:  # after a restart, the gap is booked with what holds now
                since, held = self._load(now), breakdown
            else:
                since, held = self.since, self.held
            changed = book_pool({m: r.ledger for m, r in self.records.items()}, since, now, held, self.time_zone)
            for month, ledger in changed.items():
                record = self.records.get(month) or GpuPoolUsage(
                    name=pool_usage_name(self.pool, month),
                    spec=GpuPoolUsageSpec(
                        pool=self.pool,
                        gpu_model=spec.gpu_model,
                        provider=spec.provider,
                        month=month,
                        time_zone=self.time_zone,
                    ),
                )
                self.records[month] = record.model_copy(update={"ledger": ledger})
                self.unwritten.add(month)
            self.since, self.held = now, breakdown
            # A change of the hardware (a node down or back, GPUs credited) is written at once, so the record's
            # bookedUntil marks it, but at most once a second: a pool of 510 nodes coming up changes it at every
            # pass. One seen while a write runs, or within the second, is written by the first pass that may: not
            # at the flush, up to a minute on, which a restart would book with the breakdown it finds. Grants come
            # and go far more often and wait for the flush interval.
            self.hardware_unwritten = self.hardware_unwritten or _health(breakdown) != _health(held)
            last = self.last_write
            due = last is None or now - last >= self.flush_interval
            hardware_due = self.hardware_unwritten and (last is None or now - last >= HEALTH_WRITE_INTERVAL)
            if not self.unwritten or not (due or hardware_due) or self._writing is not None:
                return None
            self.hardware_unwritten = False
            # What to write is taken now: a pass that books meanwhile changes the records, not this write.
            writes = [(month, self.records[month], month in self.stored) for month in sorted(self.unwritten)]
            self._writing = self._thread.submit(self._write, writes, now)
            return self._writing

    def failures_since_last_asked(self) -> int:
        """Writes that failed since the last call (but a create that found the record made: that one is read)."""
        return self._thread.failures_since_last_asked()

    def stop(self) -> None:
        """After the write running, if any: another replica reads the record from here on."""
        self._thread.stop()

    def _write(self, writes: list[tuple[str, GpuPoolUsage, bool]], now: datetime) -> None:
        month = ""
        try:
            for month, record, stored in writes:
                if stored:
                    self.writer.perform(WritePoolLedger(record.name, record.ledger, pool_usage_labels(record.spec)))
                else:
                    self.writer.perform(CreatePoolUsage(record))
                with self._lock:
                    self.stored.add(month)
                    if self.records.get(month) is record:  # else booked on since: written by a later flush
                        self.unwritten.discard(month)
        except Exception as error:
            if isinstance(error, ApiException) and error.status == 409:
                # Someone else made the record (a replica that led before): book on from what it holds.
                logger.warning("pool %s: month record exists already (%s); reading it again", self.pool, error.reason)
                with self._lock:
                    self.records.clear()
                    self.stored.clear()
                    self.unwritten.clear()
                    self.since = None
                    self._writing = None
                return
            # Refused (an admission policy, the record deleted under gpuaas) or not answered: memory holds the only
            # account of the split since the last write, so it is kept, whole, and written again by the next pass.
            logger.warning("pool %s: month record write failed (written again by the next pass): %s", self.pool, error)
            with self._lock:
                if isinstance(error, ApiException) and error.status == 404:
                    self.stored.discard(month)  # created again, from memory
                self.last_write = None  # due at once
                self._writing = None
            self._thread.count_failure()
            return
        with self._lock:
            self.last_write = now
            self._writing = None
            # Older months are complete once written; keep only the current one in memory.
            current = month_of(now, self.time_zone)
            for month in [m for m in self.records if m < current and m not in self.unwritten]:
                del self.records[month]
                self.stored.discard(month)
