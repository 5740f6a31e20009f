"""A read-only way to the API server with the standard library alone, for `gpuaas report`.

Loading the Kubernetes client takes most of a second; a report reads two lists. This module understands the
kubeconfig entries that name a server and a credential directly: a CA, client certificates, a bearer token (inline or
a file) and basic auth, plus the in-cluster service account. Any other entry (an exec plugin, an auth provider, a
proxy, impersonation) raises `NeedsKubernetesClientError`, and the caller reads through the Kubernetes client instead,
which supports them.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode, urlsplit

import yaml

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
CLUSTER_KEYS = frozenset({"server", "certificate-authority", "certificate-authority-data", "insecure-skip-tls-verify"})
USER_KEYS = frozenset(
    {
        "client-certificate",
        "client-certificate-data",
        "client-key",
        "client-key-data",
        "token",
        "tokenFile",
        "username",
        "password",
    }
)
IGNORED_KEYS = frozenset({"extensions"})
MAX_RETRIES = 10
MAX_RETRY_AFTER_SECONDS = 10.0


class NeedsKubernetesClientError(Exception):
    """The kubeconfig uses an entry this reader does not handle; the Kubernetes client should read instead."""


class KubeconfigError(Exception):
    """The kubeconfig cannot name a server and credential (no such context, cluster or user, or none at all)."""


@dataclass(frozen=True)
class Endpoint:
    """Where the API server is and how to prove who we are. Paths are absolute (resolved against their kubeconfig)."""

    server: str
    ca_file: str | None = None
    ca_data: bytes | None = None
    insecure: bool = False
    cert_file: str | None = None
    key_file: str | None = None
    cert_data: bytes | None = None
    key_data: bytes | None = None
    token: str | None = None
    token_file: str | None = None
    basic: tuple[str, str] | None = None


def kubeconfig_paths(kubeconfig: str | None) -> list[Path]:
    """The files to read, as the Kubernetes client chooses them: the given one, else $KUBECONFIG's list, else
    ~/.kube/config."""
    if kubeconfig:
        return [Path(kubeconfig).expanduser()]
    listed = [Path(part).expanduser() for part in os.environ.get("KUBECONFIG", "").split(os.pathsep) if part]
    return listed or [Path("~/.kube/config").expanduser()]


def merge_kubeconfigs(documents: Sequence[tuple[Path, Mapping[str, Any]]]) -> dict[str, Any]:
    """Several kubeconfigs as one, by kubectl's rule: the first file that names an entry (or the current context)
    wins. Each entry remembers its file's directory, against which its relative paths resolve."""
    merged: dict[str, Any] = {"current-context": "", "clusters": {}, "contexts": {}, "users": {}}
    for path, document in documents:
        if not merged["current-context"]:
            merged["current-context"] = str(document.get("current-context") or "")
        for section, inner in (("clusters", "cluster"), ("contexts", "context"), ("users", "user")):
            for entry in document.get(section) or []:
                name = str(entry.get("name", ""))
                if name and name not in merged[section]:
                    merged[section][name] = (path.parent, dict(entry.get(inner) or {}))
    return merged


def _refuse_unknown(kind: str, name: str, entry: Mapping[str, Any], known: frozenset[str]) -> None:
    unknown = sorted(set(entry) - known - IGNORED_KEYS)
    if unknown:
        raise NeedsKubernetesClientError(f"{kind} {name!r} uses {', '.join(unknown)}")


