"""The pool pass's executor: carries out what the planner (domain/planner.py) decides, through the writer port.

A single reconciler per pool is the only writer of its allocations' grants, so admission is serialised per pool and
concurrent applies can never overcommit. Every pass is level-triggered: it starts from a snapshot of current state
(kopf indexes) and corrects whatever differs. The reconciler's own fields are the pass's memory: what this replica
granted and wrote, which the index may not show yet.

A pass decides for every allocation of the pool, then hands each changed allocation's writes to a worker. It waits
for them a bounded time: writes still running then stay in flight, and later passes keep deciding with those
allocations (their grants count) but hand them no new work until theirs is done. So a burst of thousands of new
allocations does not hold up the pool's decisions for as long as their writes take.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from time import monotonic
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from gpuaas.api.allocation import GpuAllocationSpec, GpuAllocationStatus
from gpuaas.api.pool import GpuPoolSpec, GpuPoolStatus
from gpuaas.api.usage import GpuUsageSpec, GrantChange, UsageLedger, UsageTenant
from gpuaas.domain import planner
from gpuaas.domain.actions import Action, ApplyObject, PatchNode, written_object
from gpuaas.domain.capacity import AdmissionDecision
from gpuaas.domain.downtime import PoolBreakdown
from gpuaas.domain.history import stamped_changes
from gpuaas.domain.ledger import GrantState
from gpuaas.domain.lifecycle import AllocationSample, allocation_status, rejected_status
from gpuaas.domain.nodes import NodeInfo
from gpuaas.domain.planner import Candidate, RecentApply, recent_apply
from gpuaas.domain.pool import PoolCapacity, members_capacity, pool_nodes, pool_status
from gpuaas.domain.snapshot import AllocationView, ObjectKey, PoolSnapshot, observed_key
from gpuaas.k8s.ledger import LedgerWriter
from gpuaas.k8s.pool_ledger import PoolLedgerWriter
from gpuaas.k8s.pool_status import PoolStatusWriter
from gpuaas.k8s.writer import ClusterWriter, cluster_writer

logger = logging.getLogger(__name__)
# A pool's writes at once. The API server's cores are the limit, not this: with 16 a pool (80 threads in the
# program's five) no more writes went through, but every thread woken by a response took its turn at the interpreter
# lock before the event loop and the passes; at 10,000 allocations the indexes showed the operator's own applies
# 22-46 s after them on average, against 7-9 s with 8 (docs/benchmarks.md, fourteenth session).
WORKERS = 8
# Extra threads a pool's workers may borrow to run one allocation's independent writes at once (its quota, limit
# range and binding after its namespace: one on the worker, two borrowed): on a quiet cluster that is two round trips
# fewer to Ready. In a burst the slots are taken and the workers write one after another, so the writes in flight
# stay near WORKERS per pool.
FANOUT_WORKERS = 2
# A pool's writer has a client of its own with this many connections: its workers, their fan-out threads, the pass's
# own writes (intake), the pool's status thread and its month-record thread all at once, and no pool waits for
# another's.
POOL_CONNECTIONS = WORKERS + FANOUT_WORKERS + 3
# The most usage refreshes (`planner.METRICS_REFRESH`) one pass hands out. They go to one worker as one batch, at
# most one batch a pool at a time, queued behind the pass's decisions: handed out one by one, every allocation's
# counters due every 15 s came to 800-1,900 queued refreshes per pool at 10,000 allocations, before the writes of
# allocations still waiting for their first decision; handed out 32 at a time, each 32 that ended woke another full
# pass (the minute after 8,626 pods ran over 3,000 allocations: 0.43 cores, against 0.32 with batches; benchmarks.md,
# nineteenth session). Past the bound a refresh waits for a later pass, and the counters are older.
REFRESH_BATCH = 512


@dataclass(frozen=True)
class _Cached:
    fingerprint: tuple[object, ...]
    recheck_at: datetime
    sample: AllocationSample
    refresh_at: datetime  # when its usage counters are booked again (planner.METRICS_REFRESH)


@dataclass
class _Intake:
    """An allocation's intake as a candidate, kept while its `planner.pass_inputs` compare equal: a steady pass does
    not redo each allocation's intake and fingerprint, only compares what they were made from."""

    inputs: tuple[object, ...]
    candidate: Candidate
    reads: tuple[object, ...] | None = None  # planner.snapshot_reads, once a pass needed them


