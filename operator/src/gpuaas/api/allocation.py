"""The GpuAllocation kind: one grant of N GPUs of one pool to one tenant for a time window."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Literal

from pydantic import Field, field_validator, model_validator

from gpuaas.api.common import ApiModel, Condition

ALLOCATION_KIND = "GpuAllocation"
ALLOCATION_PLURAL = "gpuallocations"
ALLOCATION_LABEL = "gpuaas.io/allocation"
"""Label naming the allocation on its namespace and, for exclusiveNodes, on its nodes."""

PROGRAM_GPUS_PER_NODE = 8
"""Node size of the program (8-GPU nodes); exclusiveNodes grants are whole nodes of this size."""

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Kubernetes quantities, restricted to plain decimals with a suffix so they can be scaled exactly.
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
DURATION_PATTERN = r"^([0-9]+(h|m|s))+$"
RESERVED_NAMESPACES = frozenset({"default", "kube-system", "kube-public", "kube-node-lease"})

Phase = Literal["Pending", "Queued", "Scheduled", "Active", "Suspended", "Expired", "Rejected", "Terminating"]
OwnerKind = Literal["User", "Group", "ServiceAccount"]
IdleAction = Literal["Report", "Reclaim"]
DeletionPolicy = Literal["Retain", "Delete"]

# Defaults per GPU sized on a DGX/HGX B200 node (8 GPUs, 2x56 cores = 224 threads, 2 TiB):
# 8 x 24 CPUs and 8 x 224Gi leave room for the system and daemonsets.
DEFAULT_CPU_PER_GPU = "24"
DEFAULT_MEMORY_PER_GPU = "224Gi"


def is_reserved_namespace(name: str) -> bool:
    """Namespaces gpuaas must never manage: the system ones and anything kube-*."""
    return name in RESERVED_NAMESPACES or name.startswith("kube-")


def parse_duration(text: str) -> timedelta:
    """A Go-style duration of h/m/s parts, e.g. "72h" or "1h30m"."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"invalid duration {text!r}: use hours, minutes and seconds like 72h or 1h30m")
    units = {"h": 3600, "m": 60, "s": 1}
    seconds = sum(int(number) * units[unit] for number, unit in re.findall(r"([0-9]+)(h|m|s)", text))
    return timedelta(seconds=seconds)


class Tenant(ApiModel):
    name: str = Field(max_length=63, pattern=DNS_LABEL_PATTERN)
    organization: str = Field(min_length=1, max_length=256)
    contact: str = Field(default="", max_length=256)
    contract: str = Field(default="", max_length=128)


class Window(ApiModel):
    """The lease window, half-open: GPUs are granted from start (inclusive) to end (exclusive)."""

    start: datetime
    end: datetime

    @field_validator("start", "end")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("window times need a time zone, e.g. 2026-01-01T00:00:00+09:00")
        return value

    @model_validator(mode="after")
    def _end_after_start(self) -> Window:
        if self.end <= self.start:
            raise ValueError("window.end must be after window.start")
        return self

    def contains(self, now: datetime) -> bool:
        return self.start <= now < self.end


class Owner(ApiModel):
    kind: OwnerKind = "User"
    name: str = Field(min_length=1, max_length=253)
    # Only for ServiceAccount; defaults to the allocation's namespace.
    namespace: str | None = Field(default=None, max_length=63, pattern=DNS_LABEL_PATTERN)


class ResourcesPerGpu(ApiModel):
    cpu: str = Field(default=DEFAULT_CPU_PER_GPU, pattern=QUANTITY_PATTERN)
    memory: str = Field(default=DEFAULT_MEMORY_PER_GPU, pattern=QUANTITY_PATTERN)

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _number_as_quantity(cls, value: object) -> object:
        # YAML `cpu: 16` arrives as an int; Kubernetes accepts both forms.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value


class IdlePolicy(ApiModel):
    after: str = Field(default="72h", max_length=32, pattern=DURATION_PATTERN)
    action: IdleAction = "Report"

    @property
    def after_duration(self) -> timedelta:
        return parse_duration(self.after)


