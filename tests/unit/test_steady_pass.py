"""A steady pass keeps each allocation's intake while what it was made from compares equal (planner.pass_inputs);
any change to one of those inputs is taken in at the next pass."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from gpuaas.api.allocation import ALLOCATION_LABEL, ALLOCATION_PLURAL
from gpuaas.api.pool import POOL_PLURAL
from gpuaas.domain.actions import ApplyObject, PatchStatus, WriteUsageLedger
from gpuaas.domain.booking import QUIET_FLUSH_FACTOR
from gpuaas.domain.ledger import LedgerPod, PodInterval
from gpuaas.domain.namespaces import NamespaceClaim, TerminatingNamespace
from gpuaas.domain.snapshot import PoolSnapshot, observed_key
from gpuaas.domain.tenant import QUOTA_NAME
from gpuaas.k8s.reconciler import PoolReconciler
from tests.builders import NOW, POOL, RecordingWriter, SnapshotBuilder, allocation, gpu_pod
from tests.unit.test_pool_pass import reconciler

LATER = NOW + timedelta(seconds=3)


def as_stored(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The applied object as the watch shows it: with a resourceVersion."""
    return {**manifest, "metadata": {**manifest["metadata"], "resourceVersion": "7"}}


def settled(namespace_labelled: bool = True) -> tuple[PoolReconciler, RecordingWriter, PoolSnapshot]:
    """Allocation a (one running pod) after its first pass, with the snapshot showing what that pass wrote: a pass
    on it now writes nothing. Without `namespace_labelled`, the labels index has not shown its namespace yet."""
    writer = RecordingWriter()
    run = reconciler(writer)
    pod = gpu_pod("p", "a", gpus=4)
    snap = SnapshotBuilder().with_allocation(allocation("a", 8), pod, owns_namespace=namespace_labelled).build()
    run.run_pass(snap, NOW)
    statuses = {patch.name: patch.patch for patch in writer.of(PatchStatus) if patch.plural == ALLOCATION_PLURAL}
    snap = replace(
        snap,
        observed={observed_key(action.manifest): as_stored(action.manifest) for action in writer.of(ApplyObject)},
        allocations=[replace(view, status=statuses[view.name], resource_version="2") for view in snap.allocations],
    )
    run.run_pass(snap, NOW + timedelta(seconds=1))
    writer.actions.clear()
    assert run.run_pass(snap, NOW + timedelta(seconds=2)).processed == 0
    assert writer.actions == []
    return run, writer, snap


def test_copies_of_every_object_compare_equal_so_a_pass_on_them_writes_nothing() -> None:
    run, writer, snap = settled()
    result = run.run_pass(copy.deepcopy(snap), LATER)
    assert (result.processed, writer.actions) == (0, [])
    assert [(s.allocation, s.phase, s.granted_gpus) for s in result.samples] == [("a", "Active", 8)]


def _namespace_labelled_for_another(snap: PoolSnapshot) -> None:
    snap.namespaces["a"] = {ALLOCATION_LABEL: "someone-else"}


def _an_older_claim(snap: PoolSnapshot) -> None:
    snap.namespace_claims["a"] = [NamespaceClaim((NOW - timedelta(days=9)).isoformat(), "older", POOL)]


def _a_pod_starts(snap: PoolSnapshot) -> None:
    snap.pods_by_namespace["a"] = [*snap.pods_of("a"), gpu_pod("q", "a", gpus=4)]


def _a_pod_departed(snap: PoolSnapshot) -> None:
    interval = PodInterval(uid="uid-gone", gpus=2, start=NOW - timedelta(minutes=5), end=NOW)
    gone = LedgerPod("gone", "a", "uid-gone", interval, has_finalizer=True, finished=True, departed=True)
    snap.departed_by_namespace["a"] = [gone]


def _its_quota_deleted(snap: PoolSnapshot) -> None:
    del snap.observed[("ResourceQuota", "a", QUOTA_NAME)]


def _the_pool_spec_changed(snap: PoolSnapshot) -> None:
    snap.generation = 2


def _another_pool_gains_a_device_class(snap: PoolSnapshot) -> None:
    snap.other_pools_device_classes = frozenset({"h200.nvidia.com"})


@pytest.mark.parametrize(
    "change",
    [
        _namespace_labelled_for_another,
        _an_older_claim,
        _a_pod_starts,
        _a_pod_departed,
        _its_quota_deleted,
        _the_pool_spec_changed,
        _another_pool_gains_a_device_class,
    ],
)
def test_a_change_to_any_input_of_the_intake_is_taken_in_at_the_next_pass(
    change: Callable[[PoolSnapshot], None],
) -> None:
    run, writer, snap = settled()
    changed = copy.deepcopy(snap)
    change(changed)
    result = run.run_pass(changed, LATER)
    of_the_pool = [a for a in writer.actions if isinstance(a, PatchStatus) and a.plural == POOL_PLURAL]
    assert result.processed == 1 or len(writer.actions) > len(of_the_pool), "an intake made from other inputs kept"


def test_a_namespace_found_terminating_is_taken_in_at_the_next_pass() -> None:
    run, writer, snap = settled(namespace_labelled=False)
    changed = copy.deepcopy(snap)
    changed.terminating_namespaces["a"] = TerminatingNamespace("a", NOW.isoformat(), "pods")
    run.run_pass(changed, LATER)
    (patch,) = [patch for patch in writer.of(PatchStatus) if patch.plural == ALLOCATION_PLURAL]
    assert [c["reason"] for c in patch.patch["conditions"] if c["type"] == "Admitted"] == ["NamespaceTerminating"]


def test_a_grant_this_replica_changed_is_taken_in_at_the_next_pass() -> None:
    run, _, snap = settled()
    run.granted[snap.allocations[0].uid] = 16  # as a pass that admitted more, before the index shows it
    result = run.run_pass(snap, LATER)
    assert result.processed == 1


def test_a_new_allocations_record_is_not_written_again_at_its_first_flush_only_for_its_grants_gpus() -> None:
    """Its record is created before its grant booked any time (0 GPUs in it); the grant is the status's, so the
    GPUs it has wait for the quiet flush with its time."""
    run, writer, snap = settled()
    flush = run.ledger.flush_interval
    for flushes in range(1, QUIET_FLUSH_FACTOR):
        run.run_pass(snap, NOW + flushes * flush + timedelta(seconds=1))
    assert writer.of(WriteUsageLedger) == []
    run.run_pass(snap, NOW + QUIET_FLUSH_FACTOR * flush + timedelta(seconds=1))
    (written,) = writer.of(WriteUsageLedger)
    assert written.ledger.granted_gpus == 8
