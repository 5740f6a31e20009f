"""The baseline for the allocation benchmark: a plain script that server-side-applies, for N tenants,
the same Namespace, ResourceQuota, LimitRange and RoleBinding that gpuaas writes, and nothing else."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client

from gpuaas.api.allocation import GpuAllocationSpec
from gpuaas.domain.tenant import desired_tenant_objects
from gpuaas.k8s.objects import apply


def baseline_objects(count: int) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    objects: list[dict[str, Any]] = []
    for index in range(count):
        name = f"bulk-{index:05d}"
        spec = GpuAllocationSpec.model_validate(
            {
                "tenant": {"name": name, "organization": f"Lab {index}"},
                "pool": "nhn-b200-a",
                "gpus": 8,
                "window": {"start": now - timedelta(days=1), "end": now + timedelta(days=90)},
                "owners": [{"kind": "User", "name": f"user-{index}"}],
            }
        )
        objects.extend(desired_tenant_objects(name, spec, "Active"))
    return objects


def write_all(api: client.ApiClient, objects: list[dict[str, Any]], workers: int) -> None:
    """Namespaces first (the rest live in them), then everything else, `workers` requests at a time."""
    client.Configuration.set_default(api.configuration)
    namespaces = [o for o in objects if o["kind"] == "Namespace"]
    rest = [o for o in objects if o["kind"] != "Namespace"]
    with ThreadPoolExecutor(workers) as executor:
        list(executor.map(apply, namespaces))
        list(executor.map(apply, rest))
