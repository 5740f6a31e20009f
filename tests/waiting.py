"""The one `wait_for` of every test tier (unit tests need none: they have no clock to wait on)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 60.0,
    interval: float = 0.2,
    message: str = "condition",
    last: Callable[[], Any] | None = None,
) -> Any:
    """Poll until predicate() returns a truthy value and return it; on timeout, report last() (or the last value)."""
    deadline = time.monotonic() + timeout
    value: Any = None
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    seen = last() if last else value
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message}; last value: {seen!r}")
