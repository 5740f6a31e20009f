"""docs/api-reference.md is generated from crds/*.yaml by tools/gen-api-docs.py; it must not go stale."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_api_docs", REPO / "tools" / "gen-api-docs.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_current() -> None:
    expected = _generator().render()
    current = (REPO / "docs" / "api-reference.md").read_text()
    assert current == expected, "docs/api-reference.md is stale: run `python tools/gen-api-docs.py`"


def test_api_reference_covers_every_field() -> None:
    text = (REPO / "docs" / "api-reference.md").read_text()
    for needle in (
        "## GpuPool",
        "## GpuAllocation",
        "## GpuUsage",
        "`spec.idle.action`",
        "`spec.owners[].kind`",
        "`ledger.pods.<key>.bookedUntil`",
        "`status.conditions[].type`",
        "CEL `self.end > self.start`",
    ):
        assert needle in text, needle
