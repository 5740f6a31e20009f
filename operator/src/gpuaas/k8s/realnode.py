"""A real node beside the KWOK nodes: containerd, runc, CNI, kubelet and kube-proxy run as processes on this host.

The node registers with the local control plane like any kubelet (a client cert signed by the cluster CA), runs
real containers from images built here (nothing is pulled), and advertises `nvidia.com/gpu` through gpuaas's fake
device plugin. kube-proxy (iptables mode) gives pods the `kubernetes` Service and the API server the webhook
Services. Everything it changes on the host is recorded first and undone by `stop_real_node`: processes, mounts,
links, routes, iptables, sysctls and cgroups. See docs/local-cluster.md.

One real node per host: the kubelet's device-plugin directory is fixed, and two kubelets on one host fight over
sandboxes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpuaas.api.pool import POOL_LABEL
from gpuaas.domain.scenarios import GPU_PRODUCT_LABEL, PROVIDER_LABEL
from gpuaas.k8s.client import new_api_client

KWOK_CLUSTERS = Path.home() / ".kwok" / "clusters"
# Runtime state of the node (containerd's content store, the kubelet's pods, CNI leases), per cluster.
STATE_ROOT = Path("/var/lib/gpuaas-node")
RUN_ROOT = Path("/run/gpuaas-node")
# Fixed by the kubelet: the device-plugin directory lives under its root dir, which stays the default.
KUBELET_ROOT = Path("/var/lib/kubelet")
CNI_BIN_DIR = Path("/usr/lib/cni")
RUNC = Path("/usr/sbin/runc")

BRIDGE = "gpuaas0"
POD_SUBNET = ipaddress.ip_network("10.244.0.0/24")
# kwokctl's default Service range; KWOK's fake pod IPs come from it too.
SERVICE_SUBNET = ipaddress.ip_network("10.0.0.0/24")
KUBERNETES_SERVICE_IP = "10.0.0.1"
# Traffic to cluster addresses that no local rule claims must never leave the machine: they are routed to a portless
# bridge, which drops what it gets. Not a blackhole route: the host's own connects (the API server calling a webhook
# Service) are routed before kube-proxy's DNAT, and a blackhole fails them with EINVAL.
CLUSTER_ROUTES = (str(SERVICE_SUBNET),)
SINK_LINK = "gpuaas-sink"

SYSTEM_NODE_LABEL = "gpuaas.io/system"
NODE_ROLE_LABEL = "node-role.kubernetes.io/system"
# The sysctls the kubelet, the bridge plugin and kube-proxy may change; restored on stop.
HOST_SYSCTLS = (
    "vm.overcommit_memory",
    "kernel.panic",
    "kernel.panic_on_oops",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
)
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class NodeBinaries:
    containerd_dir: Path  # containerd, containerd-shim-runc-v2, ctr
    kubelet: Path
    kube_proxy: Path
    device_plugin: Path
    pause: Path
    runc: Path = RUNC
    cni_bin_dir: Path = CNI_BIN_DIR


@dataclass(frozen=True)
class RealNodeSpec:
    """What the node is: its name, labels (pool membership), GPU count, and the images to import."""

    name: str
    labels: dict[str, str]
    gpus: int
    images: tuple[Path, ...] = ()


@dataclass
class HostSnapshot:
    """The host as it was before the node started, to restore it exactly."""

    sysctls: dict[str, str] = field(default_factory=dict)
    iptables: dict[str, str] = field(default_factory=dict)  # command -> iptables-save output
    nft_tables: list[str] = field(default_factory=list)
    sink_link_added: bool = False
    kubelet_root_existed: bool = False
    log_dirs_created: list[str] = field(default_factory=list)


@dataclass
class RealNodeState:
    cluster: str
    node: str
    work: str
    pids: dict[str, int] = field(default_factory=dict)
    # name -> (command, extra environment), to restart a component as it was started
    commands: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)
    host: HostSnapshot = field(default_factory=HostSnapshot)

    @property
    def containerd_socket(self) -> Path:
        return RUN_ROOT / self.cluster / "containerd" / "containerd.sock"

    def ctr(self, *args: str) -> list[str]:
        """A `ctr` command against this node's containerd (ctr sits beside the containerd that was started)."""
        ctr = Path(self.commands["containerd"][0][0]).with_name("ctr")
        return [str(ctr), "--address", str(self.containerd_socket), *args]


