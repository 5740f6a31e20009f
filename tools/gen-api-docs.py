#!/usr/bin/env python3
"""Generate docs/api-reference.md from the CRD schemas in crds/*.yaml (the source of truth).

Usage:
    python tools/gen-api-docs.py            # (re)write docs/api-reference.md
    python tools/gen-api-docs.py --check    # exit 1 if docs/api-reference.md is stale

Every field is listed with its type, whether it is required, its default, its validation (enum, bounds,
pattern, list semantics) and its CEL rules (x-kubernetes-validations), followed by its description.
e2e/test_docs.py regenerates the page in memory and fails when the committed file differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO / "crds"
OUTPUT = REPO / "docs" / "api-reference.md"
# The order a reader needs them: pools first, then the grants made on them, then the ledger they produce.
KIND_ORDER = ("GpuPool", "GpuAllocation", "GpuUsage")


@dataclass(frozen=True)
class Field:
    path: str
    type: str
    required: bool
    default: str
    validation: list[str]
    rules: list[str]
    description: str


def _cell(text: str) -> str:
    """Prose for a table cell: one line, pipes escaped, and <name> shown rather than taken for an HTML tag."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _code(text: str) -> str:
    text = " ".join(str(text).split())
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}".replace("|", "\\|")


def _type(schema: dict[str, Any]) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return "int-or-string"
    kind = schema.get("type", "")
    if kind == "array":
        return f"[]{_type(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"map[string]{_type(schema['additionalProperties'])}"
    if kind == "string" and schema.get("format"):
        return f"string ({schema['format']})"
    return str(kind or "any")


def _validation(schema: dict[str, Any]) -> list[str]:
    notes: list[str] = []
    if "enum" in schema:
        notes.append("one of " + ", ".join(_code(value) for value in schema["enum"]))
    for key, label in (
        ("minimum", "min"),
        ("maximum", "max"),
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("minItems", "min items"),
        ("maxItems", "max items"),
        ("minProperties", "min properties"),
        ("maxProperties", "max properties"),
    ):
        if key in schema:
            notes.append(f"{label} {schema[key]}")
    if "pattern" in schema:
        notes.append(f"pattern {_code(schema['pattern'])}")
    list_type = schema.get("x-kubernetes-list-type")
    if list_type == "map":
        keys = ", ".join(schema.get("x-kubernetes-list-map-keys", []))
        notes.append(f"list type map, keyed by {keys}")
    elif list_type:
        notes.append(f"list type {list_type}")
    return notes


def _rules(schema: dict[str, Any]) -> list[str]:
    out = []
    for rule in schema.get("x-kubernetes-validations", []):
        text = f"{_code(rule['rule'])}"
        if rule.get("message"):
            text += f": {_cell(rule['message'])}"
        out.append(text)
    return out


def walk(schema: dict[str, Any], path: str = "", required: bool = False) -> Iterator[Field]:
    """Every field under `schema`, depth first, in schema order."""
    if path:
        default = json.dumps(schema["default"], ensure_ascii=False) if "default" in schema else ""
        yield Field(
            path=path,
            type=_type(schema),
            required=required,
            default=default,
            validation=_validation(schema),
            rules=_rules(schema),
            description=_cell(schema.get("description", "")),
        )
    required_names = set(schema.get("required", []))
    for name, child in (schema.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}" if path else name, name in required_names)
    items = schema.get("items")
    if isinstance(items, dict) and (items.get("properties") or items.get("x-kubernetes-validations")):
        yield from walk_children(items, f"{path}[]")
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict) and extra.get("properties"):
        yield from walk_children(extra, f"{path}.<key>")


def walk_children(schema: dict[str, Any], path: str) -> Iterator[Field]:
    """The element of an array or map: its own rules (if any), then its properties."""
    if schema.get("x-kubernetes-validations"):
        description = _cell(schema.get("description", ""))
        yield Field(path, _type(schema), False, "", _validation(schema), _rules(schema), description)
    required_names = set(schema.get("required", []))
    for name, child in (schema.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}", name in required_names)


