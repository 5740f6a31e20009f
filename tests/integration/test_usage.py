"""The usage ledger against the test's own timeline: exact, and neither lost nor doubled across faults."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch

from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.usage import GpuUsage, GpuUsageSpec, UsageLedger
from gpuaas.domain.fence import USAGE_FINALIZER
from gpuaas.domain.ledger import month_of
from gpuaas.domain.scenarios import SCENARIOS
from gpuaas.k8s import usage
from gpuaas.k8s.client import load_config
from gpuaas.k8s.writer import CRASH_AFTER_ENV
from tests.integration.allocations import (
    allocation,
    allocation_manifest,
    condition,
    create_allocation,
    delete_allocation,
    gpu_pod,
    pod_phase,
    status_of,
    unique,
    wait_for_phase,
    wait_for_ready,
)
from tests.integration.conftest import LocalCluster, OperatorProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
B200, H200 = SCENARIOS["small"].pools


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def usage_records(cluster: LocalCluster, allocation_name: str) -> list[dict[str, Any]]:
    items = client.CustomObjectsApi(cluster.api).list_cluster_custom_object(GROUP, VERSION, "gpuusages")["items"]
    return [r for r in items if r["spec"]["allocation"] == allocation_name]


def used_seconds(cluster: LocalCluster, allocation_name: str) -> int:
    return sum((r.get("ledger") or {}).get("usedGPUSeconds", 0) for r in usage_records(cluster, allocation_name))


class Timeline:
    """The test's own record of each pod: start as the pod reports it, end as the moment the test deleted it."""

    def __init__(self, cluster: LocalCluster, namespace: str) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.core = client.CoreV1Api(cluster.api)
        self.pods: dict[str, tuple[int, datetime, datetime | None]] = {}

    def start(self, name: str, gpus: int) -> None:
        body = json.dumps(gpu_pod(name, self.namespace, gpus))
        self.cluster.kubectl("--as", "alice", "apply", "-f", "-", stdin=body)
        wait_for(lambda: pod_phase(self.cluster, name, self.namespace) == "Running", message=f"{name} Running")
        pod = self.core.read_namespaced_pod(name, self.namespace)
        started = pod.status.container_statuses[0].state.running.started_at
        self.pods[name] = (gpus, started, None)

    def end(self, name: str) -> None:
        gpus, started, _ = self.pods[name]
        # Stamped before the call: the API server stamps the end when it takes the call, truncated to its second,
        # so the booked end is at most a second before this and later only by the call's latency. Stamped after,
        # a call taken at .99 of a second and answered after it was more than a second off.
        ended = datetime.now(UTC)
        self.core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=0)
        self.pods[name] = (gpus, started, ended)

    def expected_gpu_seconds(self) -> float:
        total = 0.0
        for gpus, started, ended in self.pods.values():
            assert ended is not None
            total += gpus * (ended - started).total_seconds()
        return total

    def wait_all_gone(self, timeout: float = 60) -> None:
        wait_for(
            lambda: all(pod_phase(self.cluster, name, self.namespace) is None for name in self.pods),
            timeout=timeout,
            message="every pod booked and released",
        )


def assert_exact(cluster: LocalCluster, name: str, timeline: Timeline) -> None:
    """Within one second per pod of the test's own calculation (timestamps are whole seconds)."""
    expected = timeline.expected_gpu_seconds()
    tolerance = sum(gpus for gpus, _, _ in timeline.pods.values()) * 1.0
    try:
        booked = wait_for(
            lambda: (u := used_seconds(cluster, name)) and abs(u - expected) <= tolerance and u,
            timeout=30,
            message=f"ledger of {name} within {tolerance} GPU-s of {expected:.1f}",
        )
    except AssertionError as error:  # what was booked, and from which pod times, says which side is off
        raise AssertionError(f"{error}; booked {used_seconds(cluster, name)}, pods {timeline.pods}") from error
    assert abs(booked - expected) <= tolerance