@dataclass(frozen=True)
class PassResult:
    pool: GpuPoolStatus
    samples: list[AllocationSample]
    processed: int = 0  # allocations handed work by this pass (not skipped as unchanged, not already in flight)
    # allocation -> its namespace, for deleted allocations whose namespace is still being deleted
    terminating_namespaces: dict[str, str] = field(default_factory=dict)
    in_flight: int = 0  # allocations whose writes were still running when the pass ended
    # allocations whose writes ended in an error since the last pass, and the pool's failed status writes (logged;
    # retried)
    failed: int = 0
    turn_seconds: float = 0.0  # waiting for the pool's turn to decide (`PoolReconciler.deciding_turn`)
    deciding_seconds: float = 0.0  # the pass's own work, before it waited for writes
    waiting_seconds: float = 0.0  # waiting for the writes it handed out (bounded by `wait_seconds`)
    # (kind, seconds): applies that the index showed since the last pass, and how long after their write it did
    shown_after: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class DecidedPass:
    """A pass between its deciding (`PoolReconciler.decide`) and its end (`PoolReconciler.end_pass`)."""

    snap: PoolSnapshot
    now: datetime
    pool_spec: GpuPoolSpec
    capacity: PoolCapacity
    admission: planner.PoolAdmission
    breakdown: PoolBreakdown
    candidates: list[Candidate]
    handed_out: int
    failed: int
    deciding_seconds: float


class _RefreshFuture(Future[AllocationSample | None]):
    """An allocation's usage refresh in a batch (`REFRESH_BATCH`): in flight like its writes (no decision of it starts
    meanwhile), but not a write a pass waits for, wakes for, or reports in flight."""


