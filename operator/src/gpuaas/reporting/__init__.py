"""Renderers of the monthly usage report: CSV, JSON, XLSX and self-contained HTML."""

from gpuaas.reporting.formats import FORMATS, render, to_csv, to_html, to_json, to_xlsx

__all__ = ["FORMATS", "render", "to_csv", "to_html", "to_json", "to_xlsx"]
