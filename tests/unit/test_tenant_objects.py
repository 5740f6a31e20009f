from __future__ import annotations

from typing import Any

import pytest

from gpuaas.api.allocation import GpuAllocationSpec, Phase
from gpuaas.domain.tenant import (
    GPU_QUOTA_KEY,
    LIMIT_RANGE_NAME,
    OWNERS_BINDING_NAME,
    QUOTA_NAME,
    desired_limit_range,
    desired_namespace,
    desired_owner_binding,
    desired_resource_quota,
    desired_tenant_objects,
    pods_cap,
    quota_open,
    scale_quantity,
)


def make_spec(**overrides: Any) -> GpuAllocationSpec:
    spec: dict[str, Any] = {
        "tenant": {"name": "kaist-vision", "organization": "KAIST 비전 연구실", "contract": "NIPA-1"},
        "pool": "naver-h200-a",
        "gpus": 64,
        "window": {"start": "2026-01-01T00:00:00+09:00", "end": "2026-11-30T00:00:00+09:00"},
        "owners": [
            {"kind": "User", "name": "prof.kim@kaist.ac.kr"},
            {"kind": "Group", "name": "students"},
            {"kind": "ServiceAccount", "name": "ci"},
            {"kind": "ServiceAccount", "name": "deployer", "namespace": "ops"},
        ],
        "resourcesPerGPU": {"cpu": "16", "memory": "128Gi"},
    }
    spec.update(overrides)
    return GpuAllocationSpec.model_validate(spec)


def hard(quota: dict[str, Any]) -> dict[str, str]:
    result: dict[str, str] = quota["spec"]["hard"]
    return result


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        ("Active", True),
        ("Pending", False),
        ("Queued", False),
        ("Scheduled", False),
        ("Suspended", False),
        ("Expired", False),
        ("Rejected", False),
        ("Terminating", False),
    ],
)
def test_quota_is_open_only_while_active(phase: Phase, expected: bool) -> None:
    assert quota_open(phase) is expected


@pytest.mark.parametrize(
    ("quantity", "factor", "expected"),
    [("16", 64, "1024"), ("128Gi", 64, "8192Gi"), ("500m", 8, "4000m"), ("1.5", 3, "4.5"), ("2.5Gi", 2, "5Gi")],
)
def test_scale_quantity_is_exact(quantity: str, factor: int, expected: str) -> None:
    assert scale_quantity(quantity, factor) == expected


def test_scale_quantity_rejects_unsupported_forms() -> None:
    with pytest.raises(ValueError, match="unsupported quantity"):
        scale_quantity("1e3", 2)


def test_namespace_carries_the_fence_labels_and_pod_security() -> None:
    namespace = desired_namespace("kaist-vision-2026", make_spec())
    metadata = namespace["metadata"]
    assert namespace["kind"] == "Namespace"
    assert metadata["name"] == "kaist-vision"
    labels = metadata["labels"]
    assert labels["gpuaas.io/managed"] == "true"
    assert labels["gpuaas.io/allocation"] == "kaist-vision-2026"
    assert labels["gpuaas.io/tenant"] == "kaist-vision"
    assert labels["gpuaas.io/pool"] == "naver-h200-a"
    assert labels["pod-security.kubernetes.io/enforce"] == "baseline"
    assert "gpuaas.io/released" not in labels
    assert metadata["annotations"]["gpuaas.io/organization"] == "KAIST 비전 연구실"
    released = desired_namespace("kaist-vision-2026", make_spec(), released=True)
    assert released["metadata"]["labels"]["gpuaas.io/released"] == "true"


def test_explicit_namespace_wins_over_tenant_name() -> None:
    objects = desired_tenant_objects("a1", make_spec(namespace="vision-prod"), "Active")
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"} == {"vision-prod"}
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"vision-prod"}


def test_open_quota_grants_gpus_and_scaled_cpu_memory() -> None:
    quota = desired_resource_quota("a1", make_spec(), is_open=True)
    assert quota["metadata"]["name"] == QUOTA_NAME
    assert quota["metadata"]["namespace"] == "kaist-vision"
    assert hard(quota)[GPU_QUOTA_KEY] == "64"
    assert hard(quota)["requests.cpu"] == "1024"
    assert hard(quota)["requests.memory"] == "8192Gi"
    assert hard(quota)["pods"] == "256"
    # Kubernetes rejects limits.* quota items for extended resources.
    assert not any(key.startswith("limits.nvidia.com") for key in hard(quota))


def test_closed_quota_holds_zero_gpus_but_leaves_data_access() -> None:
    quota = desired_resource_quota("a1", make_spec(), is_open=False)
    assert hard(quota)[GPU_QUOTA_KEY] == "0"
    assert hard(quota)["requests.cpu"] == "16"
    assert hard(quota)["requests.memory"] == "128Gi"


def test_desired_objects_follow_the_phase() -> None:
    phases: list[tuple[Phase, str]] = [("Active", "64"), ("Scheduled", "0"), ("Expired", "0"), ("Suspended", "0")]
    for phase, gpus in phases:
        objects = desired_tenant_objects("a1", make_spec(), phase)
        assert [o["kind"] for o in objects] == ["Namespace", "ResourceQuota", "LimitRange", "RoleBinding"]
        assert hard(objects[1])[GPU_QUOTA_KEY] == gpus, phase


def test_pods_cap_has_floor_and_ceiling() -> None:
    assert pods_cap(1) == 32
    assert pods_cap(1024) == 4096
    assert pods_cap(100_000) == 50_000


def test_limit_range_gives_default_requests() -> None:
    limit_range = desired_limit_range("a1", make_spec())
    assert limit_range["metadata"]["name"] == LIMIT_RANGE_NAME
    (container,) = limit_range["spec"]["limits"]
    assert container["type"] == "Container"
    assert container["defaultRequest"] == {"cpu": "1", "memory": "4Gi"}


def test_owner_binding_gives_admin_to_every_owner() -> None:
    binding = desired_owner_binding("a1", make_spec())
    assert binding["metadata"]["name"] == OWNERS_BINDING_NAME
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"}
    assert binding["subjects"] == [
        {"kind": "User", "name": "prof.kim@kaist.ac.kr", "apiGroup": "rbac.authorization.k8s.io"},
        {"kind": "Group", "name": "students", "apiGroup": "rbac.authorization.k8s.io"},
        {"kind": "ServiceAccount", "name": "ci", "namespace": "kaist-vision"},
        {"kind": "ServiceAccount", "name": "deployer", "namespace": "ops"},
    ]


def test_no_owners_gives_an_empty_binding() -> None:
    assert desired_owner_binding("a1", make_spec(owners=[]))["subjects"] == []


def test_objects_are_labelled_for_drift_watches() -> None:
    for obj in desired_tenant_objects("a1", make_spec(), "Active"):
        assert obj["metadata"]["labels"]["gpuaas.io/allocation"] == "a1", obj["kind"]
        assert obj["metadata"]["labels"]["gpuaas.io/managed"] == "true", obj["kind"]
        assert obj["apiVersion"]
        assert obj["kind"]
