from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from gpuaas.api.allocation import (
    DEFAULT_CPU_PER_GPU,
    DEFAULT_MEMORY_PER_GPU,
    GpuAllocation,
    GpuAllocationSpec,
    GpuAllocationStatus,
    parse_duration,
)

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "gpuallocations.gpuaas.io.yaml"
SAMPLES = sorted((ROOT / "crds" / "samples").glob("gpuallocation-*.yaml"))


def minimal_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "tenant": {"name": "kaist-vision", "organization": "KAIST"},
        "pool": "naver-h200-a",
        "gpus": 64,
        "window": {"start": "2026-01-01T00:00:00+09:00", "end": "2026-11-30T00:00:00+09:00"},
    }
    spec.update(overrides)
    return spec


def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_PATH.read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_defaults_match_the_crd_defaults() -> None:
    spec = GpuAllocationSpec.model_validate(minimal_spec())
    assert spec.namespace is None
    assert spec.target_namespace == "kaist-vision"
    assert spec.exclusive_nodes is False
    assert spec.priority == 0
    assert spec.suspend is False
    assert spec.deletion_policy == "Retain"
    assert spec.grace_period_seconds == 300
    assert spec.idle.action == "Report"
    assert spec.idle.after_duration == timedelta(hours=72)

    props = crd_schema()["properties"]["spec"]["properties"]
    assert props["resourcesPerGPU"]["properties"]["cpu"]["default"] == spec.resources_per_gpu.cpu == DEFAULT_CPU_PER_GPU
    assert props["resourcesPerGPU"]["properties"]["memory"]["default"] == DEFAULT_MEMORY_PER_GPU
    assert props["gracePeriodSeconds"]["default"] == spec.grace_period_seconds
    assert props["deletionPolicy"]["default"] == spec.deletion_policy
    assert props["idle"]["properties"]["after"]["default"] == spec.idle.after


