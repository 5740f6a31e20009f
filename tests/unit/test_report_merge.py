"""One report across the program's clusters: rows per cluster, totals that are the sums of the parts."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import typer
import yaml

from gpuaas.api.usage import GpuUsage
from gpuaas.cli import ledger_sources
from gpuaas.domain.report import Report, ReportTotal, build_merged_report, build_report
from gpuaas.k8s.ledger_reader import LedgerSource
from gpuaas.reporting import to_csv, to_html, to_json, to_xlsx
from gpuaas.reporting.formats import csv_cell_text
from tests.unit.test_report import MONTH, record


def per_cluster() -> dict[str, list[GpuUsage]]:
    """Three providers' clusters; nhn and kakao each have a pool named like the other's, and naver has one record of
    another month only."""
    return {
        "nhn": [
            record("upstage-fm", "업스테이지", "(주)업스테이지", "nhn-b200-a", 1024, 2_411_234_567, 3_601, 1016, 212),
            record("snu-ai-lab", "서울대학교 AI연구실", "서울대학교", "nhn-b200-a", 64, 123_456_789, 86_399, 56, 37),
        ],
        "kakao": [
            # Same pool name and allocation name as in nhn: another cluster's, and it must stay apart.
            record("snu-ai-lab", "서울대학교 AI연구실", "서울대학교", "nhn-b200-a", 8, 7_777, 0, 8, 2),
            record("lg-exaone", "LG AI연구원", "LG", "kakao-b200-a", 512, 1_300_000_001, 0, 512, 64),
        ],
        "naver": [record("naver-startup", "스타트업", "네이버 클라우드", "naver-h200-a", 8, 99, month="2026-09")],
    }


def total(report: Report, scope: str, key: str) -> ReportTotal:
    (found,) = [t for t in report.totals if t.scope == scope and t.key == key]
    return found


def test_the_merged_report_is_the_sum_of_the_clusters_reports_to_the_gpu_second() -> None:
    merged = build_merged_report(per_cluster(), MONTH)
    assert merged.clusters == ("kakao", "naver", "nhn")
    program = total(merged, "all", "")
    parts = {name: build_report(records, MONTH) for name, records in per_cluster().items()}
    for name, part in parts.items():
        alone = total(part, "all", "")
        in_merged = total(merged, "cluster", name)
        assert (in_merged.used_gpu_seconds, in_merged.granted_gpu_seconds, in_merged.idle_seconds) == (
            alone.used_gpu_seconds,
            alone.granted_gpu_seconds,
            alone.idle_seconds,
        )
        assert [(row.allocation, row.used_gpu_seconds) for row in merged.rows if row.cluster == name] == [
            (row.allocation, row.used_gpu_seconds) for row in part.rows
        ]
    assert program.used_gpu_seconds == sum(total(p, "all", "").used_gpu_seconds for p in parts.values())
    assert program.used_gpu_seconds == 2_411_234_567 + 123_456_789 + 7_777 + 1_300_000_001
    assert program.allocations == 4


def test_same_named_pools_of_two_clusters_are_totalled_apart() -> None:
    merged = build_merged_report(per_cluster(), MONTH)
    pools = {t.key: t.used_gpu_seconds for t in merged.totals if t.scope == "pool"}
    assert pools == {
        "kakao/kakao-b200-a": 1_300_000_001,
        "kakao/nhn-b200-a": 7_777,
        "nhn/nhn-b200-a": 2_411_234_567 + 123_456_789,
    }
    # Providers and models are the program's own keys: summed across clusters.
    assert total(merged, "provider", "nhn").used_gpu_seconds == 2_411_234_567 + 123_456_789 + 7_777


def test_a_cluster_with_nothing_this_month_still_has_its_zero_total() -> None:
    merged = build_merged_report(per_cluster(), MONTH)
    naver = total(merged, "cluster", "naver")
    assert (naver.allocations, naver.used_gpu_seconds) == (0, 0)
    assert [t.key for t in merged.totals if t.scope == "cluster"] == ["kakao", "naver", "nhn"]


def test_the_merged_report_does_not_depend_on_the_order_clusters_are_read_in() -> None:
    forward = build_merged_report(per_cluster(), MONTH)
    backward = build_merged_report(dict(reversed(list(per_cluster().items()))), MONTH)
    assert forward == backward
    for renderer in (to_csv, to_json, to_xlsx):
        assert renderer(forward) == renderer(backward)
    assert to_html(forward) == to_html(backward)


def test_merged_rows_name_their_cluster_in_every_format() -> None:
    merged = build_merged_report(per_cluster(), MONTH)
    lines = list(csv.reader(io.StringIO(to_csv(merged).decode("utf-8-sig"))))
    assert lines[0][:2] == ["Cluster", "Month"]
    assert [csv_cell_text(line[0]) for line in lines[1:5]] == ["kakao", "kakao", "nhn", "nhn"]
    assert b'"clusters": [\n    "kakao",\n    "naver",\n    "nhn"\n  ]' in to_json(merged)
    assert '<td data-key="cluster">kakao</td>' in to_html(merged)


def test_a_single_clusters_report_has_no_cluster_column() -> None:
    single = build_report(per_cluster()["nhn"], MONTH)
    assert to_csv(single).decode("utf-8-sig").startswith("Month,")
    assert b'"cluster"' not in to_json(single)


def test_html_names_total_scopes_for_people() -> None:
    page = to_html(build_merged_report(per_cluster(), MONTH))
    assert '<td data-key="scope">GPU model</td>' in page
    assert '<td data-key="scope">Program</td>' in page
    assert "gpuModel</td>" not in page


@pytest.mark.parametrize("clusters", [{}, {"": []}])
def test_a_merged_report_needs_named_clusters(clusters: dict[str, list[GpuUsage]]) -> None:
    with pytest.raises(ValueError, match="cluster"):
        build_merged_report(clusters, MONTH)


# --- where `gpuaas report` reads ---------------------------------------------------------------------


def kubeconfig_file(path: Path, context: str) -> str:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": context, "cluster": {"server": "https://127.0.0.1:6443"}}],
                "users": [{"name": context, "user": {"token": "t"}}],
                "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
                "current-context": context,
            }
        )
    )
    return str(path)


def test_one_source_by_default_and_one_per_context() -> None:
    assert ledger_sources([], []) == [LedgerSource("", None)]
    assert ledger_sources(["a.yaml"], []) == [LedgerSource("", "a.yaml")]
    assert ledger_sources(["a.yaml"], ["nhn", "kakao"]) == [
        LedgerSource("nhn", "a.yaml", "nhn"),
        LedgerSource("kakao", "a.yaml", "kakao"),
    ]


def test_several_kubeconfigs_are_named_by_their_current_context(tmp_path: Path) -> None:
    files = [kubeconfig_file(tmp_path / f"{name}.yaml", name) for name in ("nhn-prod", "kakao-prod")]
    assert [source.name for source in ledger_sources(files, [])] == ["nhn-prod", "kakao-prod"]


def test_two_clusters_of_one_name_are_refused(tmp_path: Path) -> None:
    files = [kubeconfig_file(tmp_path / f"{index}.yaml", "default") for index in range(2)]
    with pytest.raises(typer.BadParameter, match="several clusters are named default"):
        ledger_sources(files, [])
    with pytest.raises(typer.BadParameter, match="several clusters are named nhn"):
        ledger_sources([], ["nhn", "nhn"])


def test_several_kubeconfigs_with_contexts_are_refused() -> None:
    with pytest.raises(typer.BadParameter, match="several --context with one --kubeconfig"):
        ledger_sources(["a.yaml", "b.yaml"], ["nhn"])
