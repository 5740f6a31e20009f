"""The report's own kubeconfig reading (k8s/kubeconfig.py): kubectl's rules for the entries it handles, and a hand-over
to the Kubernetes client for every entry it does not."""

from __future__ import annotations

import base64
import gzip
import ssl
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from gpuaas.k8s.kubeconfig import (
    ApiError,
    ApiReader,
    Endpoint,
    KubeconfigError,
    NeedsKubernetesClientError,
    current_context,
    endpoint_of,
    in_cluster_endpoint,
    merge_kubeconfigs,
    resolve_endpoint,
)
from gpuaas.k8s.webhooks import ensure_self_signed


def kubeconfig(name: str, cluster: dict[str, Any], user: dict[str, Any], current: str | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": name if current is None else current,
        "clusters": [{"name": name, "cluster": cluster}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": "default"}}],
    }


def write(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document))
    return path


def test_client_certificates_resolve_against_their_own_kubeconfigs_directory(tmp_path: Path) -> None:
    path = write(
        tmp_path / "conf" / "nhn.yaml",
        kubeconfig(
            "nhn",
            {"server": "https://10.0.0.1:6443", "certificate-authority": "pki/ca.crt"},
            {"client-certificate": "pki/admin.crt", "client-key": "/abs/admin.key"},
        ),
    )
    assert resolve_endpoint(str(path), None) == Endpoint(
        server="https://10.0.0.1:6443",
        ca_file=str(tmp_path / "conf" / "pki" / "ca.crt"),
        cert_file=str(tmp_path / "conf" / "pki" / "admin.crt"),
        key_file="/abs/admin.key",
    )


def test_inline_data_tokens_and_basic_auth_are_read() -> None:
    ca = base64.b64encode(b"CA PEM").decode()
    merged = merge_kubeconfigs(
        [
            (
                Path("/k/a.yaml"),
                kubeconfig(
                    "a",
                    {"server": "https://a", "certificate-authority-data": ca, "insecure-skip-tls-verify": False},
                    {"token": "s3cret", "username": "u", "password": "p"},
                ),
            )
        ]
    )
    endpoint = endpoint_of(merged, None)
    assert (endpoint.ca_data, endpoint.token, endpoint.basic, endpoint.insecure) == (
        b"CA PEM",
        "s3cret",
        ("u", "p"),
        False,
    )
    merged["users"]["a"] = (Path("/k"), {"tokenFile": "token"})
    assert endpoint_of(merged, "a").token_file == "/k/token"