def require_host_tools() -> list[str]:
    """What this host lacks for a real node, as messages a person can act on (empty: ready)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("a real node needs root (it runs containerd, the kubelet and iptables)")
    if not RUNC.exists():
        missing.append("runc is missing: apt-get install runc")
    if not (CNI_BIN_DIR / "bridge").exists():
        missing.append("CNI plugins are missing: apt-get install containernetworking-plugins")
    for tool in ("iptables", "iptables-save", "iptables-restore", "ip", "openssl", "conntrack"):
        if shutil.which(tool) is None:
            missing.append(f"{tool} is missing: apt-get install iptables iproute2 openssl conntrack")
    return missing


def kwokctl_config(cluster: str) -> dict[str, Any]:
    """What the API server needs beyond kwokctl's defaults for real kubelets and in-cluster clients.

    - the `kubernetes` Service's ClusterIP in the serving cert, so pods verify TLS;
    - a client cert for calls to kubelets (logs, exec), and node addresses by InternalIP (names don't resolve).
    """
    pki = KWOK_CLUSTERS / cluster / "pki"
    return {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokctlConfiguration",
        "options": {"kubeApiserverCertSANs": [KUBERNETES_SERVICE_IP]},
        "componentsPatches": [
            {
                "name": "kube-apiserver",
                "extraArgs": [
                    {"key": "kubelet-client-certificate", "value": str(pki / "admin.crt")},
                    {"key": "kubelet-client-key", "value": str(pki / "admin.key")},
                    {"key": "kubelet-preferred-address-types", "value": "InternalIP,Hostname,ExternalIP"},
                ],
            }
        ],
    }


def host_ip() -> str:
    """The address of the default route's interface: what the kubelet advertises and the API server binds."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for a UDP connect
        address: str = probe.getsockname()[0]
        return address


def _default_mtu() -> int:
    route = _run(["ip", "-o", "route", "show", "default"]).stdout.split()
    device = route[route.index("dev") + 1] if "dev" in route else "eth0"
    return int(Path(f"/sys/class/net/{device}/mtu").read_text())


def _run(command: list[str], check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, text=True, capture_output=True, check=False, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait(predicate: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tail = ""
    if log and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    raise TimeoutError(f"{what} within {timeout:.0f}s{tail}")


# --- host snapshot and restore ---------------------------------------------------------------------------------


def _read_sysctl(name: str) -> str | None:
    path = Path("/proc/sys") / name.replace(".", "/")
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _iptables_rules() -> dict[str, str]:
    """iptables-save and ip6tables-save output, by command."""
    return {save: _run([save]).stdout for save in ("iptables-save", "ip6tables-save") if shutil.which(save)}


def snapshot_host() -> HostSnapshot:
    snapshot = HostSnapshot()
    for name in HOST_SYSCTLS:
        value = _read_sysctl(name)
        if value is not None:
            snapshot.sysctls[name] = value
    snapshot.iptables = _iptables_rules()
    snapshot.nft_tables = nft_tables()
    snapshot.kubelet_root_existed = KUBELET_ROOT.exists()
    return snapshot


def _restore_sysctls(sysctls: dict[str, str]) -> None:
    for name, value in sysctls.items():
        if _read_sysctl(name) != value:
            (Path("/proc/sys") / name.replace(".", "/")).write_text(value)


def normalized_rules(saved: str) -> str:
    """iptables-save output without its timestamp comments and packet counters, to compare rule sets."""
    lines = [re.sub(r" \[\d+:\d+\]$", "", line) for line in saved.splitlines() if not line.startswith("#")]
    return "\n".join(lines)


def nft_tables() -> list[str]:
    """The nftables tables (`family name`): iptables-nft creates them on first use and leaves them behind."""
    if shutil.which("nft") is None:
        return []
    listed = _run(["nft", "list", "tables"], check=False).stdout
    return sorted(line.removeprefix("table ").strip() for line in listed.splitlines() if line.startswith("table "))


def _restore_iptables(saved: dict[str, str], tables_before: list[str]) -> None:
    # Tables that did not exist before go entirely (with their chains); the others get their rules back.
    for table in nft_tables():
        if table not in tables_before:
            _run(["nft", "delete", "table", *table.split()], check=False)
    for save, rules in saved.items():
        current = _run([save]).stdout
        if normalized_rules(current) == normalized_rules(rules):
            continue
        had = set(re.findall(r"^\*(\S+)", rules, flags=re.M))
        extra = [t for t in re.findall(r"^\*(\S+)", current, flags=re.M) if t not in had]
        flush = "".join(f"*{table}\nCOMMIT\n" for table in extra)  # a bare section empties the table
        _run([save.replace("-save", "-restore")], input=rules + flush)


def _add_cluster_routes(snapshot: HostSnapshot) -> None:
    if Path(f"/sys/class/net/{SINK_LINK}").exists():
        return
    _run(["ip", "link", "add", SINK_LINK, "type", "bridge"])  # a bridge with no ports: this kernel has no dummy
    snapshot.sink_link_added = True
    _run(["ip", "link", "set", SINK_LINK, "up"])
    for cidr in CLUSTER_ROUTES:
        _run(["ip", "route", "replace", cidr, "dev", SINK_LINK])


def _mounts_under(prefixes: Iterable[Path]) -> list[str]:
    points = []
    for line in Path("/proc/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if any(point == str(p) or point.startswith(f"{p}/") for p in prefixes):
            points.append(point)
    return points


def _unmount_all(prefixes: Iterable[Path]) -> None:
    prefixes = list(prefixes)
    for _ in range(5):  # bind mounts can stack: unmount until none is left
        points = _mounts_under(prefixes)
        if not points:
            return
        for point in sorted(points, key=len, reverse=True):
            _run(["umount", "-l", point], check=False)


def _remove_cgroups(name: str) -> None:
    """rmdir the kubelet's cgroup tree (leaves first) in every hierarchy; its processes are gone by now."""
    if not CGROUP_ROOT.exists():
        return
    for top in [CGROUP_ROOT / name, *CGROUP_ROOT.glob(f"*/{name}")]:
        if top.is_symlink() or not top.is_dir():
            continue
        tree = [p for p in top.rglob("*") if p.is_dir() and not p.is_symlink()]
        for directory in [*sorted(tree, key=lambda p: len(p.parts), reverse=True), top]:
            with contextlib.suppress(OSError):
                directory.rmdir()


# --- configuration ---------------------------------------------------------------------------------------------


def containerd_config(state: RealNodeState, cni_conf_dir: Path, pause_image: str) -> str:
    root = STATE_ROOT / state.cluster / "containerd"
    run = RUN_ROOT / state.cluster / "containerd"
    return f"""version = 3
root = '{root}'
state = '{run}'

[grpc]
  address = '{state.containerd_socket}'

[plugins.'io.containerd.cri.v1.runtime']
  # Lowering oom_score_adj needs CAP_SYS_RESOURCE, which this host may lack: clamp scores to containerd's own.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = 'runc'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = '{RUNC}'
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['{CNI_BIN_DIR}']
    conf_dir = '{cni_conf_dir}'

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '{pause_image}'
"""


def cni_config(state: RealNodeState, mtu: int) -> dict[str, Any]:
    gateway = str(next(POD_SUBNET.hosts()))
    return {
        "cniVersion": "1.0.0",
        "name": "gpuaas-local",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "mtu": mtu,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(POD_SUBNET), "gateway": gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(STATE_ROOT / state.cluster / "cni"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(state: RealNodeState, ca: Path, port: int, healthz_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{state.containerd_socket}",
        "port": port,
        "healthzPort": healthz_port,
        "healthzBindAddress": "127.0.0.1",
        "readOnlyPort": 0,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "oomScoreAdj": 0,
        # Images cannot be pulled again here: never collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        # The disk is shared with the rest of the machine: evict only when it is nearly full.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "maxPods": 110,
        "clusterDomain": "cluster.local",
        "serializeImagePulls": False,
        "registerNode": True,
        "syncFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
    }


def kube_proxy_config(kubeconfig: Path, metrics_port: int, healthz_port: int) -> dict[str, Any]:
    gateway = str(next(POD_SUBNET.hosts()))
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "clusterCIDR": str(POD_SUBNET),
        "oomScoreAdj": 0,
        # Leave the host's conntrack sysctls alone.
        "conntrack": {"maxPerCore": 0, "min": 0},
        # Apply endpoint changes at once (default: at most once a second): a webhook fail-over shows sooner.
        "iptables": {"localhostNodePorts": False, "minSyncPeriod": "0s"},
        # kwokctl's own ports fall in the NodePort range: serve NodePorts on the bridge only.
        "nodePortAddresses": [f"{gateway}/32"],
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
    }


def _client_cert(pki: Path, out: Path, subject: str) -> tuple[Path, Path]:
    key, csr, cert = out.with_suffix(".key"), out.with_suffix(".csr"), out.with_suffix(".crt")
    _run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-subj", subject,
          "-out", str(csr)])  # fmt: skip
    _run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"),
          "-CAcreateserial", "-days", "30", "-out", str(cert)])  # fmt: skip
    csr.unlink()
    return cert, key


def _kubeconfig(server: str, ca: Path, cert: Path, key: Path, user: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
        "current-context": "local",
    }


def _api_server_url(admin_kubeconfig: Path) -> str:
    config = yaml.safe_load(admin_kubeconfig.read_text())
    server: str = config["clusters"][0]["cluster"]["server"]
    return server


# --- lifecycle -------------------------------------------------------------------------------------------------


def state_path(work: Path) -> Path:
    return work / "state.json"


def _save(state: RealNodeState) -> None:
    state_path(Path(state.work)).write_text(json.dumps(asdict(state), indent=2))


def load_state(work: Path) -> RealNodeState | None:
    path = state_path(work)
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    raw["host"] = HostSnapshot(**raw["host"])
    raw["commands"] = {name: (list(command), dict(env)) for name, (command, env) in raw.get("commands", {}).items()}
    return RealNodeState(**raw)


def _spawn(state: RealNodeState, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
    log = (Path(state.work) / f"{name}.log").open("ab")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})}
    )
    state.pids[name] = process.pid
    state.commands[name] = (command, env or {})
    _save(state)