def test_ledger_matches_the_timeline(cluster: LocalCluster, operator: OperatorProcess) -> None:
    name = unique("exact")
    with allocation(cluster, allocation_manifest(name, H200.name, 16)):
        wait_for_ready(cluster, name)
        timeline = Timeline(cluster, name)
        timeline.start("a", 8)
        timeline.start("b", 4)
        time.sleep(3)
        timeline.end("a")
        wait_for(lambda: pod_phase(cluster, "a", name) is None, message="a booked and released")
        timeline.start("c", 4)
        time.sleep(2)
        timeline.end("b")
        timeline.end("c")
        timeline.wait_all_gone()
        assert_exact(cluster, name, timeline)
        record = usage_records(cluster, name)[0]
        assert record["ledger"]["podCount"] == 3
        # c started after a was gone (a's end is its deletion request, at or before c's start): 8+4, then 4+4.
        assert record["ledger"]["peakGPUsInUse"] == 12


def test_operator_down_while_pods_start_finish_and_are_deleted(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    name = unique("downtime")
    with allocation(cluster, allocation_manifest(name, B200.name, 16)):
        wait_for_ready(cluster, name)
        timeline = Timeline(cluster, name)
        timeline.start("before", 8)
        time.sleep(2)
        operator.kill()
        try:
            # The webhook is down, so no new pods; the running ones end and are deleted meanwhile.
            time.sleep(2)
            timeline.end("before")
            time.sleep(2)
            assert pod_phase(cluster, "before", name) is not None  # held by the usage finalizer
        finally:
            operator.start()
        timeline.wait_all_gone()
        assert_exact(cluster, name, timeline)
        booked = used_seconds(cluster, name)
        operator.wait_passes(B200.name)  # more passes must not book the same pod again
        assert used_seconds(cluster, name) == booked


def test_operator_crash_right_after_creating_the_record_neither_loses_nor_doubles(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    """The month's record is created on the first pass, with the allocation's creation in its grant history."""
    name = unique("crash")
    operator.stop()
    operator.start(env={CRASH_AFTER_ENV: f"CreateUsage:{name}"})
    try:
        with allocation(cluster, allocation_manifest(name, B200.name, 16)):
            assert operator.process is not None
            assert operator.process.wait(timeout=60) == 137
            assert f"crash point: exiting right after CreateUsage for {name}" in operator.log_path.read_text()
            operator.start()
            wait_for_ready(cluster, name)
            timeline = Timeline(cluster, name)
            for pod in ("a", "b"):
                timeline.start(pod, 8)
            time.sleep(1)
            for pod in ("a", "b"):
                timeline.end(pod)
            timeline.wait_all_gone()
            assert_exact(cluster, name, timeline)
            (record,) = usage_records(cluster, name)
            history = record["ledger"]["history"]
            assert len(history) == 1, history  # kept once, though the pass that wrote it never finished
            assert history[0]["changes"][0].startswith("created:")
    finally:
        operator.stop()
        operator.start()


@pytest.mark.parametrize(
    ("crash_after", "pods_left"),
    [
        ("WriteUsageLedger", 2),  # the record is rewritten, and no pod released
        ("ReleasePod", 1),  # booked, one of the two pods released
    ],
)
def test_operator_crash_between_ledger_writes_neither_loses_nor_doubles(
    cluster: LocalCluster, operator: OperatorProcess, crash_after: str, pods_left: int
) -> None:
    name = unique("crash")
    with allocation(cluster, allocation_manifest(name, B200.name, 16)):
        wait_for_ready(cluster, name)
        timeline = Timeline(cluster, name)
        # The month's record exists before the crash (its creation has a test of its own, above).
        timeline.start("first", 8)
        time.sleep(1)  # a pod that starts and ends within one second books 0 s
        timeline.end("first")
        timeline.wait_all_gone()
        assert used_seconds(cluster, name) > 0
        operator.stop()
        operator.start(env={CRASH_AFTER_ENV: f"{crash_after}:{name}"})
        try:
            for pod in ("a", "b"):
                timeline.start(pod, 8)
            time.sleep(1)
            for pod in ("a", "b"):
                timeline.end(pod)
            assert operator.process is not None
            assert operator.process.wait(timeout=60) == 137
            assert f"crash point: exiting right after {crash_after} for {name}" in operator.log_path.read_text()
            left = [pod for pod in ("a", "b") if pod_phase(cluster, pod, name) is not None]
            assert len(left) == pods_left, left  # the crash came before the rest of the releases
        finally:
            operator.stop()
            operator.start()
        timeline.wait_all_gone()
        assert_exact(cluster, name, timeline)
        booked = used_seconds(cluster, name)
        operator.wait_passes(B200.name)  # more passes must not book the same pods again
        assert used_seconds(cluster, name) == booked


def test_deleted_namespace_pods_are_booked(cluster: LocalCluster, operator: OperatorProcess) -> None:
    name = unique("nsgone")
    core = client.CoreV1Api(cluster.api)
    with allocation(cluster, allocation_manifest(name, H200.name, 8)):
        wait_for_ready(cluster, name)
        timeline = Timeline(cluster, name)
        timeline.start("p", 8)
        time.sleep(2)
        gpus, started, _ = timeline.pods["p"]
        version = core.read_namespaced_pod("p", name).metadata.resource_version
        core.delete_namespace(name)
        # The namespace controller deletes the pod with its 30 s grace. It holds its GPUs until it is
        # killed, at the latest until its deletionTimestamp; a KWOK pod never reports a finish, so it is
        # billed to that deadline. KWOK "kills" at once (a grace-0 delete, which moves the deadline back
        # to that moment): the deletionTimestamp the pod has when it goes is exactly the end booked.
        final: Any = None
        events = watch.Watch().stream(
            core.list_namespaced_pod,
            name,
            field_selector="metadata.name=p",
            resource_version=version,
            timeout_seconds=90,
        )
        for event in events:
            if event["type"] == "DELETED":
                final = event["object"]
                break
        assert final is not None, "pod p not deleted within 90 s"
        assert final.metadata.deletion_timestamp is not None
        timeline.wait_all_gone()
        # Records are written before the finalizer goes: once the pod is gone its booking is final.
        end = final.metadata.deletion_timestamp
        assert used_seconds(cluster, name) == gpus * int((end - started).total_seconds()), (started, end)


def test_usage_outlives_the_allocation(cluster: LocalCluster, operator: OperatorProcess) -> None:
    name = unique("outlive")
    with allocation(cluster, allocation_manifest(name, H200.name, 8)):
        wait_for_ready(cluster, name)
        timeline = Timeline(cluster, name)
        timeline.start("p", 8)
        time.sleep(2)
        timeline.end("p")
        timeline.wait_all_gone()
        booked = used_seconds(cluster, name)
        assert booked > 0
    assert used_seconds(cluster, name) == booked


def test_idle_allocation_is_reclaimed_and_resumes_through_the_queue(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    idle_name, waiting = unique("idle"), unique("waiting")
    manifest = allocation_manifest(idle_name, H200.name, H200.gpus, idle={"after": "3s", "action": "Reclaim"})
    with allocation(cluster, manifest):
        wait_for_ready(cluster, idle_name)
        create_allocation(cluster, allocation_manifest(waiting, H200.name, 8))
        try:
            wait_for_phase(cluster, waiting, "Queued")
            status = wait_for_phase(cluster, idle_name, "Suspended", timeout=20)
            assert condition(status, "Ready")["status"] == "False"
            quota = client.CoreV1Api(cluster.api).read_namespaced_resource_quota("gpuaas-quota", idle_name)
            assert quota.spec.hard["requests.nvidia.com/gpu"] == "0"
            wait_for_ready(cluster, waiting)  # the reclaimed GPUs went to the waiting list
            events = client.CoreV1Api(cluster.api).list_namespaced_event(
                "default", field_selector=f"involvedObject.name={idle_name}"
            )
            assert {"Idle", "Reclaimed"} <= {e.reason for e in events.items}
        finally:
            delete_allocation(cluster, waiting)
        # The program office resumes it; it goes through the queue and becomes Active again.
        client.CustomObjectsApi(cluster.api).patch_cluster_custom_object(
            GROUP, VERSION, "gpuallocations", idle_name, {"spec": {"suspend": False, "idle": {"action": "Report"}}}
        )
        wait_for_ready(cluster, idle_name)
        assert status_of(cluster, idle_name)["grantedGPUs"] == H200.gpus


# --- backup and restore ------------------------------------------------------------------------------

# What a backup keeps of an object and what a restore into another cluster drops (Velero by default drops status).
RESTORE_DROPS = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields")


def report_bytes(cluster: LocalCluster, out: Path) -> dict[str, bytes]:
    month = month_of(datetime.now(UTC), "Asia/Seoul")
    files: dict[str, bytes] = {}
    for format_name in ("csv", "json"):
        subprocess.run(
            [
                sys.executable, "-m", "gpuaas", "report", "--month", month, "--format", format_name,
                "--out", f"{out}/", "--kubeconfig", str(cluster.kubeconfig), "--time-zone", "Asia/Seoul",
            ],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        (path,) = out.glob(f"*.{format_name}")
        files[format_name] = path.read_bytes()
        path.unlink()
    return files


def back_up_and_restore_ledger(cluster: LocalCluster) -> int:
    """Every GpuUsage as `kubectl get -o yaml` gives it, without status, deleted and created again. Returns how many."""
    api = client.CustomObjectsApi(cluster.api)
    backup = api.list_cluster_custom_object(GROUP, VERSION, "gpuusages")["items"]
    for record in backup:
        api.delete_cluster_custom_object(GROUP, VERSION, "gpuusages", record["metadata"]["name"])
    wait_for(lambda: not api.list_cluster_custom_object(GROUP, VERSION, "gpuusages")["items"], message="ledger empty")
    for record in backup:
        record.pop("status", None)
        for dropped in RESTORE_DROPS:
            record["metadata"].pop(dropped, None)
        api.create_cluster_custom_object(GROUP, VERSION, "gpuusages", record)
    return len(backup)


def test_the_ledger_survives_a_backup_and_restore_that_drops_status(
    cluster: LocalCluster, operator: OperatorProcess, tmp_path: Path
) -> None:
    name = unique("restore")
    with allocation(cluster, allocation_manifest(name, H200.name, 16)):
        wait_for_ready(cluster, name)
        timeline = Timeline(cluster, name)
        timeline.start("a", 8)
        timeline.start("b", 8)
        time.sleep(3)
        timeline.end("a")  # booked and released before the backup; b runs on across it
        wait_for(lambda: pod_phase(cluster, "a", name) is None, message="a booked and released")
        operator.stop()
        before = report_bytes(cluster, tmp_path)
        assert back_up_and_restore_ledger(cluster) >= 1
        assert report_bytes(cluster, tmp_path) == before  # the same report, to the byte
        operator.start()
        time.sleep(2)
        timeline.end("b")
        timeline.wait_all_gone()
        assert_exact(cluster, name, timeline)  # a is not lost, b is not booked twice
        (record,) = usage_records(cluster, name)
        assert record["ledger"]["podCount"] == 2
        assert "status" not in record


def test_a_record_written_before_the_ledger_field_is_read_and_moved_on_its_next_write(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    name = unique("legacy")
    api = client.CustomObjectsApi(cluster.api)
    with allocation(cluster, allocation_manifest(name, H200.name, 8)):
        wait_for_ready(cluster, name)
        timeline = Timeline(cluster, name)
        timeline.start("a", 8)
        time.sleep(2)
        timeline.end("a")
        timeline.wait_all_gone()
        (record,) = usage_records(cluster, name)
        booked = record["ledger"]["usedGPUSeconds"]
        operator.stop()
        # As an older gpuaas left it: the booked totals and watermarks in status.
        api.patch_cluster_custom_object(
            GROUP, VERSION, "gpuusages", record["metadata"]["name"], {"ledger": None, "status": record["ledger"]}
        )
        operator.start()
        timeline.start("b", 8)
        time.sleep(2)
        timeline.end("b")
        timeline.wait_all_gone()
        assert_exact(cluster, name, timeline)
        (moved,) = usage_records(cluster, name)
        assert moved["ledger"]["usedGPUSeconds"] > booked
        assert moved["ledger"]["podCount"] == 2
        assert "status" not in moved


def test_creating_a_record_that_exists_leaves_its_ledger_alone(cluster: LocalCluster) -> None:
    """A replica whose index has not shown a record yet plans a create from an empty ledger; if the record exists
    (another replica wrote it a moment ago), writing that plan's ledger would drop what the record holds."""
    load_config(str(cluster.kubeconfig))
    name = unique("exists")
    spec = GpuUsageSpec.model_validate(
        {
            "allocation": name,
            "allocationUID": "6d4c7cdd-0000-4000-8000-000000000001",
            "tenant": {"name": name, "organization": "KAIST", "contact": "lab@kaist.ac.kr"},
            "pool": H200.name,
            "gpuModel": "H200",
            "provider": "nhn",
            "month": "2026-12",
            "timeZone": "UTC",
        }
    )
    held = GpuUsage(name=f"{name}-2026-12", spec=spec, ledger=UsageLedger(used_gpu_seconds=3600, pod_count=2))
    api = client.CustomObjectsApi(cluster.api)
    usage.create_usage(held)
    try:
        with pytest.raises(usage.UsageRecordExistsError, match="booked from on the next pass"):
            usage.create_usage(held.model_copy(update={"ledger": UsageLedger(used_gpu_seconds=8, pod_count=1)}))
        stored = api.get_cluster_custom_object(GROUP, VERSION, "gpuusages", held.name)
        assert (stored["ledger"]["usedGPUSeconds"], stored["ledger"]["podCount"]) == (3600, 2)
    finally:
        api.delete_cluster_custom_object(GROUP, VERSION, "gpuusages", held.name)


def test_a_pod_gone_without_its_finalizer_is_booked_from_its_last_state(
    cluster: LocalCluster, operator: OperatorProcess
) -> None:
    """The finalizer is the ledger's first guard, not its only one: when a privileged hand removes it (the webhook
    refuses tenants), the watch's DELETED event still books the pod's whole interval."""
    name = unique("bypass")
    core = client.CoreV1Api(cluster.api)
    with allocation(cluster, allocation_manifest(name, H200.name, 8)):
        wait_for_ready(cluster, name)
        timeline = Timeline(cluster, name)
        timeline.start("kept", 4)
        timeline.start("bypassed", 2)
        # The tenant cannot change what is billed: its removal of the finalizer is refused; the booking below is exact.
        removal = '[{"op":"remove","path":"/metadata/finalizers"}]'
        tried = cluster.kubectl(
            "--as", "alice", "-n", name, "patch", "pod", "kept", "--type=json", "-p", removal, check=False
        )
        assert tried.returncode != 0
        assert "gpuaas.io/usage-ledger is removed by gpuaas" in tried.stderr
        time.sleep(3)
        # Well within the flush interval: nothing of it is written yet when the finalizer goes.
        core.patch_namespaced_pod(
            "bypassed",
            name,
            [{"op": "remove", "path": "/metadata/finalizers"}],
            _content_type="application/json-patch+json",
        )
        timeline.end("bypassed")
        timeline.end("kept")
        timeline.wait_all_gone()
        assert_exact(cluster, name, timeline)
        (record,) = usage_records(cluster, name)
        assert record["ledger"]["podCount"] == 2
        log = operator.log_path.read_text()
        assert f"pod {name}/bypassed went without gpuaas releasing it" in log
        assert f"pod {name}/kept went without" not in log  # released by gpuaas: its watermark holds its whole interval


def test_a_release_removes_only_the_usage_finalizer_of_the_pod_it_saw(cluster: LocalCluster) -> None:
    """The release writes from the pass's view, with no read: a view whose finalizers moved, or whose pod was
    replaced by one of the same name, removes nothing (the next pass releases from the newer view)."""
    load_config(str(cluster.kubeconfig))
    core = client.CoreV1Api(cluster.api)
    namespace = unique("release")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    other = "example.com/keep"
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="p", finalizers=[other, USAGE_FINALIZER]),
        spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox")]),
    )
    uid = core.create_namespaced_pod(namespace, pod).metadata.uid
    try:
        usage.release_pod(namespace, "p", "not-" + uid, 1)  # a new pod of the same name
        usage.release_pod(namespace, "p", uid, 0)  # the finalizers moved since the view
        assert core.read_namespaced_pod("p", namespace).metadata.finalizers == [other, USAGE_FINALIZER]
        usage.release_pod(namespace, "p", uid, 1)
        assert core.read_namespaced_pod("p", namespace).metadata.finalizers == [other]
        usage.release_pod(namespace, "p", uid, 1)  # released already: nothing to do, and no error
        assert core.read_namespaced_pod("p", namespace).metadata.finalizers == [other]
    finally:
        core.patch_namespaced_pod(
            "p", namespace, [{"op": "remove", "path": "/metadata/finalizers"}], _content_type=usage.JSON_PATCH
        )
        core.delete_namespace(namespace)
