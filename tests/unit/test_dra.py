"""DRA: a node's GPUs from its ResourceSlices, the claims a tenant may make, and the quota items that count GPUs."""

from __future__ import annotations

from typing import Any

import pytest

from gpuaas.api.allocation import GpuAllocationSpec
from gpuaas.domain.dra import claim_problems, node_devices, published_devices
from gpuaas.domain.tenant import GPU_QUOTA_KEY, desired_resource_quota, device_class_quota_key, gpu_quota_items

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
