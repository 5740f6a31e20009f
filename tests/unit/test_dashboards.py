"""The shipped dashboards are Grafana JSON that works with any Prometheus data source and the program's variables."""

from __future__ import annotations

import re

from tests.dashboards import dashboards, panel_queries, panels, template_variables

_SELECTOR = re.compile(r"\b(gpuaas_[a-z_]+)(\{[^}]*\})?")


def test_dashboards_are_grafana_json() -> None:
    for file_name, board in dashboards().items():
        assert board["uid"].startswith("gpuaas-"), file_name
        assert 36 <= board["schemaVersion"] <= 41, file_name
        variables = template_variables(board)
        assert variables["datasource"]["type"] == "datasource", file_name
        assert variables["datasource"]["query"] == "prometheus", file_name
        assert {"cluster", "provider", "pool"} <= set(variables), file_name
        for name in ("cluster", "provider", "pool", "tenant"):
            if name in variables:
                assert variables[name]["includeAll"] is True, (file_name, name)
                assert variables[name]["allValue"] == ".*", (file_name, name)
        ids = [panel["id"] for panel in panels(board["panels"])]
        assert len(ids) == len(set(ids)), file_name
        for panel in panels(board["panels"]):
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
                assert panel["targets"], panel["title"]
    assert "tenant" in template_variables(dashboards()["tenant.json"])


def test_every_series_is_selected_by_cluster_and_pools_stay_apart_per_cluster() -> None:
    """One Prometheus or Thanos over three providers' clusters: a pool name may repeat across clusters."""
    for file_name, board in dashboards().items():
        queries = panel_queries(board) + [
            (name, variable["definition"])
            for name, variable in template_variables(board).items()
            if variable["type"] == "query" and name != "cluster"
        ]
        for where, expr in queries:
            for metric, selector in _SELECTOR.findall(expr):
                assert selector.startswith('{cluster=~"$cluster"'), (file_name, where, metric)
            for grouping in re.findall(r"by \(([^)]*)\)", expr):
                labels = {label.strip() for label in grouping.split(",")}
                if labels & {"pool", "allocation"}:
                    assert "cluster" in labels, (file_name, where, grouping)
