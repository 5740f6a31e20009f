"""Which replica writes: a coordination.k8s.io Lease, renewed by its holder (rules in domain.leadership).

Every replica keeps its indexes live and answers admission requests; the holder alone runs pool passes. A takeover
is therefore warm: the new holder's indexes are already populated, and its first pass starts on the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpuaas.domain.leadership import LeaseRecord, LeaseTiming, Sighting, Step, next_step, sighting, still_leader

logger = logging.getLogger(__name__)
LAST_PASS_ANNOTATION = "gpuaas.io/last-pass"  # noqa: S105 - an annotation key, not a password


class Leadership(Protocol):
    identity: str

    def is_leader(self) -> bool: ...

    def note_pass(self, when: datetime) -> None: ...

    async def run(self) -> None: ...

    async def release(self) -> None: ...


class SoleReplica:
    """Standalone: this process always leads (one replica, or a host process in development)."""

    def __init__(self, identity: str) -> None:
        self.identity = identity

    def is_leader(self) -> bool:
        return True

    def note_pass(self, when: datetime) -> None:
        """Nothing records passes without a Lease."""

    async def run(self) -> None:
        """Nothing to renew."""

    async def release(self) -> None:
        """Nothing to release."""


def own_identity() -> str:
    """The pod name in a pod (POD_ID from the downward API), else host and process."""
    return os.environ.get("POD_ID") or f"{socket.gethostname()}-{os.getpid()}"


def _micro_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _record(lease: dict[str, Any]) -> LeaseRecord:
    spec = lease.get("spec") or {}
    return LeaseRecord(
        holder=str(spec.get("holderIdentity") or ""),
        lease_seconds=float(spec.get("leaseDurationSeconds") or 0),
        transitions=int(spec.get("leaseTransitions") or 0),
        version=str((lease.get("metadata") or {}).get("resourceVersion", "")),
    )


class LeaseElector:
    """Acquires and renews one Lease. `on_change` runs on the event loop whenever this replica gains or loses it."""

    def __init__(
        self,
        name: str,
        namespace: str,
        identity: str,
        timing: LeaseTiming,
        on_change: Callable[[bool], None],
        may_lead: Callable[[], bool],
    ) -> None:
        self.name, self.namespace, self.identity, self.timing = name, namespace, identity, timing
        self._on_change = on_change
        # A replica still loading its indexes must not take the Lease: it could not run a pass for a while, and a
        # warm standby beside it could. (A replacement pod starts while its predecessor hands over.)
        self._may_lead = may_lead
        self._last_renewed: float | None = None
        self._seen: Sighting | None = None
        self._last_pass: datetime | None = None
        self._leading = False
        self._stopping = False
        self._lock = threading.Lock()
        self._ticks = threading.Event()  # set to cut a tick short when stopping

    def is_leader(self) -> bool:
        return not self._stopping and still_leader(self._last_renewed, time.monotonic(), self.timing)

    def note_pass(self, when: datetime) -> None:
        """Shown on the Lease at the next renewal, so a person (or a test) sees that the holder works."""
        self._last_pass = when

    async def run(self) -> None:
        """Renew or poll on a thread of its own: at program scale the event loop and kopf's thread pool are busy
        with node and pod events, and a renewal queued behind them would let the Lease run out under a live leader
        (or a standby notice a dead one late)."""
        loop = asyncio.get_running_loop()
        renewing = threading.Thread(target=self._renew_forever, args=(loop,), name="leader-election", daemon=True)
        renewing.start()
        try:
            await asyncio.Event().wait()  # until the operator cancels this task
        finally:
            self._stopping = True
            self._ticks.set()

    def _renew_forever(self, loop: asyncio.AbstractEventLoop) -> None:
        while not self._stopping:
            try:
                with self._lock:
                    if not self._stopping:
                        self._try_once()
            except Exception as error:
                logger.warning(f"lease {self.namespace}/{self.name}: {error}")
            with contextlib.suppress(RuntimeError):  # the loop closed: the operator is exiting
                loop.call_soon_threadsafe(self._notice_change)
            # The holder renews on time; a follower polls as often, so a released Lease is taken within a tick.
            self._ticks.wait(self.timing.renew_every)

    async def release(self) -> None:
        """Stop leading at once and hand the Lease over (an empty holder) so that a standby takes it now."""
        was_leader = self.is_leader()
        self._stopping = True
        self._ticks.set()
        self._notice_change()
        if was_leader:
            # One short request, made on the loop itself: while the operator shuts down, the default executor
            # may already refuse new work, and a Lease left to run out would delay the standby by its duration.
            # The lock waits out a renewal in flight, whose new resourceVersion would make this write conflict.
            try:
                with self._lock:
                    self._hand_over()
            except (ApiException, OSError) as error:
                logger.warning(f"lease {self.namespace}/{self.name} not released, a standby waits it out: {error}")

    def _notice_change(self) -> None:
        leading = self.is_leader()
        if leading != self._leading:
            self._leading = leading
            role = "now leads" if leading else "no longer leads"
            logger.info(f"{self.identity} {role} (lease {self.namespace}/{self.name})")
            self._on_change(leading)

    def _api(self) -> Any:
        """Untyped: the Lease travels as a plain dict both ways (the typed models would only be converted back)."""
        return client.CoordinationV1Api()

    def _read(self) -> dict[str, Any] | None:
        try:
            response = self._api().read_namespaced_lease(
                self.name, self.namespace, _preload_content=False, _request_timeout=self.timing.renew_deadline
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        lease: dict[str, Any] = json.loads(response.data)
        return lease

    def _try_once(self) -> None:
        lease = self._read()
        record = _record(lease) if lease is not None else None
        now = time.monotonic()
        self._seen = sighting(record, self._seen, now)
        step = next_step(record, self.identity, self._seen, now)
        if step is Step.FOLLOW or (step is not Step.RENEW and not self._may_lead()):
            return
        transitions = record.transitions if record is not None else 0
        if step is Step.TAKE:
            transitions += 1
        body = self._body(lease, transitions, keep_acquired=step is Step.RENEW)
        try:
            if lease is None:
                self._api().create_namespaced_lease(self.namespace, body, _request_timeout=self.timing.renew_deadline)
            else:
                # resourceVersion makes this a compare-and-swap: of two replicas taking over, one wins.
                self._api().replace_namespaced_lease(
                    self.name, self.namespace, body, _request_timeout=self.timing.renew_deadline
                )
        except ApiException as error:
            if error.status == 409:
                return  # someone else renewed or took it first
            raise
        self._last_renewed = now

    def _body(self, lease: dict[str, Any] | None, transitions: int, keep_acquired: bool) -> dict[str, Any]:
        now = datetime.now(UTC)
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        old_spec: dict[str, Any] = {}
        if lease is not None:
            metadata = dict(lease.get("metadata") or {})
            old_spec = dict(lease.get("spec") or {})
        annotations = dict(metadata.get("annotations") or {})
        if self._last_pass is not None:
            annotations[LAST_PASS_ANNOTATION] = _micro_time(self._last_pass)
        metadata["annotations"] = annotations
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": round(self.timing.lease_seconds),
            "acquireTime": old_spec.get("acquireTime") if keep_acquired else _micro_time(now),
            "renewTime": _micro_time(now),
            "leaseTransitions": transitions,
        }
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}

    def _hand_over(self) -> None:
        lease = self._read()
        if lease is None or _record(lease).holder != self.identity:
            return
        body = self._body(lease, _record(lease).transitions, keep_acquired=True)
        body["spec"]["holderIdentity"] = ""
        timeout = self.timing.renew_deadline
        self._api().replace_namespaced_lease(self.name, self.namespace, body, _request_timeout=timeout)
        logger.info(f"{self.identity} released lease {self.namespace}/{self.name}")
