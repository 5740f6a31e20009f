"""The shipped Grafana dashboards, read as Grafana reads them: for the static checks (unit tier) and the queries run
against a real Prometheus (integration tier)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DASHBOARDS = Path(__file__).resolve().parents[1] / "helm" / "gpuaas" / "dashboards"


def dashboards() -> dict[str, dict[str, Any]]:
    found = {path.name: json.loads(path.read_text(encoding="utf-8")) for path in sorted(DASHBOARDS.glob("*.json"))}
    assert set(found) >= {"program-overview.json", "tenant.json", "operations.json"}, sorted(found)
    return found


def panels(panel_list: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panel_list:
        yield panel
        yield from panels(panel.get("panels") or [])  # collapsed rows hold their panels


def panel_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title / refId, expr) of every Prometheus target of the dashboard."""
    return [
        (f"{panel.get('title', '?')} / {target.get('refId', '?')}", target["expr"])
        for panel in panels(board.get("panels") or [])
        for target in panel.get("targets") or []
        if "expr" in target
    ]


def template_variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in board["templating"]["list"]}
