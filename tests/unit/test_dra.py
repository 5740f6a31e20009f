"""DRA: a node's GPUs from its ResourceSlices, the claims a tenant may make, and the quota items that count GPUs."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonpatch
import pytest

from gpuaas.api.allocation import GpuAllocationSpec
from gpuaas.domain.actions import ReleasePod
from gpuaas.domain.booking import BookingPlan, WrittenLedger, plan_booking
from gpuaas.domain.dra import (
    DRA_GPUS_ANNOTATION,
    POD_CLAIM_NAME_ANNOTATION,
    SharedClaim,
    claim_problems,
    generated_claim_problems,
    node_devices,
    published_devices,
    recorded_claim_devices,
    recorded_shared_claims,
    replaced_shared_claim_problems,
)
from gpuaas.domain.fence import USAGE_FINALIZER, Fence, mutate_pod, validate_pod
from gpuaas.domain.guard import Requester, pod_change_problems
from gpuaas.domain.ledger import LedgerPod, PodInterval, billed_pod_gpus, shared_claim_spans
from gpuaas.domain.tenant import GPU_QUOTA_KEY, desired_resource_quota, device_class_quota_key, gpu_quota_items
from tests.builders import usage_identity

CLASS = "gpu.nvidia.com"


def resource_slice(
    node: str | None, devices: int, *, driver: str = CLASS, pool: str = "n1", generation: int = 1
) -> Any:
    return {
        "metadata": {"name": f"{node}-{driver}-{generation}"},
        "spec": {
            "driver": driver,
            **({"nodeName": node} if node else {"allNodes": True}),
            "pool": {"name": pool, "generation": generation, "resourceSliceCount": 1},
            "devices": [{"name": f"gpu-{i}"} for i in range(devices)],
        },
    }


def test_a_node_publishes_the_devices_of_the_newest_generation_of_each_pool_of_its_driver() -> None:
    slices = [
        published_devices(resource_slice("n1", 8, generation=1)),
        published_devices(resource_slice("n1", 6, generation=2)),  # a GPU failed: the driver republished
        published_devices(resource_slice("n1", 4, driver="nic.example.com")),
        published_devices(resource_slice("n1", 2, pool="n1-extra", generation=5)),
    ]
    assert node_devices([s for s in slices if s is not None], CLASS) == 8
    assert node_devices([], CLASS) == 0


def test_slices_not_tied_to_one_node_are_not_a_nodes_gpus() -> None:
    assert published_devices(resource_slice(None, 8)) is None


def claim(**request: Any) -> dict[str, Any]:
    exactly = {"deviceClassName": CLASS, "count": 2, **request}
    return {"kind": "ResourceClaim", "spec": {"devices": {"requests": [{"name": "gpus", "exactly": exactly}]}}}


def test_a_counted_claim_for_the_pools_class_is_allowed_also_as_a_template() -> None:
    assert claim_problems(claim(), "ResourceClaim", "dra-b200", CLASS) == []
    template = {"kind": "ResourceClaimTemplate", "spec": {"spec": claim()["spec"]}}
    assert claim_problems(template, "ResourceClaimTemplate", "dra-b200", CLASS) == []


@pytest.mark.parametrize(
    ("request_fields", "fragment"),
    [
        ({"deviceClassName": "mig.nvidia.com"}, "deviceClassName mig.nvidia.com is not the GPU class of pool dra-b200"),
        ({"allocationMode": "All"}, "allocationMode All would take every matching device"),
        ({"adminAccess": True}, "adminAccess would reach devices allocated to other tenants"),
        ({"tolerations": [{"operator": "Exists"}]}, "tolerations would reach devices an administrator took out"),
    ],
)
def test_claims_beyond_the_grant_are_refused(request_fields: dict[str, Any], fragment: str) -> None:
    (problem,) = claim_problems(claim(**request_fields), "ResourceClaim", "dra-b200", CLASS)
    assert problem.startswith("spec.devices.requests[gpus].exactly.")
    assert fragment in problem
    template = {"spec": {"spec": claim(**request_fields)["spec"]}}
    (problem,) = claim_problems(template, "ResourceClaimTemplate", "dra-b200", CLASS)
    assert problem.startswith("spec.spec.devices.requests[gpus].exactly.")


def test_a_choice_of_classes_is_refused_once() -> None:
    choice = {"spec": {"devices": {"requests": [{"name": "any", "firstAvailable": [{"deviceClassName": CLASS}]}]}}}
    (problem,) = claim_problems(choice, "ResourceClaim", "dra-b200", CLASS)
    assert "firstAvailable" in problem


def test_no_claim_is_allowed_in_a_device_plugin_pool() -> None:
    (problem,) = claim_problems(claim(), "ResourceClaim", "nhn-b200-a", None)
    assert problem.startswith("ResourceClaims are not allowed here: pool nhn-b200-a grants GPUs as nvidia.com/gpu")


def test_quota_grants_the_pools_gpus_and_holds_other_gpus_at_zero() -> None:
    plugin = gpu_quota_items(None, ["gpu.nvidia.com", "h200.example.com"])
    assert plugin.granted == GPU_QUOTA_KEY
    assert plugin.closed == (device_class_quota_key("gpu.nvidia.com"), device_class_quota_key("h200.example.com"))
    dra = gpu_quota_items(CLASS, ["gpu.nvidia.com", "h200.example.com"])  # another pool shares the class
    assert dra.granted == "gpu.nvidia.com.deviceclass.resource.k8s.io/devices"
    assert dra.closed == (device_class_quota_key("h200.example.com"), GPU_QUOTA_KEY)


def test_a_dra_pools_quota_counts_class_devices_and_closes_the_device_plugin() -> None:
    spec = GpuAllocationSpec.model_validate(
        {
            "tenant": {"name": "lab", "organization": "KAIST"},
            "pool": "dra-b200",
            "gpus": 16,
            "window": {"start": "2026-11-01T00:00:00Z", "end": "2026-12-01T00:00:00Z"},
            "owners": [{"kind": "User", "name": "alice"}],
        }
    )
    items = gpu_quota_items(CLASS, [])
    hard = desired_resource_quota("lab", spec, is_open=True, gpu_items=items)["spec"]["hard"]
    assert hard[device_class_quota_key(CLASS)] == "16"
    assert hard[GPU_QUOTA_KEY] == "0"
    closed = desired_resource_quota("lab", spec, is_open=False, gpu_items=items)["spec"]["hard"]
    assert closed[device_class_quota_key(CLASS)] == "0"


DRA_FENCE = Fence(
    pool="dra-b200",
    node_selector={"gpuaas.io/pool": "dra-b200"},
    device_class=CLASS,
    claim_templates={"two-gpus": 2, "one-gpu": 1},
)


def dra_pod(*claims: dict[str, str], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    container = {"name": "train", "resources": {"claims": [{"name": c["name"]} for c in claims]}}
    return {
        "metadata": {"name": "train-0", "namespace": "lab", **({"annotations": annotations} if annotations else {})},
        "spec": {"containers": [container], "resourceClaims": list(claims)},
    }


def admitted(pod: dict[str, Any], fence: Fence = DRA_FENCE) -> dict[str, Any]:
    return jsonpatch.apply_patch(pod, mutate_pod(pod, fence))


def test_a_dra_pod_records_its_template_devices_and_is_billed_for_them() -> None:
    pod = admitted(
        dra_pod(
            {"name": "a", "resourceClaimTemplateName": "two-gpus"},
            {"name": "b", "resourceClaimTemplateName": "one-gpu"},
        )
    )
    assert json.loads(pod["metadata"]["annotations"][DRA_GPUS_ANNOTATION]) == {"a": 2, "b": 1}
    assert USAGE_FINALIZER in pod["metadata"]["finalizers"]
    assert billed_pod_gpus(pod) == 3
    assert validate_pod(pod, DRA_FENCE) == []


def test_a_record_the_tenant_wrote_is_replaced_or_removed_at_admission() -> None:
    forged = {DRA_GPUS_ANNOTATION: '{"a":0}'}
    pod = admitted(dra_pod({"name": "a", "resourceClaimTemplateName": "two-gpus"}, annotations=forged))
    assert recorded_claim_devices(pod["metadata"]) == {"a": 2}
    plain = admitted(dra_pod(annotations=forged))
    assert DRA_GPUS_ANNOTATION not in plain["metadata"]["annotations"]
    # Without the mutation (webhook order), validation refuses a record that does not match.
    (problem,) = validate_pod(
        dra_pod({"name": "a", "resourceClaimTemplateName": "two-gpus"}, annotations=forged), DRA_FENCE
    )
    assert "does not match its claims" in problem


def test_claims_and_templates_that_do_not_exist_yet_are_refused() -> None:
    shared = admitted(dra_pod({"name": "a", "resourceClaimName": "team-gpus"}))
    (problem,) = validate_pod(shared, DRA_FENCE)
    assert "names ResourceClaim team-gpus, which does not exist" in problem
    missing = admitted(dra_pod({"name": "a", "resourceClaimTemplateName": "eight-gpus"}))
    (problem,) = validate_pod(missing, DRA_FENCE)
    assert "ResourceClaimTemplate eight-gpus, which does not exist" in problem


def test_the_record_cannot_be_changed_after_admission() -> None:
    pod = admitted(dra_pod({"name": "a", "resourceClaimTemplateName": "two-gpus"}))
    lowered = copy.deepcopy(pod)
    lowered["metadata"]["annotations"][DRA_GPUS_ANNOTATION] = '{"a":0}'
    tenant = Requester("alice", ("system:authenticated",))
    (problem,) = pod_change_problems(pod, lowered, tenant, "system:serviceaccount:gpuaas-system:gpuaas")
    assert "only gpuaas writes it" in problem


def generated_claim(devices: int, pod_claim: str = "a") -> dict[str, Any]:
    return {
        "metadata": {
            "annotations": {POD_CLAIM_NAME_ANNOTATION: pod_claim},
            "ownerReferences": [{"kind": "Pod", "name": "train-0", "controller": True}],
        },
        "spec": claim(count=devices)["spec"],
    }


def test_a_claim_made_for_a_pod_must_ask_for_what_the_pod_is_billed_for() -> None:
    assert generated_claim_problems(generated_claim(2), {"a": 2}) == []
    (problem,) = generated_claim_problems(generated_claim(8), {"a": 2})  # the template was made again, larger
    assert "asks for 8 devices, but the pod was admitted for 2" in problem
    (problem,) = generated_claim_problems(generated_claim(2), None)
    assert "not known to gpuaas yet" in problem
    assert generated_claim_problems(claim(), None) == []  # a claim of the tenant's own is checked as any other


SHARED_FENCE = replace(DRA_FENCE, shared_claims={"team-gpus": SharedClaim("team-gpus", "claim-uid-1", 4)})


def test_a_pod_sharing_a_claim_records_it_by_uid_and_is_not_billed_for_it_itself() -> None:
    pod = admitted(
        dra_pod({"name": "a", "resourceClaimName": "team-gpus"}, {"name": "b", "resourceClaimTemplateName": "one-gpu"}),
        SHARED_FENCE,
    )
    assert validate_pod(pod, SHARED_FENCE) == []
    assert recorded_shared_claims(pod["metadata"]) == {"claim-uid-1": 4}
    assert recorded_claim_devices(pod["metadata"]) == {"b": 1}
    assert USAGE_FINALIZER in pod["metadata"]["finalizers"]
    assert billed_pod_gpus(pod) == 1  # the shared claim is billed once, for all its pods (below)


def sharer(uid: str, start: int, end: int | None, claim_uid: str = "claim-uid-1") -> LedgerPod:
    interval = PodInterval(uid, 0, T0 + timedelta(seconds=start), None if end is None else T0 + timedelta(seconds=end))
    return LedgerPod(
        name=uid,
        namespace="lab",
        uid=uid,
        interval=interval,
        has_finalizer=True,
        finished=end is not None,
        shared_claims=((claim_uid, 4),),
    )


T0 = datetime(2026, 11, 10, 3, tzinfo=UTC)


def book(pods: list[LedgerPod], at_seconds: int, written: WrittenLedger | None = None) -> BookingPlan:
    now = T0 + timedelta(seconds=at_seconds)
    return plan_booking(
        usage_identity("Asia/Seoul"),
        {},
        written or WrittenLedger(),
        pods,
        None,
        now,
        "Asia/Seoul",
        timedelta(seconds=60),
    )


def test_a_shared_claim_is_billed_once_over_the_union_of_its_pods() -> None:
    pods = [sharer("p1", 0, 100), sharer("p2", 50, 150), sharer("p3", 300, 400)]
    spans = shared_claim_spans(pods)
    assert [(s.uid, s.gpus, s.start, s.end) for s in spans] == [
        (f"claim-uid-1/{int(T0.timestamp())}", 4, T0, T0 + timedelta(seconds=150)),
        (f"claim-uid-1/{int(T0.timestamp()) + 300}", 4, T0 + timedelta(seconds=300), T0 + timedelta(seconds=400)),
    ]
    plan = book(pods, 500)
    (ledger,) = plan.booked.values()
    assert ledger.used_gpu_seconds == 4 * (150 + 100)  # not 4 x (100 + 100 + 100)
    assert ledger.peak_gpus_in_use == 4
    assert {a.name for a in plan.actions if isinstance(a, ReleasePod)} == {"p1", "p2", "p3"}
    (record,) = plan.written.values()
    replay = book(pods, 600, WrittenLedger(records={record.spec.month: record}, last_write=T0))
    assert next(iter(replay.booked.values())).used_gpu_seconds == 1000  # a replay books nothing more


def test_a_pod_that_ends_while_another_shares_on_goes_once_the_claim_is_booked_past_its_end() -> None:
    plan = book([sharer("early", 0, 100), sharer("late", 50, None)], 120)
    assert {a.name for a in plan.actions if isinstance(a, ReleasePod)} == {"early"}
    (ledger,) = plan.booked.values()
    assert ledger.used_gpu_seconds == 4 * 120  # the claim is held from the first start until now


def test_a_shared_claim_made_again_while_pods_were_admitted_for_the_old_one_is_refused() -> None:
    (problem,) = replaced_shared_claim_problems("team-gpus", ["train-0", "train-1"])
    assert problem.startswith("pods train-0, train-1 were admitted for an earlier ResourceClaim team-gpus")
    assert replaced_shared_claim_problems("team-gpus", []) == []


def test_a_stretch_whose_first_pod_is_gone_is_not_booked_again() -> None:
    first = book([sharer("early", 0, 100), sharer("late", 50, None)], 120)
    (record,) = first.written.values()
    assert record.ledger.used_gpu_seconds == 4 * 120
    # "early" was released and is gone; "late" alone now starts the stretch at 50, which was booked from 0.
    written = WrittenLedger(records={record.spec.month: record}, last_write=T0 + timedelta(seconds=120))
    later = book([sharer("late", 50, 200)], 300, written)
    (ledger,) = later.booked.values()
    assert ledger.used_gpu_seconds == 4 * 200  # the claim was held from 0 to 200, once
    assert {a.name for a in later.actions if isinstance(a, ReleasePod)} == {"late"}
