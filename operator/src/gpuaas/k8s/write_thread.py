"""A thread that writes one of a pool's objects off its passes (its status, its month record), one write at a time,
and counts the writes that failed for the pass to report."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class WriteThread:
    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._failed = 0

    def submit(self, write: Callable[..., None], *args: Any) -> Future[None]:
        return self._executor.submit(write, *args)

    def count_failure(self) -> None:
        with self._lock:
            self._failed += 1

    def failures_since_last_asked(self) -> int:
        with self._lock:
            failed, self._failed = self._failed, 0
            return failed

    def stop(self) -> None:
        """After the write running, and any submitted before."""
        self._executor.shutdown(wait=True)
