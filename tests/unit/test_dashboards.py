"""The shipped dashboards are Grafana JSON that works with any Prometheus data source and the program's variables."""

from __future__ import annotations

from tests.dashboards import dashboards, panels, template_variables


def test_dashboards_are_grafana_json() -> None:
    for file_name, board in dashboards().items():
        assert board["uid"].startswith("gpuaas-"), file_name
        assert 36 <= board["schemaVersion"] <= 41, file_name
        variables = template_variables(board)
        assert variables["datasource"]["type"] == "datasource", file_name
        assert variables["datasource"]["query"] == "prometheus", file_name
        assert {"provider", "pool"} <= set(variables), file_name
        for name in ("provider", "pool", "tenant"):
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
