"""Simulated GPU clusters for the local control plane: which pools, how many 8-GPU nodes each."""

from __future__ import annotations

from dataclasses import dataclass

from gpuaas.api.common import API_VERSION
from gpuaas.api.pool import POOL_KIND, POOL_LABEL

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
PROVIDER_LABEL = "gpuaas.io/provider"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"


@dataclass(frozen=True)
class ScenarioPool:
    name: str
    gpu_model: str
    provider: str
    nodes: int
    gpus_per_node: int = 8
    cpu: str = "224"  # dual-socket HGX B200/H200 class nodes
    memory: str = "2Ti"

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def node_selector(self) -> dict[str, str]:
        return {POOL_LABEL: self.name, GPU_PRODUCT_LABEL: f"NVIDIA-{self.gpu_model}"}


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    pools: tuple[ScenarioPool, ...]

    @property
    def node_count(self) -> int:
        return sum(pool.nodes for pool in self.pools)

    def gpus_by_model(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for pool in self.pools:
            totals[pool.gpu_model] = totals.get(pool.gpu_model, 0) + pool.gpus
        return totals


SCENARIOS: dict[str, Scenario] = {
    "program": Scenario(
        name="program",
        description="The government share of PROGRAM.md: B200 x 8,160 and H200 x 2,296 in 1,307 nodes",
        pools=(
            ScenarioPool("nhn-b200-a", "B200", "nhn", 510),
            ScenarioPool("nhn-b200-b", "B200", "nhn", 255),
            ScenarioPool("kakao-b200-a", "B200", "kakao", 255),
            ScenarioPool("naver-h200-a", "H200", "naver", 255),
            ScenarioPool("naver-h200-b", "H200", "naver", 32),
        ),
    ),
    "small": Scenario(
        name="small",
        description="A few nodes per pool, for tests",
        pools=(
            ScenarioPool("test-b200", "B200", "nhn", 4),
            ScenarioPool("test-h200", "H200", "naver", 3),
        ),
    ),
}


def node_name(pool: ScenarioPool, index: int) -> str:
    return f"{pool.name}-{index:04d}"


def node_manifest(pool: ScenarioPool, index: int) -> dict[str, object]:
    """A fake node that KWOK keeps Ready; capacity mirrors an 8-GPU HGX node."""
    resources = {
        "cpu": pool.cpu,
        "memory": pool.memory,
        "pods": "110",
        "ephemeral-storage": "30Ti",
        "nvidia.com/gpu": str(pool.gpus_per_node),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node_name(pool, index),
            "annotations": {KWOK_NODE_ANNOTATION: "fake"},
            "labels": {
                **pool.node_selector,
                PROVIDER_LABEL: pool.provider,
                "nvidia.com/gpu.count": str(pool.gpus_per_node),
                "kubernetes.io/hostname": node_name(pool, index),
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
            },
        },
        "spec": {},
        "status": {"capacity": resources, "allocatable": resources},
    }


def pool_manifest(pool: ScenarioPool) -> dict[str, object]:
    return {
        "apiVersion": API_VERSION,
        "kind": POOL_KIND,
        "metadata": {"name": pool.name},
        "spec": {
            "gpuModel": pool.gpu_model,
            "provider": pool.provider,
            "nodeSelector": pool.node_selector,
            "gpusPerNode": pool.gpus_per_node,
            "taint": True,
        },
    }
