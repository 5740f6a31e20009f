"""The e2e tier: the Helm chart installed with the real `helm` into a cluster, used the way a program office does.

By default the session creates its own local cluster (`gpuaas-e2e`, kwokctl with the pinned binaries and the
`small` scenario's fake GPU nodes) and deletes it at the end. With GPUAAS_E2E_KUBECONFIG set (`make e2e-kind`), it
uses that cluster instead, adds the same fake nodes, and leaves the cluster alone at the end.

The chart is installed in external-operator mode (helm/gpuaas/ci/external-operator-values.yaml: CRDs, RBAC and pools,
no Deployment), and the operator runs as a subprocess on this machine with `--webhook-url`, registering its own
webhook configurations. Everything the tests do goes through the `kubectl` and `helm` command-line tools.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import string
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from tests.integration.conftest import OperatorProcess
from tests.waiting import wait_for

from gpuaas.domain.scenarios import KWOK_NODE_ANNOTATION, SCENARIOS
from gpuaas.k8s import localcluster

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "gpuaas"
CI_VALUES = CHART / "ci"
EXTERNAL_VALUES = CI_VALUES / "external-operator-values.yaml"
MANIFESTS = Path(__file__).resolve().parent / "manifests"
CLUSTER_NAME = os.environ.get("GPUAAS_E2E_CLUSTER", "gpuaas-e2e")
RELEASE = "gpuaas"
RELEASE_NAMESPACE = "gpuaas-system"
REPORT_TIME_ZONE = ZoneInfo("Asia/Seoul")


def wait_for_steady(
    read: Callable[[], Any], expected: Any, hold: float = 3.0, timeout: float = 60.0, message: str = ""
) -> Any:
    """Poll until read() has equalled `expected` for `hold` seconds in a row (status settles over a few passes)."""
    deadline = time.monotonic() + timeout
    since: float | None = None
    value: Any = None
    while time.monotonic() < deadline:
        value = read()
        if value == expected:
            since = since or time.monotonic()
            if time.monotonic() - since >= hold:
                return value
        else:
            since = None
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message or expected!r}; last: {value!r}")


def parse_table(text: str) -> dict[str, list[dict[str, str]]]:
    """`kubectl get a,b` output as {kind: [row, ...]}, each row keyed by the header's column names.

    kubectl prints one table per kind, separated by a blank line; with several kinds, NAME is `kind.group/name`
    (the key is then `kind`, else `default`). Columns are sliced at the header's positions (kubectl pads them
    with at least three spaces), so empty cells and cells with spaces parse too.
    """
    tables: dict[str, list[dict[str, str]]] = {}
    for block in re.split(r"\n\s*\n", text.strip("\n")):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        columns = [(match.group(), match.start()) for match in re.finditer(r"\S+(?: \S+)*", lines[0])]
        for line in lines[1:]:
            row: dict[str, str] = {}
            for index, (title, start) in enumerate(columns):
                end = columns[index + 1][1] if index + 1 < len(columns) else None
                row[title] = line[start:end].strip()
            kind, _, name = row["NAME"].rpartition("/")
            row["NAME"] = name
            tables.setdefault(kind.split(".")[0] or "default", []).append(row)
    return tables


@dataclass
class E2ECluster:
    name: str
    kubeconfig: Path
    binaries: localcluster.Binaries
    external: bool
    work: Path
    background: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binaries.kubectl), "--kubeconfig", str(self.kubeconfig), *args],
            text=True,
            capture_output=True,
            input=stdin,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binaries.helm), "--kubeconfig", str(self.kubeconfig), *args],
            text=True,
            capture_output=True,
            check=False,
            cwd=REPO,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def get_json(self, *args: str) -> Any:
        return yaml.safe_load(self.kubectl("get", *args, "-o", "json").stdout)

    def get_table(self, *args: str) -> dict[str, list[dict[str, str]]]:
        return parse_table(self.kubectl("get", *args).stdout)


def _start_kwok(cluster: E2ECluster) -> None:
    """A KWOK controller outside the cluster, for the fake GPU nodes of a kind cluster (`make e2e-kind`)."""
    log = (cluster.work / "kwok.log").open("ab")
    process = subprocess.Popen(
        [
            str(cluster.binaries.kwok),
            "--kubeconfig", str(cluster.kubeconfig),
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
            "--node-lease-duration-seconds=40",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    cluster.background.append(process)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2ECluster]:
    binaries = localcluster.ensure_binaries()
    work = tmp_path_factory.mktemp("e2e")
    given = os.environ.get("GPUAAS_E2E_KUBECONFIG")
    kubeconfig = Path(given) if given else REPO / ".cluster" / f"{CLUSTER_NAME}.kubeconfig"
    if not given:
        localcluster.delete_cluster(binaries, CLUSTER_NAME, kubeconfig)
        localcluster.create_cluster(binaries, CLUSTER_NAME, kubeconfig)
    state = E2ECluster(CLUSTER_NAME, kubeconfig, binaries, external=bool(given), work=work)
    try:
        localcluster.wait_for_apiserver(kubeconfig)
        localcluster.create_nodes(kubeconfig, SCENARIOS["small"], lambda _: None)
        if given and os.environ.get("GPUAAS_E2E_KWOK", "1") == "1":
            _start_kwok(state)
        yield state
    finally:
        for process in state.background:
            process.terminate()
            process.wait(timeout=15)
        if not given and not os.environ.get("GPUAAS_KEEP_CLUSTER"):
            localcluster.delete_cluster(binaries, CLUSTER_NAME, kubeconfig)


@dataclass
class Release:
    """The installed chart: helm release `gpuaas` in `gpuaas-system`, with the values files it was installed with."""

    cluster: E2ECluster
    values: list[Path]
    installed: bool = True

    def upgrade(self, *values: Path) -> subprocess.CompletedProcess[str]:
        files = [*self.values, *values]
        args = [arg for path in files for arg in ("-f", str(path))]
        return self.cluster.helm("upgrade", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE, *args, "--wait")

    def uninstall(self) -> subprocess.CompletedProcess[str]:
        result = self.cluster.helm("uninstall", RELEASE, "-n", RELEASE_NAMESPACE, "--wait")
        self.installed = False
        return result


@pytest.fixture(scope="session")
def release(cluster: E2ECluster) -> Iterator[Release]:
    """`helm install` in external-operator mode; CRDs, RBAC and the small scenario's pools come from the chart."""
    cluster.helm(
        "install", RELEASE, str(CHART),
        "-n", RELEASE_NAMESPACE, "--create-namespace",
        "-f", str(EXTERNAL_VALUES),
        "--set", "metrics.enabled=true",
        "--wait", "--timeout", "3m",
    )  # fmt: skip
    state = Release(cluster, [EXTERNAL_VALUES])
    yield state
    if state.installed:
        cluster.helm("uninstall", RELEASE, "-n", RELEASE_NAMESPACE, check=False)


