from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from gpuaas.api.pool import POOL_LABEL, GpuPoolSpec, GpuPoolStatus
from gpuaas.domain.nodes import NodeInfo, node_info_from_manifest
from gpuaas.domain.pool import measure_capacity, pool_status
from gpuaas.domain.scenarios import SCENARIOS, node_manifest
from gpuaas.k8s.resources import pool_settled

SPEC = GpuPoolSpec.model_validate({"gpuModel": "B200", "provider": "nhn", "nodeSelector": {POOL_LABEL: "a"}})
NOW = datetime(2026, 11, 1, tzinfo=UTC)


def node(name: str, pool: str = "a", **kwargs: object) -> NodeInfo:
    defaults: dict[str, object] = {"ready": True, "allocatable_gpus": 8}
    return NodeInfo(name=name, labels={POOL_LABEL: pool}, **{**defaults, **kwargs})  # type: ignore[arg-type]


def test_capacity_counts_only_healthy_nodes_of_the_pool() -> None:
    nodes = [
        node("ok-1"),
        node("ok-2"),
        node("not-ready", ready=False),
        node("cordoned", unschedulable=True),
        node("no-gpus", allocatable_gpus=0),
        node("tainted", foreign_taints=("node.kubernetes.io/unreachable=:NoExecute",)),
        node("other-pool", pool="b"),
    ]
    capacity = measure_capacity(SPEC, nodes)
    assert capacity.nodes == 6
    assert capacity.ready_nodes == 5
    assert capacity.healthy_nodes == 2
    assert capacity.capacity_gpus == 16
    assert capacity.program_gpus == 16


def test_program_gpus_is_capped_by_healthy_capacity() -> None:
    spec = SPEC.model_copy(update={"program_gpus": 100})
    assert measure_capacity(spec, [node("n1")]).program_gpus == 8
    spec = SPEC.model_copy(update={"program_gpus": 4})
    assert measure_capacity(spec, [node("n1"), node("n2")]).program_gpus == 4


def test_a_node_never_counts_more_than_gpus_per_node() -> None:
    assert measure_capacity(SPEC, [node("big", allocatable_gpus=16)]).capacity_gpus == 8


@given(st.lists(st.tuples(st.booleans(), st.booleans(), st.integers(0, 16)), max_size=40))
def test_capacity_never_exceeds_ready_nodes_times_gpus(flags: list[tuple[bool, bool, int]]) -> None:
    nodes = [node(f"n{i}", ready=r, unschedulable=u, allocatable_gpus=g) for i, (r, u, g) in enumerate(flags)]
    capacity = measure_capacity(SPEC, nodes)
    assert 0 <= capacity.capacity_gpus <= capacity.ready_nodes * SPEC.gpus_per_node
    assert capacity.healthy_nodes <= capacity.ready_nodes <= capacity.nodes == len(nodes)


def test_status_keeps_transition_time_while_condition_holds() -> None:
    capacity = measure_capacity(SPEC, [node("n1")])
    first = pool_status(SPEC, GpuPoolStatus(), capacity, 1, NOW)
    later = pool_status(SPEC, first, capacity, 1, NOW + timedelta(hours=1))
    assert later == first
    broken = pool_status(SPEC, first, measure_capacity(SPEC, [node("n1", ready=False)]), 1, NOW + timedelta(hours=2))
    ready = next(c for c in broken.conditions if c.type == "Ready")
    assert ready.status == "False"
    assert ready.reason == "NoHealthyNodes"
    assert ready.last_transition_time == NOW + timedelta(hours=2)


def test_status_wire_names_match_the_crd() -> None:
    status = pool_status(SPEC, GpuPoolStatus(), measure_capacity(SPEC, [node("n1")]), 3, NOW).to_wire()
    assert {"capacityGPUs", "programGPUs", "grantedGPUs", "availableGPUs", "inUseGPUs", "readyNodes"} <= set(status)
    assert status["observedGeneration"] == 3


def test_node_manifest_round_trips_to_node_info() -> None:
    pool = SCENARIOS["small"].pools[0]
    manifest = node_manifest(pool, 0)
    manifest["status"]["conditions"] = [{"type": "Ready", "status": "True"}]  # type: ignore[index]
    manifest["spec"] = {
        "taints": [
            {"key": POOL_LABEL, "value": pool.name, "effect": "NoSchedule"},
            {"key": "gpuaas.io/allocation", "value": "fm-team", "effect": "NoSchedule"},
        ]
    }
    info = node_info_from_manifest(manifest, (POOL_LABEL, "gpuaas.io/allocation"))
    assert info.healthy
    assert info.allocatable_gpus == 8
    assert info.foreign_taints == ()  # the pool's own fence taint does not make a node unhealthy


def test_program_scenario_matches_the_government_share() -> None:
    program = SCENARIOS["program"]
    assert program.node_count == 1307
    assert program.gpus_by_model() == {"B200": 8160, "H200": 2296}


def test_pool_totals_are_printed_only_once_every_node_of_every_pool_is_healthy() -> None:
    def pool(generation: int, observed: int | None, nodes: int, degraded: str | None) -> dict[str, object]:
        status: dict[str, object] = {"nodes": nodes}
        if observed is not None:
            status["observedGeneration"] = observed
        if degraded is not None:
            status["conditions"] = [{"type": "Degraded", "status": degraded}]
        return {"metadata": {"name": "p", "generation": generation}, "status": status}

    assert pool_settled(pool(2, 2, 510, "False"))
    assert not pool_settled(pool(2, 2, 510, "True"))  # nodes Ready but still tainted not-ready, or without GPUs
    assert not pool_settled(pool(2, 1, 510, "False"))  # status of an older spec
    assert not pool_settled(pool(2, 2, 510, None))  # no status conditions yet
    assert not pool_settled(pool(1, 1, 0, "False"))  # no node selected yet
