"""The GpuUsage kind: the usage ledger, one record per allocation and month.

A record is named `<allocation>-<yyyy-mm>` and outlives its allocation: the monthly report is computed
from these records alone. Its spec is the allocation's identity, copied once at creation; its status
holds the booked totals and the watermarks that make booking idempotent.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import Field

from gpuaas.api.common import API_VERSION, ApiModel, Condition
from gpuaas.api.pool import POOL_LABEL

USAGE_KIND = "GpuUsage"
USAGE_PLURAL = "gpuusages"
DEFAULT_TIME_ZONE = "Asia/Seoul"

ALLOCATION_LABEL = "gpuaas.io/allocation"
MONTH_LABEL = "gpuaas.io/month"
"""Labels on every record (with the pool label) so the ledger can be listed by allocation, month or pool."""

MONTH_PATTERN = r"^[0-9]{4}-(0[1-9]|1[0-2])$"


class UsageTenant(ApiModel):
    """The tenant as the allocation named it when the record was created."""

    name: str = Field(min_length=1)
    organization: str = ""
    contact: str = ""
    contract: str = ""


class GpuUsageSpec(ApiModel):
    """Immutable identity of the record, copied from the allocation."""

    allocation: str = Field(min_length=1)
    allocation_uid: str = Field(default="", alias="allocationUID")
    tenant: UsageTenant
    pool: str = Field(min_length=1)
    gpu_model: str = Field(min_length=1)
    provider: str = Field(min_length=1)
    month: str = Field(pattern=MONTH_PATTERN)
    time_zone: str = DEFAULT_TIME_ZONE


class PodWatermark(ApiModel):
    """How far one pod's GPU-seconds are booked in this month."""

    gpus: int = Field(ge=0)
    booked_until: datetime


class GpuUsageStatus(ApiModel):
    """Booked totals of one allocation in one month, and the watermarks up to which they are booked."""

    used_gpu_seconds: int = Field(default=0, ge=0, alias="usedGPUSeconds")
    granted_gpu_seconds: int = Field(default=0, ge=0, alias="grantedGPUSeconds")
    idle_seconds: int = Field(default=0, ge=0)
    used_gpu_hours: str = Field(default="0.000", alias="usedGPUHours")
    granted_gpu_hours: str = Field(default="0.000", alias="grantedGPUHours")
    """Display copies of the seconds in hours, for `kubectl get`; the seconds are authoritative."""
    granted_gpus: int = Field(default=0, ge=0, alias="grantedGPUs")
    peak_gpus_in_use: int = Field(default=0, ge=0, alias="peakGPUsInUse")
    pod_count: int = Field(default=0, ge=0)
    booked_until: datetime | None = None
    pods: dict[str, PodWatermark] = Field(default_factory=dict)
    conditions: list[Condition] = Field(default_factory=list)


class GpuUsage(ApiModel):
    """A whole GpuUsage object as the report and the ledger code see it."""

    name: str
    spec: GpuUsageSpec
    status: GpuUsageStatus = Field(default_factory=GpuUsageStatus)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> GpuUsage:
        """Parse a GpuUsage as the API server returns it (a dict with metadata, spec and status)."""
        metadata = obj.get("metadata") or {}
        return cls.model_validate(
            {"name": metadata.get("name", ""), "spec": obj.get("spec") or {}, "status": obj.get("status") or {}}
        )

    def to_object(self) -> dict[str, object]:
        """The manifest to create this record (status is written separately through the subresource)."""
        return {
            "apiVersion": API_VERSION,
            "kind": USAGE_KIND,
            "metadata": {"name": self.name, "labels": usage_labels(self.spec)},
            "spec": self.spec.to_wire(),
        }


def usage_name(allocation: str, month: str) -> str:
    """The record's name: `<allocation>-<yyyy-mm>`."""
    return f"{allocation}-{month}"


def usage_labels(spec: GpuUsageSpec) -> dict[str, str]:
    return {ALLOCATION_LABEL: spec.allocation, MONTH_LABEL: spec.month, POOL_LABEL: spec.pool}