def endpoint_of(merged: Mapping[str, Any], context: str | None) -> Endpoint:
    """The server and credential of `context` (default: the current context) in a merged kubeconfig."""
    chosen = context or merged["current-context"]
    if not chosen:
        raise KubeconfigError("the kubeconfig has no current context; give --context")
    if chosen not in merged["contexts"]:
        raise KubeconfigError(f"the kubeconfig has no context {chosen!r}")
    _, selected = merged["contexts"][chosen]
    _refuse_unknown("context", chosen, selected, frozenset({"cluster", "user", "namespace"}))
    cluster_name, user_name = str(selected.get("cluster", "")), str(selected.get("user", ""))
    if cluster_name not in merged["clusters"]:
        raise KubeconfigError(f"context {chosen!r} names cluster {cluster_name!r}, which the kubeconfig lacks")
    cluster_base, cluster = merged["clusters"][cluster_name]
    _refuse_unknown("cluster", cluster_name, cluster, CLUSTER_KEYS)
    user_base, user = merged["users"].get(user_name, (cluster_base, {}))
    _refuse_unknown("user", user_name, user, USER_KEYS)
    if not cluster.get("server"):
        raise KubeconfigError(f"cluster {cluster_name!r} has no server")
    basic = (str(user["username"]), str(user.get("password", ""))) if user.get("username") else None
    return Endpoint(
        server=str(cluster["server"]),
        ca_file=_path_of(cluster, "certificate-authority", cluster_base),
        ca_data=_data_of(cluster, "certificate-authority-data"),
        insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
        cert_file=_path_of(user, "client-certificate", user_base),
        key_file=_path_of(user, "client-key", user_base),
        cert_data=_data_of(user, "client-certificate-data"),
        key_data=_data_of(user, "client-key-data"),
        token=str(user["token"]) if user.get("token") else None,
        token_file=_path_of(user, "tokenFile", user_base),
        basic=basic,
    )


def _path_of(entry: Mapping[str, Any], key: str, base: Path) -> str | None:
    """A file an entry names, relative to its kubeconfig's directory unless absolute."""
    if not entry.get(key):
        return None
    path = Path(str(entry[key])).expanduser()
    return str(path if path.is_absolute() else base / path)


def _data_of(entry: Mapping[str, Any], key: str) -> bytes | None:
    return base64.b64decode(entry[key]) if entry.get(key) else None


def in_cluster_endpoint() -> Endpoint:
    """The pod's own API server, as its service account sees it."""
    host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    host = f"[{host}]" if ":" in host else host
    return Endpoint(
        server=f"https://{host}:{port}",
        ca_file=str(SERVICE_ACCOUNT / "ca.crt"),
        token_file=str(SERVICE_ACCOUNT / "token"),
    )


def _read_documents(kubeconfig: str | None) -> list[tuple[Path, Mapping[str, Any]]]:
    documents = []
    for path in kubeconfig_paths(kubeconfig):
        if kubeconfig or path.exists():  # $KUBECONFIG may list files that do not exist; kubectl skips them
            documents.append((path, yaml.safe_load(path.read_text()) or {}))
    if not documents:
        raise KubeconfigError("no kubeconfig: give --kubeconfig, or set $KUBECONFIG")
    return documents


def current_context(kubeconfig: str | None = None) -> str:
    """The name of the kubeconfig's current context (kubeconfig None: $KUBECONFIG or ~/.kube/config)."""
    name = str(merge_kubeconfigs(_read_documents(kubeconfig))["current-context"])
    if not name:
        raise KubeconfigError(f"{kubeconfig or 'the kubeconfig'} has no current context")
    return name


def resolve_endpoint(kubeconfig: str | None, context: str | None) -> Endpoint:
    """As the Kubernetes client resolves it: in a pod with neither given, the service account; else the kubeconfig."""
    if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        return in_cluster_endpoint()
    return endpoint_of(merge_kubeconfigs(_read_documents(kubeconfig)), context)


def _ssl_context(endpoint: Endpoint) -> ssl.SSLContext:
    """A cluster's own CA is the only one trusted, as kubectl trusts it; the system's store is read only when the
    kubeconfig names none (loading it took 20 ms of a report's start-up on a quiet machine, 90 ms on a busy one)."""
    if endpoint.insecure:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(
            cafile=endpoint.ca_file, cadata=endpoint.ca_data.decode() if endpoint.ca_data else None
        )
    if endpoint.cert_file or endpoint.cert_data:
        # The ssl module loads a client certificate from files only: inline data goes to a private directory for
        # the moment it takes to load.
        with tempfile.TemporaryDirectory(prefix="gpuaas-") as private:
            cert, key = endpoint.cert_file, endpoint.key_file
            if endpoint.cert_data:
                cert = str(Path(private) / "client.crt")
                Path(cert).write_bytes(endpoint.cert_data)
            if endpoint.key_data:
                key = str(Path(private) / "client.key")
                Path(key).write_bytes(endpoint.key_data)
            context.load_cert_chain(cert or "", key)
    return context


