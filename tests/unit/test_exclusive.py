from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gpuaas.domain.exclusive import choose_exclusive_nodes, nodes_needed
from gpuaas.domain.nodes import NodeInfo


def node(name: str, healthy: bool = True) -> NodeInfo:
    return NodeInfo(name=name, labels={"gpuaas.io/pool": "p"}, ready=healthy, allocatable_gpus=8)


POOL = [node(f"n{i:02d}") for i in range(10)]


def test_nodes_needed_rounds_up() -> None:
    assert nodes_needed(16, 8) == 2
    assert nodes_needed(17, 8) == 3


def test_fresh_choice_takes_the_first_free_nodes_by_name() -> None:
    choice = choose_exclusive_nodes(POOL, 24, 8, held=[], held_by_others=["n00", "n02"])
    assert choice.nodes == ("n01", "n03", "n04")
    assert choice.added == choice.nodes
    assert choice.released == ()
    assert choice.shortfall == 0
    assert choice.message == "3 nodes reserved"


def test_held_healthy_nodes_are_kept() -> None:
    choice = choose_exclusive_nodes(POOL, 16, 8, held=["n07", "n09"], held_by_others=[])
    assert choice.nodes == ("n07", "n09")
    assert choice.added == ()


def test_unhealthy_held_node_is_replaced_by_a_spare() -> None:
    pool = [*POOL[:7], node("n07", healthy=False), *POOL[8:]]
    choice = choose_exclusive_nodes(pool, 16, 8, held=["n07", "n09"], held_by_others=["n00"])
    assert choice.nodes == ("n01", "n09")
    assert choice.added == ("n01",)
    assert choice.released == ("n07",)
    assert choice.shortfall == 0


def test_without_spares_the_unhealthy_node_stays_held_and_the_shortfall_is_reported() -> None:
    pool = [node("a"), node("b", healthy=False), node("c")]
    choice = choose_exclusive_nodes(pool, 16, 8, held=["a", "b"], held_by_others=["c"])
    assert choice.nodes == ("a", "b")
    assert choice.released == ()
    assert choice.shortfall == 1
    assert "1 healthy nodes missing" in choice.message


def test_vanished_and_excess_nodes_are_released() -> None:
    choice = choose_exclusive_nodes(POOL, 8, 8, held=["n03", "n05", "deleted"], held_by_others=[])
    assert choice.nodes == ("n03",)
    assert choice.released == ("deleted", "n05")


def test_idle_spares_are_preferred_over_busy_ones() -> None:
    choice = choose_exclusive_nodes(POOL, 16, 8, held=[], held_by_others=[], busy_gpus={"n00": 4, "n01": 0})
    assert choice.nodes == ("n01", "n02")


@settings(max_examples=300, deadline=None)
@given(
    health=st.lists(st.booleans(), min_size=0, max_size=16),
    gpus=st.integers(1, 16).map(lambda n: n * 8),
    held_mask=st.lists(st.booleans(), min_size=16, max_size=16),
    others_mask=st.lists(st.booleans(), min_size=16, max_size=16),
)
def test_choice_invariants(health: list[bool], gpus: int, held_mask: list[bool], others_mask: list[bool]) -> None:
    pool = [node(f"n{i:02d}", healthy) for i, healthy in enumerate(health)]
    held = [n.name for i, n in enumerate(pool) if held_mask[i]]
    others = [n.name for i, n in enumerate(pool) if others_mask[i] and not held_mask[i]]
    choice = choose_exclusive_nodes(pool, gpus, 8, held=held, held_by_others=others)
    healthy = {n.name for n in pool if n.healthy}
    need = gpus // 8
    assert not set(choice.nodes) & set(others)
    assert len(choice.nodes) <= need
    assert need - len(set(choice.nodes) & healthy) == choice.shortfall
    assert set(choice.added) <= healthy
    assert set(choice.released) <= set(held)
    assert not set(choice.released) & set(choice.nodes)
    kept_healthy = set(held) & healthy
    assert len(set(choice.nodes) & kept_healthy) == min(len(kept_healthy), need)
    assert choice == choose_exclusive_nodes(pool, gpus, 8, held=held, held_by_others=others)
