"""The metrics server process: what it serves, from which copy, to whom, and that it lives and dies with the
operator. Real processes and sockets; the token reviews are the operator's callable (a real API server answers them
in tests/integration/test_metrics_access.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import Gauge

from gpuaas import metrics
from gpuaas.metrics_server import MetricsAccess, OperatorLink, read_frame
from tests.waiting import wait_for

PROBE = Gauge("gpuaas_test_metrics_server_probe", "A value the tests change.")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=15) as response:  # noqa: S310 - a local http URL
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def answers(port: int, path: str, token: str | None = None) -> int | None:
    """The status, or None while nothing listens on the port."""
    try:
        return get(port, path, token)[0]
    except urllib.error.URLError:
        return None


def probe_value(text: str) -> float:
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith("gpuaas_test_metrics_server"))


@pytest.fixture
def server() -> Iterator[tuple[metrics.MetricsServer, int]]:
    port = free_port()
    reviews: list[str] = []

    def review(token: str) -> MetricsAccess:
        reviews.append(token)
        return MetricsAccess(200, "scraper may") if token == "scraper" else MetricsAccess(403, "tenant may not")

    served = metrics.MetricsServer(port, review)
    served.start()
    wait_for(lambda: answers(port, "/readyz") in (200, 503), timeout=15, message="the server")
    yield served, port
    served.stop()


def test_it_serves_the_operators_metrics_and_readiness_to_those_the_api_server_allows(
    server: tuple[metrics.MetricsServer, int],
) -> None:
    _, port = server
    metrics.readiness.indexes_warm = False
    assert get(port, "/readyz") == (503, "indexes still loading\n")
    metrics.readiness.indexes_warm = True
    assert get(port, "/readyz") == (200, "ok (standby)\n")  # open: the kubelet's probe sends no token

    PROBE.set(7)
    status, text = get(port, "/metrics", "scraper")
    assert status == 200
    assert probe_value(text) == 7
    assert "gpuaas_allocation_granted_gpus" in text  # the per-allocation series are part of it

    assert get(port, "/metrics", "tenant") == (403, "tenant may not\n")
    status, text = get(port, "/metrics")
    assert (status, text) == (401, "send a bearer token of a subject that may get /metrics\n")


def test_a_scrape_while_the_operator_is_stalled_is_answered_from_the_last_copy(
    server: tuple[metrics.MetricsServer, int],
) -> None:
    served, port = server
    PROBE.set(1)
    assert probe_value(get(port, "/metrics", "scraper")[1]) == 1
    with served._write_lock:  # the operator cannot send: as in a long collector pause
        PROBE.set(2)
        status, text = get(port, "/metrics", "scraper")
    assert (status, probe_value(text)) == (200, 1)
    wait_for(lambda: probe_value(get(port, "/metrics", "scraper")[1]) == 2, timeout=10, message="the fresh copy")


def test_the_server_ends_with_the_operator_and_is_started_again_if_it_dies(
    server: tuple[metrics.MetricsServer, int],
) -> None:
    served, port = server
    assert served.process is not None
    first = served.process
    os.kill(first.pid, signal.SIGKILL)
    wait_for(lambda: served.process is not first, timeout=15, message="a new metrics server")
    wait_for(lambda: answers(port, "/metrics", "scraper") == 200, timeout=15, message="the new server serving")

    last = served.process
    assert last is not None
    served.stop()  # closes its stdin, as the operator's exit does
    assert last.wait(timeout=10) == 0


def test_a_token_asked_again_gets_the_operators_new_answer_not_the_old_one() -> None:
    """Access revoked after the cache's minute must take effect: the second question is answered anew."""
    read_end, write_end = os.pipe()
    answers = iter([MetricsAccess(200, "may"), MetricsAccess(403, "may no longer")])
    # The write end closes first: the operator thread reads to the end and lets go of the read end.
    with os.fdopen(read_end, "rb") as from_server, os.fdopen(write_end, "wb") as to_operator:
        link = OperatorLink(to_operator)

        def operator() -> None:
            while (frame := read_frame(from_server)) is not None:
                question = json.loads(frame[1])["question"]
                access = next(answers)
                answer = {"question": question, "status": access.status, "reason": access.reason}
                link.receive(b"A", json.dumps(answer).encode())

        threading.Thread(target=operator, daemon=True).start()
        assert link.review("token") == MetricsAccess(200, "may")
        assert link.review("token") == MetricsAccess(403, "may no longer")


def test_readiness_goes_every_second_and_the_exposition_only_every_few_unless_a_scrape_asks() -> None:
    publisher = metrics.MetricsServer(0, None)  # never started: its frames are recorded here
    sent: list[bytes] = []
    publisher._send = lambda kind, payload: sent.append(kind)  # type: ignore[method-assign]
    thread = threading.Thread(target=publisher._publish_forever, daemon=True)
    thread.start()
    wait_for(lambda: sent.count(b"R") >= 3, timeout=30)  # two seconds or more since the first
    assert sent.count(b"M") == 1  # the first, unasked; the next is seconds away
    publisher._wanted.set()  # a scrape asks
    wait_for(lambda: sent.count(b"M") == 2, timeout=30)
    publisher._stopping = True
    thread.join(timeout=30)
    assert sent[:2] == [b"R", b"M"]
