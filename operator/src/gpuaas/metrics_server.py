"""/metrics and /readyz, served by a small process of its own beside the operator.

In the operator's process a scrape waits for the GIL and for the garbage collector, whose pauses under churn last up
to most of a second (bench/results/usage-gc-thresholds.json), while this process holds little and does nothing else.
The operator sends it its readiness every second, and the rendered exposition every 5 s and whenever a scrape asks; a
scrape waits at most FRESH_WAIT_SECONDS for that fresh copy before it is answered from the last one. Bearer tokens
are reviewed by the operator (TokenReview and SubjectAccessReview, with its own credentials) and the answers cached
here, so scrapes cost no API calls.

Only the standard library: the process starts in a fraction of a second and stays small. Frames on its stdin (from
the operator) and stdout (to it) are a kind byte, a 4-byte big-endian length and the payload:

- to the server: `M` the exposition; `R` readiness, a 3-digit HTTP status then the body; `A` an access answer, JSON
  `{"question", "status", "reason"}`;
- to the operator: `F` a scrape wants a fresh copy; `Q` an access question, JSON `{"question", "token"}` (a
  number of the server's, new for every question).

The server exits when its stdin closes: the operator is gone.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO

# Enough for the copy of an idle operator; under churn the copy rarely came within even 50 ms (the slowest scrapes
# waited that long, then got the last copy), so a scrape is not held longer for it.
FRESH_WAIT_SECONDS = 0.02
# /readyz says 503 when the operator has sent nothing for this long: its webhooks would not answer either.
SILENT_OPERATOR_SECONDS = 15.0
REVIEW_WAIT_SECONDS = 10.0
ALLOWED_FOR_SECONDS = 60.0
REFUSED_FOR_SECONDS = 10.0
METRICS_PATH = "/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_HEADER = struct.Struct(">cI")


@dataclass(frozen=True)
class MetricsAccess:
    """The HTTP answer to one scrape's credentials: 200, 401 (no or bad token), 403 (not allowed) or 503."""

    status: int
    reason: str


def write_frame(stream: IO[bytes], kind: bytes, payload: bytes) -> None:
    stream.write(_HEADER.pack(kind, len(payload)) + payload)
    stream.flush()


def read_frame(stream: IO[bytes]) -> tuple[bytes, bytes] | None:
    """The next frame, or None at the end of the stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    kind, length = _HEADER.unpack(header)
    payload = stream.read(length)
    return (kind, payload) if len(payload) == length else None


class MetricsAuthorizer:
    """Decides a scrape from its Authorization header, with answers cached by the token's hash."""

    def __init__(self, review: Callable[[str], MetricsAccess], clock: Callable[[], float] = time.monotonic) -> None:
        self._review = review
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, MetricsAccess]] = {}

    def __call__(self, authorization: str | None) -> MetricsAccess:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return MetricsAccess(401, f"send a bearer token of a subject that may get {METRICS_PATH}")
        key = token_key(token.strip())
        now = self._clock()
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        access = self._review(token.strip())
        if access.status in (200, 401, 403):  # an unanswered review (503) is asked again on the next scrape
            keep = ALLOWED_FOR_SECONDS if access.status == 200 else REFUSED_FOR_SECONDS
            with self._lock:
                if len(self._cache) > 1024:  # tokens rotate; never let the cache grow without bound
                    self._cache.clear()
                self._cache[key] = (now + keep, access)
        return access


def token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class OperatorLink:
    """The server's side of the pipes: the latest copies the operator sent, and questions to it."""

    def __init__(self, to_operator: IO[bytes]) -> None:
        self._to_operator = to_operator
        self._changed = threading.Condition()
        self._write_lock = threading.Lock()
        self.exposition = b""
        self.copies = 0
        self.readiness: tuple[int, bytes] | None = None
        self.heard_at: float | None = None
        # question number -> the operator's answer: a token asked again gets a new number, never an old answer
        self._answers: dict[int, MetricsAccess] = {}
        self._questions = itertools.count()

    def _send(self, kind: bytes, payload: bytes) -> None:
        with self._write_lock:
            write_frame(self._to_operator, kind, payload)

    def receive(self, kind: bytes, payload: bytes) -> None:
        with self._changed:
            self.heard_at = time.monotonic()  # /readyz compares it with the same clock
            if kind == b"M":
                self.exposition = payload
                self.copies += 1
            elif kind == b"R":
                self.readiness = (int(payload[:3]), payload[3:])
            elif kind == b"A":
                answer = json.loads(payload)
                self._answers[int(answer["question"])] = MetricsAccess(int(answer["status"]), str(answer["reason"]))
            self._changed.notify_all()

    def fresh(self) -> tuple[bytes, tuple[int, bytes] | None, float | None]:
        """The exposition and readiness after the operator's next copy, or the last ones if it does not come soon."""
        with self._changed:
            wanted = self.copies + 1
        self._send(b"F", b"")
        with self._changed:
            self._changed.wait_for(lambda: self.copies >= wanted, timeout=FRESH_WAIT_SECONDS)
            return self.exposition, self.readiness, self.heard_at

    def review(self, token: str) -> MetricsAccess:
        question = next(self._questions)
        self._send(b"Q", json.dumps({"question": question, "token": token}).encode())
        with self._changed:
            self._changed.wait_for(lambda: question in self._answers, timeout=REVIEW_WAIT_SECONDS)
            # A late answer to a question given up on stays until answers pile up.
            access = self._answers.pop(question, None)
            if len(self._answers) > 1024:
                self._answers.clear()
        if access is None:
            return MetricsAccess(503, "the operator did not answer the token review in time")
        return access


def _handler(link: OperatorLink, authorize: MetricsAuthorizer | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/readyz":
                _, readiness, heard_at = link.fresh()
                if readiness is None or heard_at is None:
                    self._answer(503, b"operator starting\n")
                elif time.monotonic() - heard_at > SILENT_OPERATOR_SECONDS:
                    self._answer(503, b"operator not answering\n")
                else:
                    self._answer(*readiness)
                return
            if path != METRICS_PATH:
                self._answer(404, b"not found\n")
                return
            if authorize is not None:
                access = authorize(self.headers.get("Authorization"))
                if access.status != 200:
                    extra = {"WWW-Authenticate": 'Bearer realm="gpuaas metrics"'} if access.status == 401 else {}
                    self._answer(access.status, f"{access.reason}\n".encode(), extra)
                    return
            exposition, _, _ = link.fresh()
            self._answer(200, exposition, {"Content-Type": CONTENT_TYPE})

        def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in {"Content-Type": "text/plain", **(headers or {})}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Scrapes every few seconds would flood the log."""

    return Handler


def _listen(port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """The port, once a server that a restarted operator left behind has let go of it."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return ThreadingHTTPServer(("0.0.0.0", port), handler)  # noqa: S104 - scraped from other pods
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main(argv: list[str]) -> None:
    # Ctrl-C in a terminal reaches the whole process group; this process ends when the operator does, quietly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    port, with_auth = int(argv[0]), "--auth" in argv[1:]
    link = OperatorLink(sys.stdout.buffer)
    authorize = MetricsAuthorizer(link.review) if with_auth else None
    server = _listen(port, _handler(link, authorize))
    server.daemon_threads = True

    def follow_operator() -> None:
        while (frame := read_frame(sys.stdin.buffer)) is not None:
            link.receive(*frame)
        os._exit(0)  # the operator is gone; so is what this process serves

    threading.Thread(target=follow_operator, daemon=True, name="operator").start()
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
