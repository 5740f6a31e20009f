"""The writer port's real writer sends every kind of write through the client it was given: a pool's writes use the
pool's own connections, never the shared client's."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpuaas.api.usage import GpuPoolUsage, GpuPoolUsageSpec, GpuUsage, PoolLedger, UsageLedger
from gpuaas.domain.access import TenantBinding
from gpuaas.domain.actions import (
    Action,
    AddAllocationFinalizer,
    AnnotateAllocation,
    ApplyObject,
    CreatePoolUsage,
    CreateUsage,
    DeleteNamespace,
    DeletePod,
    DeleteRoleBinding,
    PatchNode,
    PatchStatus,
    PostEvent,
    ReleasePod,
    RemoveAllocationFinalizer,
    SetRoleBindingSubjects,
    SuspendAllocation,
    WritePoolLedger,
    WriteUsageLedger,
)
from gpuaas.k8s.writer import KubernetesWriter
from tests.builders import usage_identity


class RefusingClient(client.ApiClient):
    """Records each call's path and refuses it as the API server would refuse a write (500)."""

    def __init__(self) -> None:
        configuration = client.Configuration()
        configuration.host = "https://127.0.0.1:1"  # never dialled: every call is refused before it is sent
        super().__init__(configuration)
        self.paths: list[str] = []

    def call_api(self, resource_path: str, method: str, *args: Any, **kwargs: Any) -> Any:
        self.paths.append(f"{method} {resource_path}")
        raise ApiException(status=500, reason="refused by the test")


def every_kind_of_write() -> list[Action]:
    usage = usage_identity()
    pool_usage = GpuPoolUsageSpec(pool="p", gpu_model="H200", provider="x", month="2026-11")
    binding = TenantBinding("ns", "team", "7", ({"kind": "User", "name": "a"},))
    manifest = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}}
    return [
        ApplyObject(manifest),
        PatchNode("node-1", {"spec": {"taints": []}}),
        DeletePod("ns", "pod"),
        DeleteNamespace("ns"),
        DeleteRoleBinding("ns", "team"),
        SetRoleBindingSubjects(binding, ()),
        PatchStatus("gpupools", "p", {"phase": "Ready"}),
        AddAllocationFinalizer("a", "gpuaas.io/release", has_any=False),
        RemoveAllocationFinalizer("a", "gpuaas.io/release", ("gpuaas.io/release",)),
        AnnotateAllocation("a", "gpuaas.io/k", "v"),
        SuspendAllocation("a"),
        PostEvent("GpuAllocation", "a", "uid-a", "Granted", "granted"),
        CreateUsage(GpuUsage(name="a-2026-11", spec=usage)),
        WriteUsageLedger("a-2026-11", UsageLedger()),
        CreatePoolUsage(GpuPoolUsage(name="p-2026-11", spec=pool_usage)),
        WritePoolLedger("p-2026-11", PoolLedger()),
        ReleasePod("ns", "pod", "uid-pod", 0),
    ]


@pytest.mark.parametrize("action", every_kind_of_write(), ids=lambda action: type(action).__name__)
def test_every_kind_of_write_goes_through_the_writers_own_client(action: Action) -> None:
    own = RefusingClient()
    if isinstance(action, PostEvent):  # an event is best effort: its refusal is logged, not raised
        KubernetesWriter(own).perform(action)
    else:  # the refusal of the writer's own client, not a dial of the shared one
        with pytest.raises(ApiException, match="refused by the test"):
            KubernetesWriter(own).perform(action)
    assert len(own.paths) == 1