def restart_component(work: Path, name: str) -> float:
    """Stop one of the node's processes (kubelet, containerd, kube-proxy, device-plugin) and start it again as it
    was started, as systemd would after a crash or an upgrade. Containers keep running: their shims outlive
    containerd. Returns the seconds it was down."""
    state = load_state(work)
    if state is None or name not in state.pids:
        raise RuntimeError(f"no real node component {name!r} recorded in {work}")
    started = time.monotonic()
    # Only the process, not its group: the shims containerd started must keep the containers running.
    _terminate(state.pids[name], timeout=15, whole_group=False)
    command, env = state.commands[name]
    _spawn(state, name, command, env)
    _wait_healthy(state, name)
    return time.monotonic() - started


def _wait_healthy(state: RealNodeState, name: str, timeout: float = 60.0) -> None:
    """Like systemd with Restart=always: a component that exits is started again (the kubelet exits when
    containerd's CRI is not initialized yet), until it answers its health check."""
    work = Path(state.work)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(state.pids[name]):
            time.sleep(1)
            command, env = state.commands[name]
            _spawn(state, name, command, env)
            continue
        if _component_healthy(state, name):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{name} did not become healthy within {timeout:.0f}s; see {work / (name + '.log')}")


def _component_healthy(state: RealNodeState, name: str) -> bool:
    if name == "containerd":
        # The CRI plugin answers only once initialised; `ctr version` alone would pass earlier.
        result = _run(state.ctr("plugins", "ls"), check=False)
        return (
            result.returncode == 0
            and re.search(r"io\.containerd\.grpc\.v1\s+cri\s+.*\bok\b", result.stdout) is not None
        )
    if name == "kubelet":
        port = yaml.safe_load((Path(state.work) / "kubelet.yaml").read_text())["healthzPort"]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of this process still answers kill(0); reap it.
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists()