class E2EOperator(OperatorProcess):
    """The integration tier's operator subprocess, with the webhook host configurable for kind (the API server
    then runs in a container and reaches this machine through the Docker network's gateway)."""

    def __init__(self, kubeconfig: Path, log_path: Path, webhook_host: str) -> None:
        super().__init__(kubeconfig, log_path, webhook_host=webhook_host)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text: str = response.read().decode()
            return text


@pytest.fixture(scope="session")
def operator(cluster: E2ECluster, release: Release) -> Iterator[E2EOperator]:
    """`gpuaas run` on this machine, after the chart has installed the CRDs."""
    process = E2EOperator(
        cluster.kubeconfig,
        cluster.work / "operator" / "operator.log",
        os.environ.get("GPUAAS_E2E_WEBHOOK_HOST", "127.0.0.1"),
    )
    process.log_path.parent.mkdir(parents=True, exist_ok=True)
    process.start()
    # The operator registers its webhook configurations at startup; pods are fenced from then on.
    wait_for(
        lambda: cluster.kubectl("get", "mutatingwebhookconfiguration", "gpuaas", check=False).returncode == 0,
        message="the operator's webhook configurations",
    )
    yield process
    process.stop()


def render_manifest(name: str, **values: str) -> str:
    """A manifest of e2e/manifests/ with its ${VARIABLES} filled in, as `envsubst` would."""
    return string.Template((MANIFESTS / name).read_text()).substitute(values)


def seoul_month(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.UTC)).astimezone(REPORT_TIME_ZONE).strftime("%Y-%m")
