"""The local control plane: pinned Kubernetes binaries run by kwokctl as processes, with fake GPU nodes.

Binaries are built by tools/build.sh (cached by version outside the repo). Nothing is downloaded here:
every binary path handed to kwokctl is a local file.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpuaas.domain.scenarios import KWOK_NODE_ANNOTATION, REAL_NODE_POOL, Scenario, node_manifest
from gpuaas.k8s import localimages
from gpuaas.k8s.client import new_api_client
from gpuaas.k8s.realnode import (
    NodeBinaries,
    RealNodeSpec,
    RealNodeState,
    kwokctl_config,
    real_node_labels,
    start_real_node,
    stop_real_node,
)


def repo_root() -> Path:
    """The checkout that holds tools/: $GPUAAS_REPO, else the nearest parent of this file or the cwd."""
    explicit = os.environ.get("GPUAAS_REPO")
    candidates = [Path(explicit)] if explicit else [Path(__file__).resolve(), Path.cwd().resolve()]
    for start in candidates:
        for directory in [start, *start.parents]:
            if (directory / "tools" / "build.sh").is_file():
                return directory
    raise RuntimeError("cannot find the gpuaas checkout (tools/build.sh); set GPUAAS_REPO")


@dataclass(frozen=True)
class Binaries:
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    etcd: Path
    kwok: Path
    kwokctl: Path
    helm: Path


def _build(*components: str) -> dict[str, Path]:
    """Build (or find in the cache) pinned components with tools/build.sh; their cache directories by name. The
    build prints progress on stderr."""
    script = repo_root() / "tools" / "build.sh"
    result = subprocess.run(["bash", str(script), *components], check=True, stdout=subprocess.PIPE, text=True)
    return {path.parent.name: path for path in (Path(line) for line in result.stdout.split())}


def ensure_binaries(components: tuple[str, ...] = ("kubernetes", "etcd", "kwok", "helm")) -> Binaries:
    """The control plane's pinned binaries, kubectl and helm."""
    by_name = _build(*components)
    kube, etcd, kwok, helm = by_name["kubernetes"], by_name["etcd"], by_name["kwok"], by_name["helm"]
    return Binaries(
        kube_apiserver=kube / "kube-apiserver",
        kube_controller_manager=kube / "kube-controller-manager",
        kube_scheduler=kube / "kube-scheduler",
        kubectl=kube / "kubectl",
        etcd=etcd / "etcd",
        kwok=kwok / "kwok",
        kwokctl=kwok / "kwokctl",
        helm=helm / "helm",
    )


def ensure_helm() -> Path:
    """The pinned helm alone (the chart's static checks need no cluster)."""
    return _build("helm")["helm"] / "helm"


def ensure_node_binaries(binaries: Binaries) -> NodeBinaries:
    """containerd and gpuaas's node tools (built and cached like the rest); kubelet and kube-proxy sit beside
    kube-apiserver."""
    by_name = _build("containerd", "nodetools")
    containerd_dir, nodetools = by_name["containerd"], by_name["nodetools"]
    kube = binaries.kubectl.parent
    return NodeBinaries(
        containerd_dir=containerd_dir,
        kubelet=kube / "kubelet",
        kube_proxy=kube / "kube-proxy",
        device_plugin=nodetools / "fake-device-plugin",
        pause=nodetools / "pause",
    )


def node_work_dir(name: str) -> Path:
    """Configs, certs, logs and the host snapshot of the cluster's real node."""
    return repo_root() / ".cluster" / f"{name}-node"


def default_kubeconfig(name: str) -> Path:
    return repo_root() / ".cluster" / f"{name}.kubeconfig"