def _terminate(pid: int, timeout: float = 10.0, whole_group: bool = True) -> None:
    """SIGTERM (to its process group, when it leads one and `whole_group`), then SIGKILL after `timeout`."""
    if not _alive(pid):
        return
    if whole_group and os.getpgid(pid) == pid:
        os.killpg(pid, signal.SIGTERM)
    else:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def start_real_node(
    cluster: str,
    admin_kubeconfig: Path,
    work: Path,
    binaries: NodeBinaries,
    spec: RealNodeSpec,
    pause_image: str,
    on_progress: Callable[[str], None] = lambda _: None,
) -> RealNodeState:
    """Start containerd, the device plugin, the kubelet and kube-proxy; return once the node is Ready."""
    missing = require_host_tools()
    if missing:
        raise RuntimeError("; ".join(missing))
    previous = load_state(work)
    if previous is not None and all(_alive(pid) for pid in previous.pids.values()):
        on_progress(f"real node {previous.node} is already running")
        return previous
    if previous is not None:
        stop_real_node(work, admin_kubeconfig)
    for other in RUN_ROOT.glob("*/containerd/containerd.sock") if RUN_ROOT.exists() else []:
        raise RuntimeError(f"another real node runs on this host ({other}); one per host: stop it first")

    work.mkdir(parents=True, exist_ok=True)
    for old_log in work.glob("*.log"):  # a fresh node, fresh logs (restarts within a run append)
        old_log.unlink()
    state = RealNodeState(cluster=cluster, node=spec.name, work=str(work), host=snapshot_host())
    _save(state)
    _add_cluster_routes(state.host)
    for log_dir in ("/var/log/pods", "/var/log/containers"):
        if not Path(log_dir).exists():
            state.host.log_dirs_created.append(log_dir)
    _save(state)
    kubelet_kubeconfig, proxy_kubeconfig = _write_credentials(cluster, admin_kubeconfig, work, spec.name)
    on_progress("starting containerd")
    _start_containerd(state, binaries, pause_image)
    for image in spec.images:
        on_progress(f"importing {image.name}")
        _run(state.ctr("-n", "k8s.io", "images", "import", str(image)))
    on_progress("starting the kubelet, the device plugin and kube-proxy")
    _start_kubelet(state, binaries, spec, kubelet_kubeconfig, KWOK_CLUSTERS / cluster / "pki" / "ca.crt")
    if spec.gpus:
        _spawn(state, "device-plugin", [str(binaries.device_plugin), f"--count={spec.gpus}"])
    (work / "kube-proxy.yaml").write_text(
        yaml.safe_dump(kube_proxy_config(proxy_kubeconfig, _free_port(), _free_port()))
    )
    _spawn(state, "kube-proxy", [str(binaries.kube_proxy), f"--config={work / 'kube-proxy.yaml'}",
                                 f"--hostname-override={spec.name}", "--v=1"])  # fmt: skip
    on_progress("waiting for the node to be Ready")
    _wait_ready(state, admin_kubeconfig, spec)
    return state


