"""The GpuUsage kind: the usage ledger, one record per allocation and month.

A record is named `<allocation>-<yyyy-mm>` and outlives its allocation: the monthly report is computed
from these records alone. Its spec is the allocation's identity, copied once at creation; its `ledger` holds the
booked totals and the watermarks that make booking idempotent. The ledger is not status: status is what a controller
can rebuild from the world, and backup tools (Velero) drop it on restore, while the booked seconds cannot be rebuilt
from anything. Records written before the move kept them in `status`; they are read from there until their next
write moves them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from pydantic import Field

from gpuaas.api.common import API_VERSION, ApiModel
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
    # The allocation's namespace, where its pods ran (records made before it was kept: the allocation's name).
    namespace: str = ""
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


class GrantChange(ApiModel):
    """One change to the allocation, as the API server saw who asked (domain/history.py)."""

    at: datetime
    by: str = Field(min_length=1)
    changes: list[str] = Field(min_length=1)


class UsageLedger(ApiModel):
    """Booked totals of one allocation in one month, and the watermarks up to which they are booked."""

    used_gpu_seconds: int = Field(default=0, ge=0, alias="usedGPUSeconds")
    granted_gpu_seconds: int = Field(default=0, ge=0, alias="grantedGPUSeconds")
    # Of the granted GPU-seconds, those the tenant could not use because the hardware under the grant was down
    # (domain/downtime.py): the downtime credit.
    down_gpu_seconds: int = Field(default=0, ge=0, alias="downGPUSeconds")
    idle_seconds: int = Field(default=0, ge=0)
    used_gpu_hours: str = Field(default="0.000", alias="usedGPUHours")
    granted_gpu_hours: str = Field(default="0.000", alias="grantedGPUHours")
    """Display copies of the seconds in hours, for `kubectl get`; the seconds are authoritative."""
    granted_gpus: int = Field(default=0, ge=0, alias="grantedGPUs")
    peak_gpus_in_use: int = Field(default=0, ge=0, alias="peakGPUsInUse")
    pod_count: int = Field(default=0, ge=0)
    # Pods whose finish the kubelet never reported, billed to their kill deadline (deletion request + allowed grace).
    pods_billed_to_deadline: int = Field(default=0, ge=0)
    # The seconds split by local day of the month ("01".."31"): the report's daily series. They sum to the month's
    # seconds, except in records booked before they existed.
    daily_used_gpu_seconds: dict[str, int] = Field(default_factory=dict, alias="dailyUsedGPUSeconds")
    daily_granted_gpu_seconds: dict[str, int] = Field(default_factory=dict, alias="dailyGrantedGPUSeconds")
    booked_until: datetime | None = None
    pods: dict[str, PodWatermark] = Field(default_factory=dict)
    # Changes to the allocation made in this month, oldest first.
    history: list[GrantChange] = Field(default_factory=list)


class GpuUsage(ApiModel):
    """A whole GpuUsage object as the report and the ledger code see it."""

    name: str
    spec: GpuUsageSpec
    ledger: UsageLedger = Field(default_factory=UsageLedger)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> GpuUsage:
        """Parse a GpuUsage as the API server returns it; a record not written since the ledger left `status` is
        read from there."""
        return _WireUsage.model_validate(obj).record()

    def to_object(self) -> dict[str, object]:
        """The manifest that creates this record, ledger included."""
        return {
            "apiVersion": API_VERSION,
            "kind": USAGE_KIND,
            "metadata": {"name": self.name, "labels": usage_labels(self.spec)},
            "spec": self.spec.to_wire(),
            "ledger": self.ledger.to_wire(),
        }


def ledger_patch(
    ledger: UsageLedger, dropped_pods: Iterable[str] = (), labels: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A JSON merge patch that writes the ledger, deletes the watermarks of pods pruned from it (a merge patch keeps
    map keys it does not name) and clears the `status` that held the ledger before. With `labels`, it also sets
    them, restoring any that were changed: the report lists a month by its label."""
    wire: dict[str, Any] = ledger.to_wire()
    wire["pods"] = {**dict.fromkeys(dropped_pods), **wire.get("pods", {})}
    return _with_labels({"ledger": wire, "status": None}, labels)