def test_several_files_merge_as_kubectl_merges_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$KUBECONFIG lists files; the first to name an entry or a current context wins, and missing files are
    skipped."""
    first = write(tmp_path / "one" / "config", kubeconfig("shared", {"server": "https://first"}, {"token": "1"}))
    second = write(
        tmp_path / "two" / "config",
        {
            **kubeconfig("shared", {"server": "https://second"}, {"token": "2"}, current="other"),
            "clusters": [
                {"name": "shared", "cluster": {"server": "https://second"}},
                {"name": "other", "cluster": {"server": "https://other", "certificate-authority": "ca.crt"}},
            ],
            "contexts": [{"name": "other", "context": {"cluster": "other", "user": "shared"}}],
        },
    )
    monkeypatch.setenv("KUBECONFIG", f"{first}:{tmp_path / 'missing'}:{second}")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert resolve_endpoint(None, None) == Endpoint(server="https://first", token="1")
    assert resolve_endpoint(None, "other") == Endpoint(
        server="https://other", ca_file=str(tmp_path / "two" / "ca.crt"), token="1"
    )
    assert current_context() == "shared"
    assert current_context(str(second)) == "other"


@pytest.mark.parametrize(
    ("cluster", "user", "entry"),
    [
        (
            {"server": "https://a"},
            {"exec": {"command": "aws", "apiVersion": "client.authentication.k8s.io/v1"}},
            "exec",
        ),
        ({"server": "https://a"}, {"auth-provider": {"name": "oidc"}}, "auth-provider"),
        ({"server": "https://a", "proxy-url": "http://proxy:3128"}, {"token": "t"}, "proxy-url"),
        ({"server": "https://a", "tls-server-name": "api"}, {"token": "t"}, "tls-server-name"),
        ({"server": "https://a"}, {"token": "t", "as": "admin"}, "as"),
    ],
)
def test_entries_it_does_not_handle_go_to_the_kubernetes_client(
    cluster: dict[str, Any], user: dict[str, Any], entry: str
) -> None:
    merged = merge_kubeconfigs([(Path("/k/config"), kubeconfig("a", cluster, user))])
    with pytest.raises(NeedsKubernetesClientError, match=entry):
        endpoint_of(merged, None)


def test_a_missing_context_or_cluster_is_an_error_a_person_can_act_on() -> None:
    merged = merge_kubeconfigs([(Path("/k/config"), kubeconfig("a", {"server": "https://a"}, {}, current=""))])
    with pytest.raises(KubeconfigError, match="no current context; give --context"):
        endpoint_of(merged, None)
    with pytest.raises(KubeconfigError, match="no context 'b'"):
        endpoint_of(merged, "b")
    merged["contexts"]["a"] = (Path("/k"), {"cluster": "gone", "user": "a"})
    with pytest.raises(KubeconfigError, match="names cluster 'gone'"):
        endpoint_of(merged, "a")


def test_in_a_pod_the_service_account_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    endpoint = resolve_endpoint(None, None)
    assert endpoint == in_cluster_endpoint()
    assert endpoint.server == "https://[fd00::1]:443"
    assert endpoint.token_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert endpoint.ca_file == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"


class _Flaky(BaseHTTPRequestHandler):
    """Answers 429 with Retry-After until `busy` runs out, then the page; records each request's headers."""

    busy = 2
    seen: ClassVar[list[dict[str, str]]] = []

    def do_GET(self) -> None:
        type(self).seen.append({"path": self.path, **dict(self.headers)})
        if type(self).busy > 0:
            type(self).busy -= 1
            self._answer(429, b'{"kind":"Status","message":"storage is (re)initializing"}', {"Retry-After": "0"})
        elif self.path.startswith("/prefix/apis/denied"):
            self._answer(403, b'{"kind":"Status","message":"gpuusages is forbidden"}', {})
        else:
            self._answer(200, gzip.compress(b'{"items":[]}'), {"Content-Encoding": "gzip"})

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


def test_the_reader_waits_as_the_server_asks_sends_its_token_and_reads_gzip() -> None:
    server = HTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = Endpoint(server=f"http://127.0.0.1:{server.server_port}/prefix", token="t0k")
        with ApiReader(endpoint) as reader:
            assert reader.get("/apis/gpuaas.io/v1alpha1/gpuusages", {"labelSelector": "m=1"}) == b'{"items":[]}'
            with pytest.raises(ApiError, match="403 Forbidden: gpuusages is forbidden") as denied:
                reader.get("/apis/denied", {})
        assert denied.value.status == 403
    finally:
        server.shutdown()
    first, _, third = _Flaky.seen[:3]
    assert first["path"] == third["path"] == "/prefix/apis/gpuaas.io/v1alpha1/gpuusages?labelSelector=m%3D1"
    assert (third["Authorization"], third["Accept-Encoding"]) == ("Bearer t0k", "gzip")
    assert len(_Flaky.seen) == 4  # two refusals, the page, the 403 (not retried: no Retry-After)


class _Answers(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"items":[]}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


def test_the_reader_trusts_the_clusters_own_ca_and_no_other(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As kubectl: a kubeconfig that names the cluster's CA trusts that CA alone; the system's store is not even
    read (loading it took 20-90 ms of a report's start-up)."""

    def system_store(*_: object) -> None:
        raise AssertionError("the system's CA store was read")

    monkeypatch.setattr(ssl.SSLContext, "load_default_certs", system_store)
    tls = ensure_self_signed(tmp_path / "cluster", "127.0.0.1")
    stranger = ensure_self_signed(tmp_path / "stranger", "127.0.0.1")
    server = HTTPServer(("127.0.0.1", 0), _Answers)
    served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    served.load_cert_chain(tls.cert_file, tls.key_file)
    server.socket = served.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{server.server_port}"
    try:
        with ApiReader(Endpoint(server=url, ca_data=tls.ca_file.read_bytes())) as reader:
            assert reader.get("/apis/gpuaas.io/v1alpha1/gpuusages", {}) == b'{"items":[]}'
        with (
            ApiReader(Endpoint(server=url, ca_file=str(stranger.ca_file))) as reader,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            reader.get("/apis/gpuaas.io/v1alpha1/gpuusages", {})
    finally:
        server.shutdown()