def _write_credentials(cluster: str, admin_kubeconfig: Path, work: Path, node: str) -> tuple[Path, Path]:
    """Client certs signed by the cluster CA (no bootstrap tokens), and kubeconfigs for the kubelet and kube-proxy."""
    pki = KWOK_CLUSTERS / cluster / "pki"
    ca = pki / "ca.crt"
    server = _api_server_url(admin_kubeconfig)
    kubelet_cert, kubelet_key = _client_cert(pki, work / "kubelet", f"/O=system:nodes/CN=system:node:{node}")
    proxy_cert, proxy_key = _client_cert(pki, work / "kube-proxy", "/CN=system:kube-proxy")
    kubelet_kubeconfig = work / "kubelet.kubeconfig"
    proxy_kubeconfig = work / "kube-proxy.kubeconfig"
    kubelet_kubeconfig.write_text(yaml.safe_dump(_kubeconfig(server, ca, kubelet_cert, kubelet_key, node)))
    proxy_kubeconfig.write_text(yaml.safe_dump(_kubeconfig(server, ca, proxy_cert, proxy_key, "kube-proxy")))
    return kubelet_kubeconfig, proxy_kubeconfig


def _node_path(binaries: NodeBinaries) -> str:
    return f"{binaries.containerd_dir}:{binaries.runc.parent}:{os.environ.get('PATH', '')}"


