"""Reads busy GPU-seconds per namespace from Prometheus, where dcgm-exporter's utilisation lands (domain/busy.py)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from typing import Any

from gpuaas.domain.busy import BUSY_EXPRESSION, busy_seconds, range_chunks
from gpuaas.domain.ledger import to_epoch

# Seconds to wait for one range query; a month of a large cluster at a minute's step takes a few seconds.
QUERY_TIMEOUT = 120


class BusyUnreadableError(Exception):
    """Prometheus could not be asked, or refused the query: busy hours would be silently missing."""


def _query_range(url: str, first: int, last: int, step: int) -> list[dict[str, Any]]:
    if not url.startswith(("http://", "https://")):
        raise BusyUnreadableError(f"--prometheus {url!r} is not an http(s) URL")
    params = urllib.parse.urlencode({"query": BUSY_EXPRESSION, "start": first, "end": last, "step": step})
    request = f"{url.rstrip('/')}/api/v1/query_range?{params}"
    try:
        with urllib.request.urlopen(request, timeout=QUERY_TIMEOUT) as response:  # noqa: S310 (http(s) checked above)
            body = json.load(response)
    except urllib.error.HTTPError as error:
        detail = error.read().decode("utf-8", "replace")[:300]
        raise BusyUnreadableError(f"Prometheus at {url} answered {error.code}: {detail}") from error
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise BusyUnreadableError(f"Prometheus at {url}: {error}") from error
    if body.get("status") != "success":
        raise BusyUnreadableError(f"Prometheus at {url}: {body.get('error', body)}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def read_busy(url: str, start: datetime, end: datetime, step: int) -> dict[tuple[str, str], int]:
    """Busy GPU-seconds in [start, end) by (cluster label, namespace); the cluster label is "" where absent."""
    totals: dict[tuple[str, str], float] = {}
    for first, last in range_chunks(to_epoch(start), to_epoch(end), step):
        for series in _query_range(url, first, last, step):
            labels = series.get("metric") or {}
            key = (labels.get("cluster", ""), labels.get("namespace", ""))
            totals[key] = totals.get(key, 0.0) + busy_seconds(series.get("values") or [], step)
    return {key: round(seconds) for key, seconds in totals.items()}
