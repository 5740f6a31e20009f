"""How long one pool pass takes over 600 unchanged allocations (3 running pods each), with the unit tests' snapshot
builders and recording writer: no API server, the workers' work run inline so that it is timed.

- refresh passes: each 16 s after the last, so each books all 600 again for their counters (planner.METRICS_REFRESH);
- steady passes: each half a second after the last, with nothing due: what most passes of a quiet pool are.

Usage: python bench/refresh_pass.py [--passes 7] [--out refresh-pass.json]
Writes bench/results/refresh-pass.json (or the --out name).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from gpuaas.domain.actions import ApplyObject, PatchStatus
from gpuaas.domain.snapshot import observed_key

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.builders import NOW, RecordingWriter, SnapshotBuilder, allocation, gpu_node, gpu_pod  # noqa: E402
from tests.unit.test_pool_pass import reconciler  # noqa: E402


class Inline(Executor):
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passes", type=int, default=7)
    parser.add_argument("--out", default="refresh-pass.json", help="File name under bench/results/.")
    options = parser.parse_args()
    builder = SnapshotBuilder(nodes=[gpu_node(f"node-{i}") for i in range(320)])
    for i in range(600):
        builder.with_allocation(allocation(f"a{i}", 4), *[gpu_pod(f"p{i}-{j}", f"a{i}", gpus=1) for j in range(3)])
    snap = builder.build()
    writer = RecordingWriter()
    run = reconciler(writer)
    run.executor = Inline()  # type: ignore[assignment]
    run.refresh_batch = 600  # all of them each refresh pass, as with fewer allocations per pool
    run.run_pass(snap, NOW)
    # What the watch would show next: the applied objects and the written statuses.
    statuses = {patch.name: patch.patch for patch in writer.of(PatchStatus)}
    snap = replace(
        snap,
        observed={observed_key(action.manifest): action.manifest for action in writer.of(ApplyObject)},
        allocations=[replace(view, status=statuses.get(view.name, {})) for view in snap.allocations],
    )
    run.run_pass(snap, NOW + timedelta(seconds=2))
    seconds = []
    for index in range(1, options.passes + 1):
        started = time.perf_counter()
        result = run.run_pass(snap, NOW + timedelta(seconds=2 + 16 * index))
        seconds.append(round(time.perf_counter() - started, 3))
        assert result.processed == 600
    steady = []
    last = NOW + timedelta(seconds=2 + 16 * options.passes)
    for index in range(1, options.passes + 1):
        started = time.perf_counter()
        result = run.run_pass(snap, last + timedelta(seconds=0.5 * index))
        steady.append(round(time.perf_counter() - started, 4))
        assert result.processed == 0
    out = {
        "allocations": 600,
        "pods_each": 3,
        "refresh_pass_seconds": sorted(seconds),
        "steady_pass_seconds": sorted(steady),
    }
    (REPO / "bench" / "results" / options.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