def _start_containerd(state: RealNodeState, binaries: NodeBinaries, pause_image: str) -> None:
    work = Path(state.work)
    cni_dir = work / "cni"
    cni_dir.mkdir(exist_ok=True)
    (cni_dir / "10-gpuaas.conflist").write_text(json.dumps(cni_config(state, _default_mtu()), indent=2))
    (work / "containerd.toml").write_text(containerd_config(state, cni_dir, pause_image))
    command = [str(binaries.containerd_dir / "containerd"), "--config", str(work / "containerd.toml")]
    _spawn(state, "containerd", command, env={"PATH": _node_path(binaries)})
    _wait(state.containerd_socket.exists, 30, "containerd did not open its socket", work / "containerd.log")


def _start_kubelet(
    state: RealNodeState, binaries: NodeBinaries, spec: RealNodeSpec, kubeconfig: Path, ca: Path
) -> None:
    work = Path(state.work)
    KUBELET_ROOT.mkdir(parents=True, exist_ok=True)
    (KUBELET_ROOT / "device-plugins").mkdir(parents=True, exist_ok=True)
    (work / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config(state, ca, _free_port(), _free_port())))
    labels = ",".join(f"{k}={v}" for k, v in sorted(spec.labels.items()))
    command = [
        str(binaries.kubelet),
        f"--config={work / 'kubelet.yaml'}",
        f"--kubeconfig={kubeconfig}",
        f"--hostname-override={spec.name}",
        f"--node-ip={host_ip()}",
        f"--node-labels={labels}",
        "--v=1",
    ]
    _spawn(state, "kubelet", command, env={"PATH": _node_path(binaries)})


def _wait_ready(state: RealNodeState, admin_kubeconfig: Path, spec: RealNodeSpec) -> None:
    work = Path(state.work)
    with new_api_client(str(admin_kubeconfig)) as api:
        core = client.CoreV1Api(api)

        def ready() -> bool:
            for name, pid in state.pids.items():
                if not _alive(pid):
                    raise RuntimeError(f"{name} exited; see {work / (name + '.log')}")
            try:
                status = core.read_node(spec.name).status
            except ApiException:
                return False
            if status is None:
                return False
            gpus = int((status.allocatable or {}).get("nvidia.com/gpu", "0"))
            ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
            return ready and gpus >= spec.gpus

        _wait(ready, 90, f"node {spec.name} was not Ready with {spec.gpus} GPUs", work / "kubelet.log")
        # The kubelet may not set node-role labels on itself; the admin does, for `kubectl get nodes`.
        core.patch_node(spec.name, {"metadata": {"labels": {NODE_ROLE_LABEL: ""}}})


def _delete_node_pods(admin_kubeconfig: Path, node: str, timeout: float = 40.0) -> None:
    """Delete the node's pods so the kubelet runs CNI DEL and unmounts their volumes, then delete the Node."""
    try:
        with new_api_client(str(admin_kubeconfig)) as api:
            core = client.CoreV1Api(api)
            selector = f"spec.nodeName={node}"

            def pods() -> list[tuple[str, str, bool]]:
                listed = core.list_pod_for_all_namespaces(field_selector=selector).items
                metas = [pod.metadata for pod in listed if pod.metadata]
                return [(str(m.name), str(m.namespace), bool(m.finalizers)) for m in metas]

            for name, namespace, _ in pods():
                with contextlib.suppress(ApiException):
                    core.delete_namespaced_pod(name, namespace, grace_period_seconds=1)
            deadline = time.monotonic() + timeout
            while (left := pods()) and time.monotonic() < deadline:
                for name, namespace, has_finalizers in left:
                    if has_finalizers:  # gpuaas's usage finalizer: the operator may be gone already
                        core.patch_namespaced_pod(name, namespace, {"metadata": {"finalizers": None}})
                time.sleep(0.5)
            with contextlib.suppress(ApiException):
                core.delete_node(node)
    except Exception:  # the control plane may be down already: the host clean-up below still runs
        return


