"""The chart's CRDs are a byte copy of crds/ (the source of truth): Helm can only read files inside the chart.

When this fails, run tools/sync-chart-crds.sh and commit helm/gpuaas/files/crds/ with the CRD change.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "crds"
CHART_COPY = ROOT / "helm" / "gpuaas" / "files" / "crds"
FIX = "run tools/sync-chart-crds.sh and commit helm/gpuaas/files/crds/"


def crd_names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.glob("*.yaml"))


def test_source_crds_exist() -> None:
    assert crd_names(SOURCE), "crds/ holds no CRDs"


def test_chart_holds_exactly_the_source_crds() -> None:
    source, copy = crd_names(SOURCE), crd_names(CHART_COPY)
    missing = sorted(set(source) - set(copy))
    extra = sorted(set(copy) - set(source))
    assert not missing, f"CRDs missing from the chart: {missing}; {FIX}"
    assert not extra, f"CRDs in the chart that crds/ no longer has: {extra}; {FIX}"


def test_chart_holds_no_samples() -> None:
    assert not (CHART_COPY / "samples").exists(), f"samples are not CRDs; {FIX}"


@pytest.mark.parametrize("name", crd_names(SOURCE))
def test_chart_crd_is_a_byte_copy(name: str) -> None:
    copy = CHART_COPY / name
    assert copy.exists(), f"{name} is missing from the chart; {FIX}"
    assert copy.read_bytes() == (SOURCE / name).read_bytes(), f"{name} in the chart differs from crds/{name}; {FIX}"
