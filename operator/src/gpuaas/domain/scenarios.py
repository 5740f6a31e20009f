"""Simulated GPU clusters for the local control plane: which pools, how many 8-GPU nodes each."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from datetime import datetime

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
    # A DRA pool: its nodes publish their GPUs as devices of this DeviceClass's driver in ResourceSlices, and have
    # no nvidia.com/gpu allocatable (a device plugin does not run beside NVIDIA's DRA driver).
    dra_class: str | None = None

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
    }
    if pool.dra_class is None:
        resources["nvidia.com/gpu"] = str(pool.gpus_per_node)
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


# The pool of the local cluster's real node (`gpuaas cluster up --real-nodes 1`): one kubelet with gpuaas's fake
# device plugin, so tenant GPU pods run as real containers.
REAL_NODE_POOL = ScenarioPool(name="real-b200", gpu_model="B200", provider="nhn", nodes=1)


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
            **({"dra": {"deviceClassName": pool.dra_class}} if pool.dra_class else {}),
        },
    }


def device_class_manifest(name: str) -> dict[str, object]:
    """A DeviceClass selecting every device of the driver of the same name, as NVIDIA's gpu.nvidia.com does."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "DeviceClass",
        "metadata": {"name": name},
        "spec": {"selectors": [{"cel": {"expression": f'device.driver == "{name}"'}}]},
    }


def resource_slice_manifest(pool: ScenarioPool, index: int) -> dict[str, object]:
    """What a DRA driver publishes for one fake node: its GPUs as devices, one pool per node."""
    assert pool.dra_class is not None
    node = node_name(pool, index)
    devices = [
        {
            "name": f"gpu-{gpu}",
            "attributes": {
                "type": {"string": "gpu"},
                "productName": {"string": f"NVIDIA {pool.gpu_model}"},
                "index": {"int": gpu},
            },
        }
        for gpu in range(pool.gpus_per_node)
    ]
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": f"{node}-{pool.dra_class}"},
        "spec": {
            "driver": pool.dra_class,
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": devices,
        },
    }


@dataclass(frozen=True)
class DemoGrant:
    name: str
    organization: str
    pool: str
    gpus: int
    exclusive: bool = False
    priority: int = 0
    running_pods: int = 0  # 8-GPU pods the demo runs for this tenant


# The five national foundation-model teams get whole nodes; labs and startups get 8-64 GPUs (PROGRAM.md).
def _team(name: str, organization: str, pool: str, running_pods: int) -> DemoGrant:
    return DemoGrant(name, organization, pool, 1024, exclusive=True, priority=100, running_pods=running_pods)


FOUNDATION_TEAMS = (
    _team("lg-exaone", "LG AI연구원", "nhn-b200-a", 24),
    _team("skt-ax", "SK텔레콤", "nhn-b200-a", 16),
    _team("upstage-solar", "업스테이지", "nhn-b200-b", 12),
    _team("nc-varco", "NC AI", "kakao-b200-a", 8),
    _team("naver-hyperclova", "네이버클라우드", "naver-h200-a", 20),
)
_LABS = (
    ("snu-vision", "서울대학교 컴퓨터비전연구실"),
    ("kaist-nlp", "KAIST 자연어처리연구실"),
    ("postech-ml", "포항공과대학교 기계학습연구실"),
    ("yonsei-med", "연세대학교 의료AI연구소"),
    ("korea-speech", "고려대학교 음성정보처리연구실"),
    ("unist-robot", "UNIST 로보틱스연구실"),
    ("gist-bio", "GIST 바이오인포매틱스연구실"),
    ("skku-ds", "성균관대학교 데이터사이언스연구실"),
    ("hanyang-auto", "한양대학교 자율주행연구실"),
    ("etri-lm", "ETRI 언어지능연구실"),
    ("kisti-sci", "KISTI 과학데이터연구센터"),
    ("twelve-labs", "트웰브랩스"),
    ("riiid", "뤼이드"),
    ("lunit", "루닛"),
    ("vuno", "뷰노"),
    ("scatter-lab", "스캐터랩"),
    ("wrtn", "뤼튼테크놀로지스"),
    ("moreh", "모레"),
    ("rebellions", "리벨리온"),
    ("furiosa", "퓨리오사AI"),
    ("deepx", "딥엑스"),
    ("selectstar", "셀렉트스타"),
    ("makinarocks", "마키나락스"),
    ("nota-ai", "노타"),
    ("allganize", "올거나이즈"),
    ("konan", "코난테크놀로지"),
    ("saltlux", "솔트룩스"),
    ("42dot", "포티투닷"),
    ("vessl", "베슬에이아이"),
    ("pinkfong-ai", "더핑크퐁컴퍼니 AI랩"),
    ("kaist-chem", "KAIST 계산화학연구실"),
    ("snu-climate", "서울대학교 기후모델링연구실"),
    ("dgist-brain", "DGIST 뇌과학연구실"),
    ("kyunghee-game", "경희대학교 게임AI연구실"),
    ("ajou-security", "아주대학교 보안AI연구실"),
    ("sogang-ir", "서강대학교 정보검색연구실"),
)
_LAB_POOLS = ("nhn-b200-a", "nhn-b200-b", "kakao-b200-a", "naver-h200-a", "naver-h200-b", "naver-h200-b")
_LAB_SIZES = (8, 16, 32, 64, 24, 48)


def demo_grants() -> list[DemoGrant]:
    """A realistic program: the foundation teams, then labs and startups; naver-h200-b is oversubscribed."""
    labs = [
        DemoGrant(
            name,
            organization,
            _LAB_POOLS[index % len(_LAB_POOLS)],
            _LAB_SIZES[index % len(_LAB_SIZES)] * (2 if _LAB_POOLS[index % len(_LAB_POOLS)] == "naver-h200-b" else 1),
            running_pods=1 if index % 3 else 0,
        )
        for index, (name, organization) in enumerate(_LABS)
    ]
    return [*FOUNDATION_TEAMS, *labs]


def demo_allocation_manifest(grant: DemoGrant, start: datetime, end: datetime) -> dict[str, object]:
    return {
        "apiVersion": API_VERSION,
        "kind": "GpuAllocation",
        "metadata": {"name": grant.name},
        "spec": {
            "tenant": {
                "name": grant.name,
                "organization": grant.organization,
                "contact": f"gpu@{grant.name}.example",
                "contract": f"NIPA-2026-{zlib.crc32(grant.name.encode()) % 10000:04d}",
            },
            "pool": grant.pool,
            "gpus": grant.gpus,
            "exclusiveNodes": grant.exclusive,
            "priority": grant.priority,
            "window": {"start": start.isoformat(timespec="seconds"), "end": end.isoformat(timespec="seconds")},
            "owners": [{"kind": "User", "name": f"{grant.name}-admin"}],
            "idle": {"after": "72h", "action": "Report"},
        },
    }