def stop_real_node(work: Path, admin_kubeconfig: Path | None = None) -> bool:
    """Stop the node and restore the host as it was before `start_real_node`. Returns False if none was recorded."""
    state = load_state(work)
    if state is None:
        return False
    if admin_kubeconfig is not None and admin_kubeconfig.exists() and _alive(state.pids.get("kubelet", -1)):
        _delete_node_pods(admin_kubeconfig, state.node)
    for name in ("device-plugin", "kube-proxy", "kubelet"):
        if name in state.pids:
            _terminate(state.pids[name])
    if _alive(state.pids.get("containerd", -1)):
        for task in _run(state.ctr("-n", "k8s.io", "tasks", "ls", "-q"), check=False).stdout.split():
            _run(state.ctr("-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", task), check=False)
    if "containerd" in state.pids:
        _terminate(state.pids["containerd"])
    _kill_leftover_shims(state)
    _unmount_all([KUBELET_ROOT, STATE_ROOT / state.cluster, RUN_ROOT / state.cluster])
    for netns in Path("/run/netns").glob("cni-*") if Path("/run/netns").exists() else []:
        _run(["umount", "-l", str(netns)], check=False)
        netns.unlink(missing_ok=True)
    _run(["ip", "link", "delete", BRIDGE], check=False)
    _restore_iptables(state.host.iptables, state.host.nft_tables)
    if state.host.sink_link_added:
        _run(["ip", "link", "delete", SINK_LINK], check=False)  # its routes go with it
    _restore_sysctls(state.host.sysctls)
    _remove_cgroups("kubepods")
    shutil.rmtree(STATE_ROOT / state.cluster, ignore_errors=True)
    shutil.rmtree(RUN_ROOT / state.cluster, ignore_errors=True)
    for directory in (STATE_ROOT, RUN_ROOT):
        if directory.exists() and not any(directory.iterdir()):
            directory.rmdir()
    if not state.host.kubelet_root_existed:
        shutil.rmtree(KUBELET_ROOT, ignore_errors=True)
    for log_dir in state.host.log_dirs_created:
        shutil.rmtree(log_dir, ignore_errors=True)
    state_path(work).unlink()
    return True


def _kill_leftover_shims(state: RealNodeState) -> None:
    """containerd's shims outlive it; they carry containerd's address on their command line."""
    address = str(state.containerd_socket)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"containerd-shim-runc-v2") and address.encode() in b" ".join(cmdline):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def real_node_labels(pool: str, gpu_model: str, provider: str) -> dict[str, str]:
    """The labels of a real node that is both a system node (gpuaas-system runs there) and a GPU pool member."""
    return {
        SYSTEM_NODE_LABEL: "true",
        POOL_LABEL: pool,
        GPU_PRODUCT_LABEL: f"NVIDIA-{gpu_model}",
        PROVIDER_LABEL: provider,
        "nvidia.com/gpu.count": "8",
    }


def host_state_fingerprint() -> dict[str, Any]:
    """What `stop_real_node` promises to restore, for tests that compare before and after."""
    links = sorted(re.findall(r"^\d+: ([^:@]+)", _run(["ip", "-o", "link"]).stdout, flags=re.M))
    routes = sorted(_run(["ip", "route", "show", "table", "all"]).stdout.splitlines())
    return {
        "sysctls": {name: _read_sysctl(name) for name in HOST_SYSCTLS},
        "mounts": sorted(line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()),
        "links": links,
        "routes": routes,
        "iptables": {save: normalized_rules(rules) for save, rules in _iptables_rules().items()},
        "nft_tables": nft_tables(),
        "cgroups": sorted(str(p) for p in CGROUP_ROOT.glob("*/kubepods")) if CGROUP_ROOT.exists() else [],
    }
