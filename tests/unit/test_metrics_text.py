from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from gpuaas.domain.lifecycle import AllocationSample
from gpuaas.metrics import AllocationSeries


def sample(name: str, organization: str, phase: str = "Active", used: int = 3600) -> AllocationSample:
    return AllocationSample(
        allocation=name,
        tenant=name,
        organization=organization,
        pool="nhn-b200-a",
        gpu_model="B200",
        provider="nhn",
        phase=phase,
        granted_gpus=8,
        in_use_gpus=4,
        used_gpu_seconds=used,
        granted_gpu_seconds=7200,
        idle=False,
    )


def test_rendered_series_parse_and_escape_labels() -> None:
    series = AllocationSeries()
    series.replace("nhn-b200-a", [sample("lab", 'KAIST "비전" 연구실\\n'), sample("fm", "LG AI연구원", "Queued")])
    families = {f.name: f for f in text_string_to_metric_families(series.exposition().decode())}
    used = families["gpuaas_allocation_used_gpu_seconds"]
    assert used.type == "counter"
    by_allocation = {s.labels["allocation"]: s for s in used.samples if s.name.endswith("_total")}
    assert by_allocation["lab"].value == 3600
    assert by_allocation["lab"].labels["organization"] == 'KAIST "비전" 연구실\\n'
    phases = {s.labels["allocation"]: s.labels["phase"] for s in families["gpuaas_allocation_phase"].samples}
    assert phases == {"lab": "Active", "fm": "Queued"}


def test_replaced_pools_drop_deleted_allocations() -> None:
    series = AllocationSeries()
    series.replace("nhn-b200-a", [sample("lab", "x"), sample("gone", "y")])
    assert "gone" in series.exposition().decode()
    series.replace("nhn-b200-a", [sample("lab", "x", used=4000)])
    text = series.exposition().decode()
    assert "gone" not in text
    assert 'allocation="lab"' in text
    assert " 4000" in text
    series.drop("nhn-b200-a")
    assert "allocation=" not in series.exposition().decode()


def test_a_pass_that_hands_back_the_same_samples_keeps_their_lines_and_a_new_sample_is_rendered_anew() -> None:
    series = AllocationSeries()
    steady, changing = sample("steady", "x"), sample("changing", "y")
    series.replace("nhn-b200-a", [steady, changing])
    first = series.exposition()
    series.replace("nhn-b200-a", [steady, changing])
    assert series.exposition() == first
    series.replace("nhn-b200-a", [steady, sample("changing", "y", phase="Expired", used=4000)])
    families = {f.name: f for f in text_string_to_metric_families(series.exposition().decode())}
    used = {s.labels["allocation"]: s.value for s in families["gpuaas_allocation_used_gpu_seconds"].samples}
    assert used == {"steady": 3600, "changing": 4000}
    phases = {s.labels["allocation"]: s.labels["phase"] for s in families["gpuaas_allocation_phase"].samples}
    assert phases == {"steady": "Active", "changing": "Expired"}