def kwokctl(binaries: Binaries, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KWOK_RUNTIME": "binary"}
    return subprocess.run(
        [str(binaries.kwokctl), *args],
        check=check,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def cluster_exists(binaries: Binaries, name: str) -> bool:
    clusters = kwokctl(binaries, "get", "clusters").stdout.split()
    return name in clusters


def create_cluster(binaries: Binaries, name: str, kubeconfig: Path, apiserver_port: int | None = None) -> None:
    kubeconfig.parent.mkdir(parents=True, exist_ok=True)
    # Every cluster can take a real node later: the settings real kubelets and in-cluster clients need.
    config = kubeconfig.parent / f"{name}.kwokctl.yaml"
    config.write_text(yaml.safe_dump(kwokctl_config(name), sort_keys=False))
    args = [
        "create", "cluster", "--name", name, "--runtime", "binary", "--config", str(config),
        "--kubeconfig", str(kubeconfig),
        "--kube-apiserver-binary", str(binaries.kube_apiserver),
        "--kube-controller-manager-binary", str(binaries.kube_controller_manager),
        "--kube-scheduler-binary", str(binaries.kube_scheduler),
        "--kwok-controller-binary", str(binaries.kwok),
        "--etcd-binary", str(binaries.etcd),
        "--disable-qps-limits",
        # Only nodes annotated as fake are KWOK's; tests drive other nodes' status by hand.
        "--extra-args", "kwok-controller=manage-all-nodes=false",
        "--extra-args", f"kwok-controller=manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
        # One instance each: without leader election they ride out an API server outage instead of
        # exiting on a lost lease (kwokctl does not restart exited components).
        "--extra-args", "kube-controller-manager=leader-elect=false",
        "--extra-args", "kube-scheduler=leader-elect=false",
        "--wait", "120s",
    ]  # fmt: skip
    if apiserver_port:
        args += ["--kube-apiserver-port", str(apiserver_port)]
    result = kwokctl(binaries, *args, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"kwokctl create cluster failed:\n{result.stdout}")


def merged_kubeconfig(named: Mapping[str, Path]) -> dict[str, Any]:
    """One kubeconfig holding several local clusters, each as a context named as given (the first is current), as
    the program office keeps one per provider for the merged report."""
    merged: dict[str, Any] = {"apiVersion": "v1", "kind": "Config", "clusters": [], "users": [], "contexts": []}
    for name, path in named.items():
        config = yaml.safe_load(path.read_text())
        (context,) = config["contexts"]
        merged["clusters"].extend(config["clusters"])
        merged["users"].extend(config["users"])
        merged["contexts"].append({"name": name, "context": context["context"]})
    merged["current-context"] = next(iter(named), "")
    return merged


def delete_cluster(binaries: Binaries, name: str, kubeconfig: Path) -> None:
    kwokctl(binaries, "delete", "cluster", "--name", name, "--kubeconfig", str(kubeconfig), check=False)
    kubeconfig.unlink(missing_ok=True)


def wait_for_apiserver(kubeconfig: Path, timeout: float = 120.0) -> str:
    """Block until /version answers; returns the server's gitVersion."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with new_api_client(str(kubeconfig)) as api:
                version: str = client.VersionApi(api).get_code().git_version
                client.CoreV1Api(api).list_namespace(limit=1)
                return version
        except Exception as error:  # any failure means "not up yet"
            last_error = error
            time.sleep(0.5)
    raise TimeoutError(f"kube-apiserver did not answer within {timeout:.0f}s: {last_error}")


def create_nodes(kubeconfig: Path, scenario: Scenario, on_progress: Callable[[int], None], workers: int = 32) -> int:
    """Create the scenario's nodes in parallel; existing nodes are left alone. Returns how many were created."""
    manifests = [node_manifest(pool, index) for pool in scenario.pools for index in range(pool.nodes)]
    with new_api_client(str(kubeconfig), pool_size=workers) as api:
        core = client.CoreV1Api(api)

        def create(manifest: dict[str, Any]) -> int:
            try:
                core.create_node(manifest)  # type: ignore[arg-type]  # the client accepts plain dicts
            except ApiException as error:
                if error.status != 409:
                    raise
                return 0
            finally:
                on_progress(1)
            return 1

        with ThreadPoolExecutor(max_workers=workers) as executor:
            return sum(executor.map(create, manifests))


def wait_for_crds(api: client.ApiClient, names: list[str], timeout: float = 60.0) -> None:
    """CRDs are usable once their Established condition is True."""
    extensions = client.ApiextensionsV1Api(api)
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            crd = extensions.read_custom_resource_definition(name)
            conditions = (crd.status.conditions if crd.status else None) or []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                pending.discard(name)
        if pending:
            time.sleep(0.2)
    if pending:
        raise TimeoutError(f"CRDs not established within {timeout:.0f}s: {sorted(pending)}")


@dataclass(frozen=True)
class NodeSummary:
    nodes: int
    ready: int
    gpus: int


def node_summary(kubeconfig: Path) -> NodeSummary:
    with new_api_client(str(kubeconfig)) as api:
        nodes = client.CoreV1Api(api).list_node().items
    statuses = [node.status for node in nodes if node.status]
    ready = sum(1 for s in statuses if any(c.type == "Ready" and c.status == "True" for c in s.conditions or []))
    gpus = sum(int((s.allocatable or {}).get("nvidia.com/gpu", "0")) for s in statuses)
    return NodeSummary(nodes=len(nodes), ready=ready, gpus=gpus)


def real_node_name(cluster: str) -> str:
    return f"{cluster}-real-0"


def build_local_images(
    node_binaries: NodeBinaries, on_progress: Callable[[str], None]
) -> list[localimages.ImageArchive]:
    """The images a real node runs, built here (no registry): pause, the tenant image and the operator."""
    cache = localimages.default_cache()
    return [
        localimages.build_pause_image(node_binaries.pause, cache),
        localimages.build_tenant_image(cache),
        localimages.build_operator_image(repo_root(), cache, on_progress=on_progress),
    ]


@dataclass(frozen=True)
class LocalRealNode:
    state: RealNodeState
    images: list[localimages.ImageArchive]

    @property
    def operator_image(self) -> str:
        return next(
            image.reference for image in self.images if image.reference.startswith(localimages.OPERATOR_REPOSITORY)
        )


def start_local_real_node(
    binaries: Binaries, name: str, kubeconfig: Path, on_progress: Callable[[str], None]
) -> LocalRealNode:
    """The cluster's real node: system node for gpuaas-system and the only node of REAL_NODE_POOL."""
    node_binaries = ensure_node_binaries(binaries)
    images = build_local_images(node_binaries, on_progress)
    spec = RealNodeSpec(
        name=real_node_name(name),
        labels=real_node_labels(REAL_NODE_POOL.name, REAL_NODE_POOL.gpu_model, REAL_NODE_POOL.provider),
        gpus=REAL_NODE_POOL.gpus_per_node,
        images=tuple(image.path for image in images),
    )
    state = start_real_node(
        name, kubeconfig, node_work_dir(name), node_binaries, spec, localimages.PAUSE_IMAGE, on_progress
    )
    return LocalRealNode(state, images)


def stop_local_real_node(name: str, kubeconfig: Path) -> bool:
    """Stop the cluster's real node, if it has one, and restore the host."""
    return stop_real_node(node_work_dir(name), kubeconfig)
