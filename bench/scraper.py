"""Scrapes a /metrics endpoint once a second from its own process, as Prometheus would, so that the timings hold
none of the benchmark's own work (its churn threads share the benchmark's GIL). Each scrape is split into the TCP
connect, the wait for the response's first byte (the server's turn) and the read of the body.

Usage: python bench/scraper.py URL OUT STOP_FILE  (appends one JSON line per scrape to OUT until STOP_FILE exists)
"""

from __future__ import annotations

import http.client
import json
import sys
import time
import urllib.parse
from pathlib import Path


def scrape(url: str) -> dict[str, float]:
    parts = urllib.parse.urlsplit(url)
    started = time.monotonic()
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=30)
    connection.connect()
    connected = time.monotonic()
    connection.request("GET", parts.path or "/")
    response = connection.getresponse()
    first_byte = time.monotonic()
    size = len(response.read())
    ended = time.monotonic()
    connection.close()
    return {
        "at": time.time(),
        "total": ended - started,
        "connect": connected - started,
        "first_byte": first_byte - connected,
        "read": ended - first_byte,
        "bytes": size,
    }


def main() -> None:
    url, out, stop = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    with out.open("a") as lines:
        while not stop.exists():
            tick = time.monotonic()
            lines.write(json.dumps(scrape(url)) + "\n")
            lines.flush()
            time.sleep(max(0.0, 1 - (time.monotonic() - tick)))


if __name__ == "__main__":
    main()