def test_wire_form_uses_camel_case_and_gpu_aliases() -> None:
    spec = GpuAllocationSpec.model_validate(minimal_spec(resourcesPerGPU={"cpu": 16, "memory": "128Gi"}))
    assert spec.resources_per_gpu.cpu == "16"
    wire = spec.to_wire()
    assert wire["resourcesPerGPU"] == {"cpu": "16", "memory": "128Gi"}
    assert "exclusiveNodes" in wire
    assert "gracePeriodSeconds" in wire
    status = GpuAllocationStatus(phase="Queued", granted_gpus=0, in_use_gpus=3, queue_position=2)
    assert status.to_wire()["inUseGPUs"] == 3
    assert status.to_wire()["queuePosition"] == 2
    assert GpuAllocationStatus.model_validate({"grantedGPUs": 8, "phase": "Active"}).admitted


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"gpus": 0}, "gpus"),
        ({"gpus": 100_001}, "gpus"),
        ({"gpus": 1.5}, "gpus"),
        ({"exclusiveNodes": True, "gpus": 12}, "multiple of 8"),
        ({"window": {"start": "2026-02-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"}}, "after window.start"),
        ({"window": {"start": "2026-01-01T00:00:00", "end": "2026-02-01T00:00:00"}}, "time zone"),
        ({"namespace": "kube-system"}, "reserved"),
        ({"namespace": "kube-anything"}, "reserved"),
        ({"namespace": "Bad_Name"}, "namespace"),
        ({"tenant": {"name": "default", "organization": "x"}}, "reserved"),
        ({"tenant": {"name": "x" * 64, "organization": "x"}}, "tenant"),
        ({"owners": [{"kind": "Robot", "name": "r2"}]}, "owners"),
        ({"idle": {"after": "3d"}}, "idle"),
        ({"deletionPolicy": "Orphan"}, "deletionPolicy"),
        ({"resourcesPerGPU": {"cpu": "lots"}}, "cpu"),
    ],
)
def test_invalid_specs_are_rejected(overrides: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        GpuAllocationSpec.model_validate(minimal_spec(**overrides))


def test_exclusive_whole_nodes_are_accepted() -> None:
    spec = GpuAllocationSpec.model_validate(minimal_spec(exclusiveNodes=True, gpus=1024))
    assert spec.gpus == 1024


def test_parse_duration() -> None:
    assert parse_duration("1h30m15s") == timedelta(hours=1, minutes=30, seconds=15)
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration("2 days")


def test_window_contains_is_half_open() -> None:
    spec = GpuAllocationSpec.model_validate(minimal_spec())
    start, end = spec.window.start, spec.window.end
    assert spec.window.contains(start)
    assert not spec.window.contains(end)
    assert not spec.window.contains(start - timedelta(seconds=1))
    assert spec.window.contains(datetime(2026, 6, 1, tzinfo=UTC))


def test_samples_exist_and_validate_with_the_model() -> None:
    assert len(SAMPLES) >= 3
    pools = {"nhn-b200-a", "nhn-b200-b", "kakao-b200-a", "naver-h200-a", "naver-h200-b"}
    for path in SAMPLES:
        document = yaml.safe_load(path.read_text())
        allocation = GpuAllocation.model_validate(document)
        assert allocation.kind == "GpuAllocation"
        assert allocation.api_version == "gpuaas.io/v1alpha1"
        assert allocation.spec.pool in pools, path.name
        name = document["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)
        assert len(name) <= 63


def _check(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    """A small structural validator for the keywords the CRD uses (not CEL)."""
    errors: list[str] = []
    if schema.get("x-kubernetes-int-or-string"):
        if not isinstance(value, int | str):
            errors.append(f"{path}: not int-or-string")
    else:
        expected = {"object": dict, "array": list, "string": str, "integer": int, "boolean": bool}[schema["type"]]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            return [f"{path}: expected {schema['type']}, got {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
        if len(value) > schema.get("maxLength", 10**9) or len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: length out of range")
        if schema.get("format") == "date-time":
            datetime.fromisoformat(value)
    is_integer = isinstance(value, int) and not isinstance(value, bool) and schema.get("type") == "integer"
    if is_integer and not schema.get("minimum", -(10**18)) <= value <= schema.get("maximum", 10**18):
        errors.append(f"{path}: {value} out of range")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"{path}.{key}: required" for key in schema.get("required", []) if key not in value]
        for key, item in value.items():
            if key in properties:
                errors += _check(properties[key], item, f"{path}.{key}")
            elif "additionalProperties" in schema:
                errors += _check(schema["additionalProperties"], item, f"{path}.{key}")
            elif path != "" or key not in ("apiVersion", "kind"):
                errors.append(f"{path}.{key}: unknown field (would be pruned)")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", 10**9):
            errors.append(f"{path}: too many items")
        errors += [_e for i, item in enumerate(value) for _e in _check(schema["items"], item, f"{path}[{i}]")]
    return errors


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_samples_match_the_crd_schema(path: Path) -> None:
    document = yaml.safe_load(path.read_text())
    metadata = {"name": document["metadata"]["name"]}
    assert _check(crd_schema(), {**document, "metadata": metadata}, "") == []


def test_schema_checker_catches_nonsense() -> None:
    document = yaml.safe_load(SAMPLES[0].read_text())
    document["spec"]["gpus"] = "many"
    document["spec"]["idle"]["action"] = "Panic"
    document["spec"]["typo"] = 1
    errors = _check(crd_schema(), {**document, "metadata": {}}, "")
    assert any(".spec.gpus" in e for e in errors)
    assert any("Panic" in e for e in errors)
    assert any("typo" in e for e in errors)


def test_every_crd_field_has_a_description() -> None:
    missing: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        # The apiserver restricts the metadata schema; it documents itself.
        if "description" not in node and path != ".metadata":
            missing.append(path or "<root>")
        for key, child in node.get("properties", {}).items():
            walk(child, f"{path}.{key}")
        if "items" in node:
            walk(node["items"], f"{path}[]")

    walk(crd_schema(), "")
    assert missing == []


def test_crd_shape() -> None:
    crd = yaml.safe_load(CRD_PATH.read_text())
    assert crd["spec"]["scope"] == "Cluster"
    assert crd["spec"]["group"] == "gpuaas.io"
    names = crd["spec"]["names"]
    assert names["kind"] == "GpuAllocation"
    assert names["plural"] == "gpuallocations"
    assert {"ga", "galloc"} <= set(names["shortNames"])
    assert names["categories"] == ["gpuaas"]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Tenant", "Pool", "GPUs", "In-Use", "Phase", "Queue", "Window-End", "Age"]

    schema = version["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    gpus = spec["properties"]["gpus"]
    assert (gpus["type"], gpus["minimum"], gpus["maximum"]) == ("integer", 1, 100000)
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert any("self.gpus % 8 == 0" in r for r in rules)
    assert any("oldSelf" in r for r in rules)
    namespace_rules = [r["rule"] for r in spec["properties"]["namespace"]["x-kubernetes-validations"]]
    assert "self == oldSelf" in namespace_rules
    assert any("startsWith('kube-')" in r for r in namespace_rules)
    assert spec["properties"]["window"]["x-kubernetes-validations"][0]["rule"] == "self.end > self.start"
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    phases = schema["properties"]["status"]["properties"]["phase"]["enum"]
    assert set(phases) == {
        "Pending",
        "Queued",
        "Scheduled",
        "Active",
        "Suspended",
        "Expired",
        "Rejected",
        "Terminating",
    }


def test_strings_under_cel_rules_are_bounded() -> None:
    """The apiserver estimates CEL cost from maxLength/maxItems; unbounded inputs get rules refused."""
    spec = crd_schema()["properties"]["spec"]
    assert spec["properties"]["namespace"]["maxLength"] == 63
    assert spec["properties"]["tenant"]["properties"]["name"]["maxLength"] == 63
    assert spec["properties"]["pool"]["maxLength"] == 63
    assert spec["properties"]["owners"]["maxItems"] <= 64


def test_status_round_trip() -> None:
    status = GpuAllocationStatus.model_validate(
        {
            "phase": "Active",
            "namespace": "kaist-vision",
            "grantedGPUs": 64,
            "inUseGPUs": 40,
            "nodes": ["n1"],
            "conditions": [
                {"type": "Admitted", "status": "True", "reason": "Fits", "lastTransitionTime": "2026-01-01T00:00:00Z"}
            ],
            "observedGeneration": 3,
            "message": "64 GPUs granted",
        }
    )
    assert GpuAllocationStatus.model_validate(status.to_wire()) == status
    assert status.to_wire()["grantedGPUs"] == 64
