"""The GpuPool kind: one node pool of one GPU model."""

from __future__ import annotations

from pydantic import Field

from gpuaas.api.common import ApiModel, Condition

POOL_KIND = "GpuPool"
POOL_PLURAL = "gpupools"
POOL_LABEL = "gpuaas.io/pool"
"""Label on nodes naming their pool; also the key of the pool taint and toleration."""


class PoolConditionType:
    """Condition types of a GpuPool's status (kubectl wait --for=condition=<type>)."""

    READY = "Ready"
    DEGRADED = "Degraded"


class PoolConditionReason:
    NO_NODES = "NoNodes"
    NO_HEALTHY_NODES = "NoHealthyNodes"
    NODES_HEALTHY = "NodesHealthy"
    UNHEALTHY_NODES = "UnhealthyNodes"
    ALL_NODES_HEALTHY = "AllNodesHealthy"


DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class DraSpec(ApiModel):
    """The pool's GPUs are handed out through DRA ResourceClaims of one DeviceClass, not the device plugin."""

    device_class_name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)
    driver: str | None = Field(default=None, min_length=1, max_length=63, pattern=DNS_SUBDOMAIN)

    @property
    def driver_name(self) -> str:
        """The driver publishing the pool's devices in ResourceSlices (NVIDIA names both gpu.nvidia.com)."""
        return self.driver or self.device_class_name


class GpuPoolSpec(ApiModel):
    gpu_model: str = Field(min_length=1)
    provider: str = Field(min_length=1)
    node_selector: dict[str, str] = Field(min_length=1)
    gpus_per_node: int = Field(default=8, ge=1, le=64)
    program_gpus: int | None = Field(default=None, ge=0, alias="programGPUs")
    taint: bool = True
    # PriorityClasses the pool's tenants may name; none by default, so no tenant can preempt another.
    allowed_priority_classes: list[str] = Field(default_factory=list, max_length=32)
    # Longest terminationGracePeriodSeconds of a GPU pod: how long GPUs may outlive a delete, an expiry or a reclaim.
    max_termination_grace_period_seconds: int = Field(default=300, ge=0, le=86400)
    dra: DraSpec | None = None


class GpuPoolStatus(ApiModel):
    nodes: int = 0
    ready_nodes: int = 0
    capacity_gpus: int = Field(default=0, alias="capacityGPUs")
    program_gpus: int = Field(default=0, alias="programGPUs")
    granted_gpus: int = Field(default=0, alias="grantedGPUs")
    available_gpus: int = Field(default=0, alias="availableGPUs")
    in_use_gpus: int = Field(default=0, alias="inUseGPUs")
    # Program GPUs not on healthy nodes, and how many of them were granted (the grants' downtime credit).
    down_gpus: int = Field(default=0, alias="downGPUs")
    credited_gpus: int = Field(default=0, alias="creditedGPUs")
    queued: int = 0
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