def _authorization(endpoint: Endpoint) -> dict[str, str]:
    token = endpoint.token or (Path(endpoint.token_file).read_text().strip() if endpoint.token_file else None)
    if token:
        return {"Authorization": f"Bearer {token}"}
    if endpoint.basic:
        pair = base64.b64encode(":".join(endpoint.basic).encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    return {}


class ApiError(Exception):
    """The API server answered, but not with 200."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"the API server answered {status} {reason}" + (f": {message}" if message else ""))
        self.status = status


class ApiReader:
    """GETs over one kept-alive TLS connection. Not thread-safe: one reader per thread."""

    def __init__(self, endpoint: Endpoint, connect_seconds: float = 10, read_seconds: float = 60) -> None:
        parts = urlsplit(endpoint.server)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise KubeconfigError(f"server {endpoint.server!r} is not an http(s) URL")
        self._prefix = parts.path.rstrip("/")
        # Compressed as kubectl asks for it: a month's records are tens of MB of JSON, a tenth of that gzipped, and the
        # program office reads the providers' clusters over the internet.
        self._headers = {
            "Accept": "application/json",
            "Accept-Encoding": "gzip",
            **_authorization(endpoint),
        }
        self._read_seconds = read_seconds
        port = parts.port or (443 if parts.scheme == "https" else 80)
        self._connection: http.client.HTTPConnection
        if parts.scheme == "https":
            self._connection = http.client.HTTPSConnection(
                parts.hostname, port, context=_ssl_context(endpoint), timeout=connect_seconds
            )
        else:
            self._connection = http.client.HTTPConnection(parts.hostname, port, timeout=connect_seconds)

    def get(self, path: str, query: Mapping[str, str | int]) -> bytes:
        """The body of a GET of `path` (from the API root), which must answer 200. A server that asks to be called
        again (429, or a 5xx with Retry-After: throttled, or a resource's cache still filling) is, as client-go
        does it, up to MAX_RETRIES times after the seconds it names."""
        target = f"{self._prefix}{path}?{urlencode(query)}" if query else f"{self._prefix}{path}"
        for attempt in range(MAX_RETRIES + 1):
            status, reason, retry_after, body = self._get_once(target)
            if status == 200:
                return body
            if retry_after is None or attempt == MAX_RETRIES:
                break
            time.sleep(retry_after)
        raise ApiError(status, reason, _status_message(body))

    def _get_once(self, target: str) -> tuple[int, str, float | None, bytes]:
        if self._connection.sock is None:
            self._connection.connect()
            cast(socket.socket, self._connection.sock).settimeout(self._read_seconds)
        self._connection.request("GET", target, headers=self._headers)
        response = self._connection.getresponse()
        body = response.read()
        if response.getheader("Content-Encoding") == "gzip":
            body = zlib.decompress(body, wbits=31)  # 31: a gzip header and trailer around the deflate stream
        return response.status, response.reason, _retry_after(response), body

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> ApiReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _retry_after(response: http.client.HTTPResponse) -> float | None:
    """Seconds to wait before calling again, where the answer asks for that (client-go's rule), else None."""
    if response.status != 429 and response.status < 500:
        return None
    header = response.getheader("Retry-After")
    if header is None:
        return None
    try:
        return min(max(float(header), 0.0), MAX_RETRY_AFTER_SECONDS)
    except ValueError:
        return 1.0


def _status_message(body: bytes) -> str:
    """The `message` of a metav1.Status body, if that is what the server sent."""
    try:
        document = json.loads(body)
    except ValueError:
        return ""
    return str(document.get("message", "")) if isinstance(document, dict) else ""
