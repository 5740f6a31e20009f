"""The pool's status, written off the pass by a thread of its own.

A pass decides the pool's status and hands it here; it does not wait for the API server's answer, which under a
burst of thousands of allocations took a second or more and made the pass that long. One write runs at a time, and
a status decided while one runs replaces any not yet sent: the API server gets the newest, never a backlog.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from gpuaas.api.pool import POOL_PLURAL
from gpuaas.domain.actions import PatchStatus
from gpuaas.domain.planner import status_merge_patch
from gpuaas.k8s.write_thread import WriteThread
from gpuaas.k8s.writer import ClusterWriter

logger = logging.getLogger(__name__)


class PoolStatusWriter:
    def __init__(self, pool: str, writer: ClusterWriter) -> None:
        self.pool = pool
        self.writer = writer
        self._lock = threading.Lock()
        self._wanted: dict[str, Any] | None = None  # the newest status a pass decided
        self._written: dict[str, Any] | None = None  # the last the API server took
        self._sending: Future[None] | None = None
        self._thread = WriteThread(f"pool-status-{pool}")

    @property
    def latest(self) -> dict[str, Any] | None:
        """The status as this replica last decided it (being sent, or written), else the last written: after a
        write failed, the next pass sends its status again. None until a first write is decided."""
        with self._lock:
            return self._wanted if self._wanted is not None else self._written

    def send(self, status: Mapping[str, Any]) -> Future[None]:
        """Write `status` after the write running, if any; the returned future ends once the newest status is
        written or its write failed."""
        with self._lock:
            self._wanted = dict(status)
            if self._sending is None:
                # Under the lock: the thread takes it before it looks at what is wanted.
                self._sending = self._thread.submit(self._write_newest)
            return self._sending

    def failures_since_last_asked(self) -> int:
        return self._thread.failures_since_last_asked()

    def stop(self) -> None:
        """After the write running and the newest decided, if any: the status is the last pass's."""
        self._thread.stop()

    def _write_newest(self) -> None:
        while True:
            with self._lock:
                wanted, written = self._wanted, self._written
                if wanted is None or wanted == written:
                    self._sending = None  # with the lock: a status sent from now on starts a new write
                    return
            try:
                self.writer.perform(PatchStatus(POOL_PLURAL, self.pool, status_merge_patch(written or {}, wanted)))
            except Exception as error:  # logged; the next pass sends its status again
                logger.warning("pool %s: status write failed (sent again by the next pass): %s", self.pool, error)
                with self._lock:
                    self._wanted = None  # also one decided meanwhile: the next pass decides and sends anew
                    self._sending = None
                self._thread.count_failure()
                return
            with self._lock:
                self._written = wanted
