"""Apply manifests with server-side apply, the way kubectl does."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, dynamic

from gpuaas.k8s.client import FIELD_MANAGER


def load_manifests(paths: Iterable[Path]) -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted(paths):
        with path.open(encoding="utf-8") as handle:
            documents.extend(doc for doc in yaml.safe_load_all(handle) if doc)
    return documents


def server_side_apply(
    api_client: client.ApiClient, manifest: Mapping[str, Any], field_manager: str = FIELD_MANAGER
) -> Any:
    """Server-side apply one object; conflicts are forced because gpuaas owns what it applies."""
    resources = dynamic.DynamicClient(api_client).resources
    resource = resources.get(api_version=manifest["apiVersion"], kind=manifest["kind"])
    metadata = manifest["metadata"]
    return resource.server_side_apply(
        body=json.loads(json.dumps(manifest)),
        name=metadata["name"],
        namespace=metadata.get("namespace"),
        field_manager=field_manager,
        force_conflicts=True,
    )