class GpuAllocationSpec(ApiModel):
    tenant: Tenant
    pool: str = Field(max_length=63, pattern=DNS_LABEL_PATTERN)
    gpus: int = Field(ge=1, le=100_000)
    exclusive_nodes: bool = False
    window: Window
    namespace: str | None = Field(default=None, max_length=63, pattern=DNS_LABEL_PATTERN)
    owners: list[Owner] = Field(default_factory=list, max_length=64)
    resources_per_gpu: ResourcesPerGpu = Field(default_factory=ResourcesPerGpu, alias="resourcesPerGPU")
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)
    idle: IdlePolicy = Field(default_factory=IdlePolicy)
    suspend: bool = False
    deletion_policy: DeletionPolicy = "Retain"
    grace_period_seconds: int = Field(default=300, ge=0, le=604_800)

    @model_validator(mode="after")
    def _consistent(self) -> GpuAllocationSpec:
        if self.exclusive_nodes and self.gpus % PROGRAM_GPUS_PER_NODE:
            raise ValueError(
                f"with exclusiveNodes, gpus must be a multiple of {PROGRAM_GPUS_PER_NODE} "
                "(whole 8-GPU nodes, the program standard)"
            )
        if is_reserved_namespace(self.target_namespace):
            raise ValueError(f"namespace {self.target_namespace!r} is reserved; set spec.namespace")
        return self

    @property
    def target_namespace(self) -> str:
        """The tenant namespace: spec.namespace, or tenant.name when unset."""
        return self.namespace or self.tenant.name


class ConditionType:
    """Condition types of a GpuAllocation's status (kubectl wait --for=condition=<type>)."""

    ADMITTED = "Admitted"
    QUOTA_APPLIED = "QuotaApplied"
    FENCED = "Fenced"
    IDLE = "Idle"
    READY = "Ready"
    RELEASED = "Released"
    DEGRADED = "Degraded"


class ConditionReason:
    """Reasons of those conditions (and of the events that go with them) that are not a phase's name."""

    ADMITTED = "Admitted"
    QUOTA_APPLIED = "QuotaApplied"
    APPLY_FAILED = "ApplyFailed"
    FENCED = "Fenced"
    NODES_SHORT = "NodesShort"
    NOT_FENCED = "NotFenced"
    IN_USE = "InUse"
    GPUS_DOWN = "GrantedGPUsDown"
    GPUS_HEALTHY = "GrantedGPUsHealthy"
    NOT_ACTIVE = "NotActive"
    NO_GPUS_IN_USE = "NoGPUsInUse"
    READY = "Ready"
    NAMESPACE_TERMINATING = "NamespaceTerminating"


class GpuAllocationStatus(ApiModel):
    phase: Phase = "Pending"
    namespace: str | None = None
    # GPUs reserved by admission (Scheduled or Active); 0 when not admitted.
    granted_gpus: int = Field(default=0, ge=0, alias="grantedGPUs")
    in_use_gpus: int = Field(default=0, ge=0, alias="inUseGPUs")
    # Granted GPUs on hardware that is down (domain/downtime.py); the ledger credits them from this pass on.
    down_gpus: int = Field(default=0, ge=0, alias="downGPUs")
    queue_position: int | None = Field(default=None, ge=1)
    idle_since: datetime | None = None
    nodes: list[str] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    message: str = ""

    def conditions_message(self, kind: str) -> str:
        return next((c.message for c in self.conditions if c.type == kind), "")

    @property
    def admitted(self) -> bool:
        """Admission holds GPUs for this allocation (the input capacity.admit needs)."""
        return self.granted_gpus > 0 and self.phase in ("Scheduled", "Active")


class GpuAllocation(ApiModel):
    """The whole object, for tests and samples; handlers mostly use spec and status."""

    api_version: str = "gpuaas.io/v1alpha1"
    kind: Literal["GpuAllocation"] = "GpuAllocation"
    metadata: dict[str, object] = Field(default_factory=dict)
    spec: GpuAllocationSpec
    status: GpuAllocationStatus = Field(default_factory=GpuAllocationStatus)