@dataclass
class PoolReconciler:
    pool: str
    ledger: LedgerWriter
    writer: ClusterWriter = field(default_factory=cluster_writer)
    # uid -> GPUs this reconciler granted; authoritative while it runs (the index may lag its writes).
    granted: dict[str, int] = field(default_factory=dict)
    # uid -> the status this reconciler last wrote.
    written: dict[str, dict[str, Any]] = field(default_factory=dict)
    # uid -> tenant objects applied moments ago, so applies the watch has not shown yet are not repeated.
    applied: dict[str, dict[ObjectKey, RecentApply]] = field(default_factory=dict)
    pool_status: PoolStatusWriter = field(init=False)
    # Held while the pass decides. The operator gives every pool the same lock: five pools deciding at once in five
    # threads each got a fifth of the interpreter lock, so each pass took five times its own work (at 10,000
    # allocations, dozens of passes over 2 s). Waiting for it holds nothing: the thread sleeps outside the GIL.
    deciding_turn: threading.Lock = field(default_factory=threading.Lock)
    # uid -> namespace: deleted allocations whose namespace is still terminating (reported as a metric).
    waiting_namespaces: dict[str, str] = field(default_factory=dict)
    cache: dict[str, _Cached] = field(default_factory=dict)
    intakes: dict[str, _Intake] = field(default_factory=dict)
    admissions: planner.AdmissionMemo = field(default_factory=planner.AdmissionMemo)
    specs: dict[str, tuple[int | None, GpuAllocationSpec]] = field(default_factory=dict)
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=WORKERS))
    fanout: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=FANOUT_WORKERS))
    _fanout_slots: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(FANOUT_WORKERS)
    )
    # The pool's month records (program = usable granted + unallocated + down); made on the first pass.
    pool_ledger: PoolLedgerWriter | None = None
    # node -> the version its fence patch was planned from, and the patch: while it runs, or until the index shows
    # the node anew, a pass sends it no second one.
    fencing: dict[str, tuple[str, Future[None]]] = field(default_factory=dict)
    # node -> the last patch a worker wrote to it that carried the version it was planned from. While the index still
    # shows that version, a pass plans the same patch from it again: the node already has it, and the API server
    # would refuse it as stale.
    nodes_patched: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    # uid -> the writes a pass handed to a worker, until a later pass collects them.
    in_flight: dict[str, Future[AllocationSample | None]] = field(default_factory=dict)
    # uid -> its latest sample, which stands for it while its writes are in flight.
    last_samples: dict[str, AllocationSample] = field(default_factory=dict)
    # Called from a worker when the writes in flight drop below `low_water` (and when the last end): the workers are
    # about to run out of work, so the pool's next pass should come now.
    on_work_done: Callable[[], None] = lambda: None
    on_stop: Callable[[], None] = lambda: None  # after the last write ended (closes the pool's own client)
    low_water: int = WORKERS
    refresh_batch: int = REFRESH_BATCH
    _refreshes: Future[None] | None = None  # the pool's batch of usage refreshes, while it is queued or running
    _stopping: threading.Event = field(default_factory=threading.Event)
    _running: int = 0
    _running_lock: threading.Lock = field(default_factory=threading.Lock)
    _shown_after: list[tuple[str, float]] = field(default_factory=list)  # PassResult.shown_after, from the workers
    _shown_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.pool_status = PoolStatusWriter(self.pool, self.writer)

    def run_pass(self, snap: PoolSnapshot, now: datetime, wait_seconds: float | None = None) -> PassResult:
        """Decide for every allocation in the pool's turn and hand out the writes; wait for them at most
        `wait_seconds` (None: until all are done)."""
        turn_asked = monotonic()
        with self.deciding_turn:
            turn_seconds = monotonic() - turn_asked
            decided = self.decide(snap, now)
        return replace(self.end_pass(decided, wait_seconds), turn_seconds=turn_seconds)

    def decide(self, snap: PoolSnapshot, now: datetime) -> DecidedPass:
        """A pass's own work, in the pool's turn: admit, hand the workers what changed."""
        clock_started = monotonic()
        failed = self._collect_finished()
        pool_spec = GpuPoolSpec.model_validate(dict(snap.spec))
        members = pool_nodes(pool_spec, snap.nodes)
        capacity = members_capacity(pool_spec, members)
        self._fence_nodes(planner.pool_taint_actions(self.pool, pool_spec, members), members)

        candidates: list[Candidate] = []
        for view in snap.allocations:
            # What the intake is made from; `_intake` changes none of it for a candidate (only its finalizer write).
            inputs = planner.pass_inputs(view, snap, self.written.get(view.uid), self.granted.get(view.uid))
            kept = self.intakes.pop(view.uid, None)
            if kept is not None and kept.inputs == inputs:
                self.intakes[view.uid] = kept
                candidates.append(kept.candidate)
                continue
            if view.uid in self.in_flight:
                found = self._candidate_in_flight(view, snap)
            else:
                found = self._intake(view, snap, members, pool_spec, now)
                if found is not None:  # only after `_intake`'s own writes: a kept intake skips them too
                    self.intakes[view.uid] = _Intake(inputs, found)
            if found is not None:
                candidates.append(found)
        self._forget_all_but({view.uid for view in snap.allocations} | set(self.in_flight))

        held = planner.held_by_allocation(snap)
        admission = planner.admit_pool(capacity.program_gpus, candidates, held, now, self.admissions)
        decisions = admission.result.decisions
        for c in candidates:
            self.granted[c.view.uid] = decisions[c.view.name].granted_gpus
        breakdown = planner.breakdown_now(
            pool_spec, members, capacity.program_gpus, candidates, decisions, snap.exclusive_holders
        )
        handed_out = self._hand_out_changed(
            candidates, decisions, breakdown.down_by_allocation, snap, members, pool_spec, now, clock_started
        )
        return DecidedPass(
            snap,
            now,
            pool_spec,
            capacity,
            admission,
            breakdown,
            candidates,
            len(handed_out),
            failed,
            deciding_seconds=monotonic() - clock_started,
        )

    def end_pass(self, decided: DecidedPass, wait_seconds: float | None = None) -> PassResult:
        """Wait for the writes handed out at most `wait_seconds` (None: until all are done, usage refreshes too),
        then report the pool. Under a backlog (more decisions in flight than workers) a bounded pass waits for
        nothing: the writes queued behind the running ones would not end within the bound, and the workers wake the
        pool when they run low. A bounded pass never waits for usage refreshes: the next pass takes in their
        counters."""
        snap, now = decided.snap, decided.now
        decisions = [future for future in self.in_flight.values() if not isinstance(future, _RefreshFuture)]
        if wait_seconds is not None and sum(1 for future in decisions if not future.done()) > WORKERS:
            wait_seconds = 0.0
        waiting_started = monotonic()
        wait(list(self.in_flight.values()) if wait_seconds is None else decisions, timeout=wait_seconds)
        waiting_seconds = monotonic() - waiting_started
        failed = decided.failed + self._collect_finished()
        samples = [self.last_samples[c.view.uid] for c in decided.candidates if c.view.uid in self.last_samples]

        latest_pool = self.pool_status.latest
        previous_pool = GpuPoolStatus.model_validate(latest_pool or dict(snap.status))
        new_pool = pool_status(
            decided.pool_spec,
            previous_pool,
            decided.capacity,
            snap.generation,
            now,
            granted_gpus=decided.admission.result.summary.granted_gpus,
            held_beyond_grants=decided.admission.held_beyond_grants,
            in_use_gpus=sum(sample.in_use_gpus for sample in samples),
            queued=decided.admission.result.summary.queued,
            breakdown=decided.breakdown,
        )
        sent: list[Future[None]] = []
        if new_pool != previous_pool or latest_pool is None:
            sent.append(self.pool_status.send(new_pool.to_wire()))
        pool_ledger = self._pool_ledger()
        record_written = pool_ledger.book(decided.pool_spec, decided.breakdown, now)
        if record_written is not None:
            sent.append(record_written)
        if sent:
            # The pass waits for them only what is left of its bound: on a quiet cluster they are written by then.
            pool_wait_started = monotonic()
            wait(sent, timeout=None if wait_seconds is None else max(0.0, wait_seconds - waiting_seconds))
            waiting_seconds += monotonic() - pool_wait_started
        failed += self.pool_status.failures_since_last_asked() + pool_ledger.failures_since_last_asked()
        names = {view.uid: view.name for view in snap.allocations}
        terminating = {names[uid]: ns for uid, ns in self.waiting_namespaces.items() if uid in names}
        with self._shown_lock:
            shown_after, self._shown_after = tuple(self._shown_after), []
        return PassResult(
            pool=new_pool,
            samples=samples,
            processed=decided.handed_out,
            terminating_namespaces=terminating,
            in_flight=sum(1 for future in self.in_flight.values() if not isinstance(future, _RefreshFuture)),
            failed=failed,
            deciding_seconds=decided.deciding_seconds,
            waiting_seconds=waiting_seconds,
            shown_after=shown_after,
        )

    def _fence_nodes(self, patches: list[PatchNode], members: list[NodeInfo]) -> None:
        """Hand the workers the fence patches not already sent for the node as the index shows it; the pass does
        not wait for them (a new pool's 255-510 nodes took a pass 8-11 s). Each patch carries the version it was
        planned from, so a node that changed since is refused and planned again from its new version."""
        if not patches and not self.fencing:
            return
        versions = {node.name: node.resource_version for node in members}
        for name, (version, sent) in list(self.fencing.items()):
            failed = sent.exception() if sent.done() and not sent.cancelled() else None
            if failed is not None:
                level = logging.INFO if _changed_since_read(failed) else logging.WARNING
                logger.log(level, "pool %s: fencing node %s failed (sent again): %s", self.pool, name, failed)
            if failed is not None or versions.get(name) != version:
                del self.fencing[name]
        for patch in patches:
            if patch.name not in self.fencing:
                self.fencing[patch.name] = (versions[patch.name], self.executor.submit(self.writer.perform, patch))

    def _hand_out_changed(
        self,
        candidates: list[Candidate],
        decisions: Mapping[str, AdmissionDecision],
        down: Mapping[str, int],
        snap: PoolSnapshot,
        members: list[NodeInfo],
        pool_spec: GpuPoolSpec,
        now: datetime,
        clock_started: float,
    ) -> list[str]:
        """Hand a worker each allocation whose inputs changed or whose time came, then, unless the last batch is
        still queued or running, a batch of due usage refreshes; the uids handed work."""
        handed_out: list[str] = []
        refreshes: list[tuple[Candidate, _Cached]] = []
        for c in candidates:
            uid = c.view.uid
            if uid in self.in_flight:
                continue  # its grant counted above; its writes get the decision of a pass after they end
            fingerprint = (
                *planner.fingerprint(c, decisions[c.view.name], self._reads(c, snap)),
                down.get(c.view.name, 0),
            )
            cached = self.cache.get(uid)
            if cached is not None and cached.fingerprint == fingerprint and now < cached.recheck_at:
                # Nothing it depends on changed, and nothing is due but, now and then, its usage counters.
                self.last_samples[uid] = cached.sample
                if now >= cached.refresh_at:
                    refreshes.append((c, cached))
                continue
            decision, down_gpus = decisions[c.view.name], down.get(c.view.name, 0)
            args = (c, decision, down_gpus, fingerprint, snap, members, pool_spec, now, clock_started)
            self._hand_out(uid, self._process, *args)
            handed_out.append(uid)
        if refreshes and (self._refreshes is None or self._refreshes.done()):
            refreshes.sort(key=lambda due: due[1].refresh_at)  # the longest due first
            batch = refreshes[: self.refresh_batch]
            self._hand_out_refreshes(batch, snap, pool_spec, now)
            handed_out.extend(c.view.uid for c, _ in batch)
        return handed_out

    def stop(self) -> None:
        """Drop the writes not started and wait for those running: after this, another replica may lead."""
        self._stopping.set()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.fanout.shutdown(wait=True)
        self.pool_status.stop()
        if self.pool_ledger is not None:
            self.pool_ledger.stop()
        self.on_stop()

    def _hand_out(self, uid: str, work: Callable[..., AllocationSample | None], *args: Any) -> None:
        with self._running_lock:
            self._running += 1
        future = self.executor.submit(work, *args)
        self.in_flight[uid] = future
        future.add_done_callback(self._work_ended)

    def _work_ended(self, _: Future[AllocationSample | None]) -> None:
        with self._running_lock:
            self._running -= 1
            running_low = self._running in (0, self.low_water - 1)
        if running_low:
            self.on_work_done()

    def _collect_finished(self) -> int:
        """Take in the writes that ended: their samples, and how many failed (each logged; a later pass retries)."""
        failed = 0
        for uid, future in list(self.in_flight.items()):
            if not future.done():
                continue
            del self.in_flight[uid]
            if future.cancelled():  # dropped by `stop`
                continue
            error = future.exception()
            if error is not None:
                failed += 1
                if _changed_since_read(error):  # expected now and then: planned again from the fresh object
                    logger.info("pool %s: a write of allocation %s was refused as stale: %s", self.pool, uid, error)
                else:
                    logger.error("pool %s: writes of allocation %s failed", self.pool, uid, exc_info=error)
                continue
            sample = future.result()
            if sample is not None:
                self.last_samples[uid] = sample
        return failed

    def _pool_ledger(self) -> PoolLedgerWriter:
        if self.pool_ledger is None:
            self.pool_ledger = PoolLedgerWriter(
                self.pool, self.ledger.time_zone, self.ledger.flush_interval, self.writer
            )
        return self.pool_ledger

    def _forget_all_but(self, live_uids: set[str]) -> None:
        for memory in (self.cache, self.intakes, self.specs, self.waiting_namespaces, self.applied, self.last_samples):
            for uid in set(memory) - live_uids:
                memory.pop(uid, None)
        for uid in set(self.granted) - live_uids:
            self.granted.pop(uid, None)
            self.written.pop(uid, None)
            self.ledger.forget(uid)

    def _perform_all(self, actions: Iterable[Action]) -> None:
        for action in self._not_written(actions):
            self.writer.perform(action)
            self._remember_node_patch(action)

    def _not_written(self, actions: Iterable[Action]) -> list[Action]:
        """`actions` less the node patches this reconciler already wrote from the version they were planned from."""
        return [
            action
            for action in actions
            if not (isinstance(action, PatchNode) and self.nodes_patched.get(action.name) == action.patch)
        ]

    def _remember_node_patch(self, action: Action) -> None:
        # Only a patch with a version: one without (labels only) is planned again only if the node lost them since.
        if isinstance(action, PatchNode) and action.patch.get("metadata", {}).get("resourceVersion"):
            self.nodes_patched[action.name] = action.patch

    def _reads(self, c: Candidate, snap: PoolSnapshot) -> tuple[object, ...]:
        kept = self.intakes.get(c.view.uid)
        if kept is None or kept.candidate is not c:
            return planner.snapshot_reads(c, snap)
        if kept.reads is None:
            kept.reads = planner.snapshot_reads(c, snap)
        return kept.reads

    def _intake(
        self, view: AllocationView, snap: PoolSnapshot, members: list[NodeInfo], pool_spec: GpuPoolSpec, now: datetime
    ) -> Candidate | None:
        """Release deleted allocations, reject invalid ones, and turn the rest into admission candidates."""
        if view.deleting:
            self._hand_out(view.uid, self._release, view, snap, members, pool_spec, now)
            return None
        self._perform_all(planner.finalizer_actions(view))
        previous = self._status(view)
        found = planner.intake(view, self._parsed_spec(view), snap, previous, self.granted.get(view.uid))
        if isinstance(found, planner.Rejection):
            self.granted[view.uid] = 0
            status = rejected_status(previous, found.reason, found.message, view.generation, now)
            self._write_status(view, previous, status)
            return None
        return found

    def _candidate_in_flight(self, view: AllocationView, snap: PoolSnapshot) -> Candidate | None:
        """An allocation whose writes are running still competes with its grant; a deletion or a rejection is
        carried out once they end (until then it is left out, as it will be)."""
        if view.deleting:
            return None
        found = planner.intake(view, self._parsed_spec(view), snap, self._status(view), self.granted.get(view.uid))
        return found if isinstance(found, Candidate) else None

    def _process(
        self,
        c: Candidate,
        decision: AdmissionDecision,
        down_gpus: int,
        fingerprint: tuple[object, ...],
        snap: PoolSnapshot,
        members: list[NodeInfo],
        pool_spec: GpuPoolSpec,
        now: datetime,
        clock_started: float,
    ) -> AllocationSample:
        """Book the grant that held until now, then carry out the new decision and report it."""
        view, spec = c.view, c.spec
        force = planner.grant_changes(c.grant, decision, down_gpus)
        booked = self._book(view, spec, pool_spec, snap, c.grant, now, force=force)
        plan = planner.plan_tenant(view, spec, decision, snap, members, pool_spec, self.applied.get(view.uid, {}), now)
        for key in plan.shown:
            shown = self.applied[view.uid].pop(key, None)
            if shown is not None:
                with self._shown_lock:
                    self._shown_after.append((key[0], max(0.0, (now - shown.at).total_seconds())))
        outcome = planner.tenant_outcome(
            spec.target_namespace, plan, decision, self._carry_out(view, plan, now, clock_started)
        )
        previous = self._status(view)
        status = allocation_status(
            previous, decision, outcome, spec.exclusive_nodes, view.generation, now, spec.idle.after_duration, down_gpus
        )
        self._write_status(view, previous, status)
        self._perform_all(planner.idle_actions(view, spec, previous, status))
        # The grant history is written after the status, so that recording a change never delays its effect.
        changes = stamped_changes(view.history_stamps, view.spec, None, now)
        if self.ledger.unrecorded(view.uid, snap.usage.get(view.uid, {}), changes):
            self._book(view, spec, pool_spec, snap, c.grant, now, changes=changes)
        sample = planner.allocation_sample(self.pool, pool_spec, view, spec, status, _records(view, snap, booked))
        if outcome.objects_applied and not outcome.settling and not spec.exclusive_nodes:  # exclusive: node health
            pods = snap.pods_of(spec.target_namespace)
            due = planner.recheck_at(spec, status, pods, self.ledger.next_due(view.uid, now), now)
            self.cache[view.uid] = _Cached(fingerprint, due, sample, now + planner.METRICS_REFRESH)
        return sample

    def _hand_out_refreshes(
        self, batch: list[tuple[Candidate, _Cached]], snap: PoolSnapshot, pool_spec: GpuPoolSpec, now: datetime
    ) -> None:
        """One worker refreshes the batch in order; each allocation's future ends with its own refresh."""
        refreshes = [(c, cached, _RefreshFuture()) for c, cached in batch]
        for c, _, future in refreshes:
            self.in_flight[c.view.uid] = future

        def refresh_all() -> None:
            for c, cached, future in refreshes:
                if self._stopping.is_set():  # another replica may lead soon: leave the rest
                    future.cancel()
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(self._refresh_usage(c, cached, snap, pool_spec, now))
                except Exception as error:  # that allocation's failure, logged and counted when collected
                    future.set_exception(error)

        def cancel_if_dropped(whole: Future[None]) -> None:
            if whole.cancelled():  # dropped by `stop` before it ran
                for _, _, future in refreshes:
                    future.cancel()

        self._refreshes = self.executor.submit(refresh_all)
        self._refreshes.add_done_callback(cancel_if_dropped)

    def _refresh_usage(
        self, c: Candidate, cached: _Cached, snap: PoolSnapshot, pool_spec: GpuPoolSpec, now: datetime
    ) -> AllocationSample:
        """Book the allocation's usage up to now for its counters (no write is due: that would be a recheck), and
        keep the rest of its last sample: about half the work of processing it in full (bench/refresh_pass.py)."""
        booked = self._book(c.view, c.spec, pool_spec, snap, c.grant, now)
        sample = planner.with_usage(cached.sample, _records(c.view, snap, booked))
        self.cache[c.view.uid] = replace(cached, sample=sample, refresh_at=now + planner.METRICS_REFRESH)
        return sample

    def _carry_out(
        self, view: AllocationView, plan: planner.TenantPlan, now: datetime, clock_started: float
    ) -> str | None:
        """Perform the tenant plan stage by stage; a failed write ends it after its stage (the next pass retries from
        fresh state)."""
        for stage in planner.write_stages(self._not_written(plan.actions)):
            outcomes = self._perform_at_once(stage)
            for action, (error, ended) in zip(stage, outcomes, strict=True):
                if error is None:
                    self._remember_node_patch(action)
                if error is None and isinstance(action, ApplyObject):
                    # When the apply ended, on the pass's clock: in a burst a worker writes seconds after its pass
                    # began, and the watch's settling time counts from the write, not from the pass.
                    applied_at = now + timedelta(seconds=ended - clock_started)
                    recent = self.applied.setdefault(view.uid, {})
                    key = observed_key(action.manifest)
                    recent[key] = recent_apply(recent.get(key), action.manifest, applied_at)
            refused = next(
                ((a, error) for a, (error, _) in zip(stage, outcomes, strict=True) if error is not None), None
            )
            if refused is not None:
                action, error = refused
                message = refusal_message(action, error)
                logger.log(
                    logging.INFO if _changed_since_read(error) else logging.WARNING,
                    "allocation %s: %s",
                    view.name,
                    message,
                )
                return message
        return None

    def _perform_at_once(self, actions: Sequence[Action]) -> list[tuple[ApiException | None, float]]:
        """Each write's refusal (or None) and when it ended. The first runs on this worker; each other borrows a
        fan-out thread while one is free, else runs here after it."""
        borrowed: dict[int, Future[tuple[ApiException | None, float]]] = {}
        for index in range(1, len(actions)):
            if self._fanout_slots.acquire(blocking=False):
                borrowed[index] = self.fanout.submit(self._attempt_on_loan, actions[index])
        here = {index: self._attempt(action) for index, action in enumerate(actions) if index not in borrowed}
        return [here[index] if index in here else borrowed[index].result() for index in range(len(actions))]

    def _attempt(self, action: Action) -> tuple[ApiException | None, float]:
        try:
            self.writer.perform(action)
        except ApiException as error:
            return error, monotonic()
        return None, monotonic()

    def _attempt_on_loan(self, action: Action) -> tuple[ApiException | None, float]:
        try:
            return self._attempt(action)
        finally:
            self._fanout_slots.release()

    def _book(
        self,
        view: AllocationView,
        spec: GpuAllocationSpec,
        pool_spec: GpuPoolSpec,
        snap: PoolSnapshot,
        grant: GrantState | None,
        now: datetime,
        force: bool = False,
        changes: Sequence[GrantChange] = (),
    ) -> dict[str, UsageLedger]:
        namespace = spec.target_namespace
        identity = GpuUsageSpec(
            allocation=view.name,
            allocation_uid=view.uid,
            namespace=namespace,
            tenant=UsageTenant.model_validate(spec.tenant.model_dump()),
            pool=self.pool,
            gpu_model=pool_spec.gpu_model,
            provider=pool_spec.provider,
            month="1970-01",
            time_zone=self.ledger.time_zone,
        )
        pods = snap.ledger_pods_of(namespace)
        records = snap.usage.get(view.uid, {})
        return self.ledger.book(identity, namespace, records, pods, grant, now, force=force, changes=changes)

    def _parsed_spec(self, view: AllocationView) -> GpuAllocationSpec | ValidationError:
        """Specs only change with the generation; parsing 600 of them every pass would be the pass's cost."""
        cached = self.specs.get(view.uid)
        if cached is None or cached[0] != view.generation:
            try:
                cached = (view.generation, GpuAllocationSpec.model_validate(dict(view.spec)))
            except ValidationError as error:
                return error
            self.specs[view.uid] = cached
        return cached[1]

    def _status_wire(self, view: AllocationView) -> dict[str, Any]:
        """The status as this replica last wrote it, else as the index shows it."""
        return self.written.get(view.uid) or dict(view.status)

    def _status(self, view: AllocationView) -> GpuAllocationStatus:
        return GpuAllocationStatus.model_validate(self._status_wire(view))

    def _write_status(self, view: AllocationView, previous: GpuAllocationStatus, status: GpuAllocationStatus) -> None:
        actions = planner.status_actions(view, previous, self._status_wire(view), status)
        if actions:
            self._perform_all(actions)
            self.written[view.uid] = status.to_wire()

    def _release(
        self, view: AllocationView, snap: PoolSnapshot, members: list[NodeInfo], pool_spec: GpuPoolSpec, now: datetime
    ) -> AllocationSample | None:
        spec = self._parsed_spec(view)
        valid = spec if isinstance(spec, GpuAllocationSpec) else None
        previous = self._status(view)
        if valid is not None and planner.RELEASE_FINALIZER in view.finalizers:
            granted = planner.granted_so_far(previous, self.granted.get(view.uid))
            grant = planner.grant_in_force(valid, view.created, previous, granted)
            changes = stamped_changes(view.history_stamps, view.spec, view.deletion_timestamp, now)
            self._book(view, valid, pool_spec, snap, grant, now, force=True, changes=changes)
        plan = planner.plan_release(view, valid, snap, members, pool_spec, previous, self._status_wire(view), now)
        self._perform_all(plan.actions)
        if plan.grant_returned:
            self.granted.pop(view.uid, None)
        if plan.waiting_for is not None:
            self.waiting_namespaces[view.uid] = plan.waiting_for.name
        if plan.status is not None:
            self.written[view.uid] = plan.status.to_wire()
        if plan.done:
            self.waiting_namespaces.pop(view.uid, None)
            self.written.pop(view.uid, None)
        return None  # a released allocation has no series


def refusal_message(action: Action, error: ApiException) -> str:
    """The QuotaApplied message of a refused write: which object, the API server's answer, and for a stale write
    that it is not a fault (the object changed under the pass; the next pass plans from its new version)."""
    if _changed_since_read(error):
        return (
            f"{written_object(action)} changed since it was read ({error.status} {error.reason}); "
            "written again from its new version"
        )
    return f"{written_object(action)}: {error.status} {error.reason}"


def _changed_since_read(error: BaseException) -> bool:
    """A write sent with the version it was planned from, refused because the object changed since."""
    return isinstance(error, ApiException) and error.status == 409


def _records(view: AllocationView, snap: PoolSnapshot, booked: dict[str, UsageLedger]) -> dict[str, UsageLedger]:
    """The allocation's month ledgers: as the index has them, and those booked just now instead."""
    records = {r.spec.month: r.ledger for r in snap.usage.get(view.uid, {}).values()}
    records.update(booked)
    return records
