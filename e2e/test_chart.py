"""The chart's rendered objects, `helm template` of every ci/*-values.yaml, validated by the API server (the checks
that need no cluster, `helm lint` and the values schema, are in tests/unit/test_chart.py).

Validation is a server-side dry run (`kubectl apply --dry-run=server`): the real API server runs its schema
validation, defaulting and admission on every rendered object without persisting it. It runs after the e2e
release is installed, so the gpuaas CRDs and the release namespace exist. Objects of kinds the cluster does not
serve (ServiceMonitor and PrometheusRule without the Prometheus Operator, cert-manager's Certificate and Issuer)
are skipped, each with the reason logged.
"""

from __future__ import annotations

import json
import logging
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from e2e.conftest import CHART, CI_VALUES, RELEASE, RELEASE_NAMESPACE, E2ECluster, Release

pytestmark = pytest.mark.e2e
log = logging.getLogger(__name__)

CI_FILES = sorted(CI_VALUES.glob("*-values.yaml"))


def _served_kinds(cluster: E2ECluster, api_version: str) -> set[str]:
    return _discovery(cluster.kubeconfig, str(cluster.binaries.kubectl), api_version)


@cache
def _discovery(kubeconfig: Path, kubectl: str, api_version: str) -> set[str]:
    path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    result = subprocess.run(
        [kubectl, "--kubeconfig", str(kubeconfig), "get", "--raw", path], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        return set()
    return {resource["kind"] for resource in json.loads(result.stdout)["resources"] if "/" not in resource["name"]}


@pytest.mark.parametrize("values", CI_FILES, ids=[path.stem for path in CI_FILES])
def test_rendered_objects_pass_server_side_dry_run(cluster: E2ECluster, release: Release, values: Path) -> None:
    rendered = cluster.helm(
        "template", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE, "-f", str(values), "--include-crds"
    ).stdout
    documents = [doc for doc in yaml.safe_load_all(rendered) if doc]
    assert documents, f"{values.name} renders nothing"
    kept: list[dict[str, object]] = []
    skipped: list[str] = []
    for doc in documents:
        api_version, kind = str(doc["apiVersion"]), str(doc["kind"])
        if kind not in _served_kinds(cluster, api_version):
            reason = f"{api_version} {kind} {doc['metadata']['name']}: kind not served by this cluster (CRD absent)"
            skipped.append(reason)
            log.warning("skipped %s", reason)
            continue
        kept.append(doc)
    # Only optional integrations may be skipped; everything gpuaas needs must validate.
    allowed = ("monitoring.coreos.com/", "cert-manager.io/")
    assert all(reason.startswith(allowed) for reason in skipped), skipped
    stream = "\n---\n".join(yaml.safe_dump(doc, sort_keys=False) for doc in kept)
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", stdin=stream, check=False)
    assert result.returncode == 0, f"{values.name}: server-side dry run failed:\n{result.stderr}"
    validated = [line for line in result.stdout.splitlines() if line.endswith("(server dry run)")]
    assert len(validated) == len(kept), result.stdout
    print(f"{values.name}: {len(kept)} objects validated, {len(skipped)} skipped: {skipped}")