def _field_table(fields: list[Field]) -> list[str]:
    lines = [
        "| Field | Type | Required | Default | Validation | Description |",
        "|---|---|---|---|---|---|",
    ]
    for field in fields:
        checks = [*field.validation, *(f"CEL {rule}" for rule in field.rules)]
        lines.append(
            f"| `{field.path}` | {field.type} | {'yes' if field.required else ''} | "
            f"{_code(field.default) if field.default else ''} | {'<br>'.join(checks)} | {field.description} |"
        )
    return lines


def _name_list(label: str, values: list[str]) -> str:
    return f", {label} {', '.join(f'`{value}`' for value in values)}" if values else ""


def render_crd(crd: dict[str, Any]) -> list[str]:
    spec = crd["spec"]
    names = spec["names"]
    lines: list[str] = []
    for version in spec["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        lines += [
            f"## {names['kind']}",
            "",
            f"`{spec['group']}/{version['name']}`, {spec['scope'].lower()}-scoped"
            + (", status subresource" if "status" in version.get("subresources", {}) else "")
            + f". Plural `{names['plural']}`"
            + _name_list("short names", names.get("shortNames", []))
            + _name_list("categories", names.get("categories", []))
            + f". Defined in `crds/{crd['metadata']['name']}.yaml`.",
            "",
            _cell(schema.get("description", "")),
            "",
        ]
        if schema.get("x-kubernetes-validations"):
            lines += ["Object rules (CEL):", ""]
            lines += [f"- {rule}" for rule in _rules(schema)]
            lines.append("")
        columns = version.get("additionalPrinterColumns", [])
        if columns:
            lines += [
                f"### `kubectl get {names['plural']}` columns",
                "",
                "| Column | Type | JSONPath | Shown | Description |",
                "|---|---|---|---|---|",
            ]
            for column in columns:
                shown = "with `-o wide`" if column.get("priority", 0) > 0 else "always"
                lines.append(
                    f"| {column['name']} | {column['type']} | `{column['jsonPath']}` | {shown} | "
                    f"{_cell(column.get('description', ''))} |"
                )
            lines.append("")
        properties = schema.get("properties", {})
        for section in ("spec", "ledger", "status"):
            if section not in properties:
                continue
            fields = list(walk(properties[section], section, section in schema.get("required", [])))
            lines += [f"### {section}", "", *_field_table(fields), ""]
        metadata = [f for f in walk(properties.get("metadata", {}), "metadata") if f.path != "metadata"]
        if metadata:
            lines += ["### metadata", "", *_field_table(metadata), ""]
    return lines


def load_crds(directory: Path = CRDS) -> list[dict[str, Any]]:
    crds = [yaml.safe_load(path.read_text()) for path in sorted(directory.glob("*.yaml"))]
    crds = [crd for crd in crds if crd and crd.get("kind") == "CustomResourceDefinition"]

    def order(crd: dict[str, Any]) -> tuple[int, str]:
        kind = crd["spec"]["names"]["kind"]
        return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), kind)

    return sorted(crds, key=order)


def render(directory: Path = CRDS) -> str:
    crds = load_crds(directory)
    lines = [
        "# API reference",
        "",
        "<!-- Generated by tools/gen-api-docs.py from crds/*.yaml; do not edit. Run: python tools/gen-api-docs.py -->",
        "",
        "All gpuaas kinds are cluster-scoped, in API group `gpuaas.io`, version `v1alpha1`. Field paths are relative",
        "to the object; `[]` marks the elements of a list and `<key>` the values of a map. Required means required",
        "within its parent object. Defaults are applied by the API server. CEL rules are",
        "[x-kubernetes-validations](https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#validation-rules),",
        "enforced by the API server on create and update (rules that use `oldSelf` apply to updates only).",
        "",
        "Kinds: " + ", ".join(f"[{kind}](#{kind.lower()})" for kind in (crd["spec"]["names"]["kind"] for crd in crds)),
        "",
    ]
    for crd in crds:
        lines += render_crd(crd)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the output file is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run python tools/gen-api-docs.py", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