def pool_ledger_patch(ledger: PoolLedger, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A JSON merge patch that writes a pool's month ledger and, with `labels`, its labels (as `ledger_patch`)."""
    return _with_labels({"ledger": ledger.to_wire()}, labels)


def _with_labels(patch: dict[str, Any], labels: Mapping[str, str] | None) -> dict[str, Any]:
    if labels:
        patch["metadata"] = {"labels": dict(labels)}
    return patch


def record_namespace(spec: GpuUsageSpec) -> str:
    """Where the allocation's pods ran; records made before they kept it name the default, the allocation's name."""
    return spec.namespace or spec.allocation


def usage_name(allocation: str, month: str) -> str:
    """The record's name: `<allocation>-<yyyy-mm>`."""
    return f"{allocation}-{month}"


def usage_labels(spec: GpuUsageSpec) -> dict[str, str]:
    return {ALLOCATION_LABEL: spec.allocation, MONTH_LABEL: spec.month, POOL_LABEL: spec.pool}


POOL_USAGE_KIND = "GpuPoolUsage"
POOL_USAGE_PLURAL = "gpupoolusages"


class GpuPoolUsageSpec(ApiModel):
    """Immutable identity of a pool's month record."""

    pool: str = Field(min_length=1)
    gpu_model: str = Field(min_length=1)
    provider: str = Field(min_length=1)
    month: str = Field(pattern=MONTH_PATTERN)
    time_zone: str = DEFAULT_TIME_ZONE


class PoolLedger(ApiModel):
    """A pool's program GPU-seconds in one month, split so that program = usable granted + unallocated + down
    (domain/downtime.py). Granted and credited are the grants' whole and their downtime credit."""

    program_gpu_seconds: int = Field(default=0, ge=0, alias="programGPUSeconds")
    granted_gpu_seconds: int = Field(default=0, ge=0, alias="grantedGPUSeconds")
    credited_gpu_seconds: int = Field(default=0, ge=0, alias="creditedGPUSeconds")
    usable_granted_gpu_seconds: int = Field(default=0, ge=0, alias="usableGrantedGPUSeconds")
    unallocated_gpu_seconds: int = Field(default=0, ge=0, alias="unallocatedGPUSeconds")
    down_gpu_seconds: int = Field(default=0, ge=0, alias="downGPUSeconds")
    booked_until: datetime | None = None

    @property
    def identity_gap(self) -> int:
        """Program GPU-seconds that the three parts do not account for (0 when the record adds up)."""
        return self.program_gpu_seconds - (
            self.usable_granted_gpu_seconds + self.unallocated_gpu_seconds + self.down_gpu_seconds
        )


def pool_usage_labels(spec: GpuPoolUsageSpec) -> dict[str, str]:
    return {MONTH_LABEL: spec.month, POOL_LABEL: spec.pool}


class GpuPoolUsage(ApiModel):
    """A pool's month record, named `<pool>-<yyyy-mm>`; like GpuUsage it outlives what it records."""

    name: str
    spec: GpuPoolUsageSpec
    ledger: PoolLedger = Field(default_factory=PoolLedger)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> GpuPoolUsage:
        return _WirePoolUsage.model_validate(obj).record()

    def to_object(self) -> dict[str, object]:
        return {
            "apiVersion": API_VERSION,
            "kind": POOL_USAGE_KIND,
            "metadata": {"name": self.name, "labels": pool_usage_labels(self.spec)},
            "spec": self.spec.to_wire(),
            "ledger": self.ledger.to_wire(),
        }


class ObjectName(ApiModel):
    """The one field of an object's metadata the ledger keeps."""

    name: str = ""


class ListMetadata(ApiModel):
    continue_token: str = Field(default="", alias="continue")


class _WireUsage(ApiModel):
    """A GpuUsage as the API server sends it (a dict, or bytes of JSON for a list): its ledger is the `ledger` field,
    or `status` in a record not written since the ledger moved."""

    metadata: ObjectName = Field(default_factory=ObjectName)
    spec: GpuUsageSpec
    ledger: UsageLedger | None = None
    status: UsageLedger | None = None

    def record(self) -> GpuUsage:
        ledger = self.ledger if self.ledger is not None else self.status
        return GpuUsage(name=self.metadata.name, spec=self.spec, ledger=ledger or UsageLedger())


class _WirePoolUsage(ApiModel):
    metadata: ObjectName = Field(default_factory=ObjectName)
    spec: GpuPoolUsageSpec
    ledger: PoolLedger = Field(default_factory=PoolLedger)

    def record(self) -> GpuPoolUsage:
        return GpuPoolUsage(name=self.metadata.name, spec=self.spec, ledger=self.ledger)


class GpuUsageList(ApiModel):
    """One page of a GpuUsage list. Parsed from the response's bytes in one pass (`model_validate_json`), which
    skips the fields the ledger does not keep (managedFields are about half of each object) without building them:
    the report reads thousands of records."""

    metadata: ListMetadata = Field(default_factory=ListMetadata)
    items: list[_WireUsage] = Field(default_factory=list)

    def records(self) -> list[GpuUsage]:
        return [item.record() for item in self.items]


class GpuPoolUsageList(ApiModel):
    metadata: ListMetadata = Field(default_factory=ListMetadata)
    items: list[_WirePoolUsage] = Field(default_factory=list)

    def records(self) -> list[GpuPoolUsage]:
        return [item.record() for item in self.items]
