"""The operator's own webhook TLS and, when it runs outside the cluster, its webhook configurations."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpuaas.k8s.client import FIELD_MANAGER

CONFIGURATION_NAME = "gpuaas"


@dataclass(frozen=True)
class WebhookTls:
    cert_file: Path
    key_file: Path
    ca_file: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ensure_self_signed(directory: Path, host: str, days: int = 365) -> WebhookTls:
    """A CA and a server certificate for `host` in `directory`, made once and reused."""
    tls = WebhookTls(directory / "tls.crt", directory / "tls.key", directory / "ca.crt")
    if tls.cert_file.exists() and tls.key_file.exists() and tls.ca_file.exists():
        return tls
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpuaas-webhook-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = _key()
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([san, x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    tls.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    tls.cert_file.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    tls.key_file.write_bytes(_pem_key(server_key))
    tls.key_file.chmod(0o600)
    return tls


def url_host(url: str) -> str:
    return urlparse(url).hostname or "127.0.0.1"


def _hook(name: str, url: str, ca_bundle: str, rules: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "name": f"{name}.gpuaas.io",
        "clientConfig": {"url": url, "caBundle": ca_bundle},
        "rules": rules,
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        "timeoutSeconds": 5,
        "matchPolicy": "Equivalent",
        **extra,
    }


def _rule(group: str, resources: list[str], operations: list[str], scope: str = "*") -> dict[str, Any]:
    return {
        "apiGroups": [group],
        "apiVersions": ["v1alpha1" if group == "gpuaas.io" else "v1"],
        "resources": resources,
        "operations": operations,
        "scope": scope,
    }


MANAGED_NAMESPACES = {"matchLabels": {"gpuaas.io/managed": "true"}}
# The namespace controller empties a namespace being deleted; the garbage collector removes owned objects.
CONTROLLERS_EXEMPT_FROM_MANAGED = (
    "system:serviceaccount:kube-system:namespace-controller",
    "system:serviceaccount:kube-system:generic-garbage-collector",
)


def exempt_users(usernames: list[str]) -> dict[str, Any]:
    """matchConditions that let these users skip a validating webhook at the API server (the chart's
    `gpuaas.exemptUsers`): the webhook would let them through, and each call costs both sides a round trip."""
    quoted = ", ".join(f"'{name}'" for name in usernames)
    return {
        "matchConditions": [
            {"name": "exempt-trusted-users", "expression": f"!(request.userInfo.username in [{quoted}])"}
        ]
    }


def desired_configurations(
    base_url: str, ca_pem: bytes, operator_username: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same webhooks as the Helm chart renders, pointed at a URL (the operator runs outside the cluster).
    As in the chart, the operator's own writes skip the guards of managed objects and Services; the pod and
    claim webhooks are not exempted here, because outside the cluster the operator often runs as the same
    admin user that creates pods."""
    ca = base64.b64encode(ca_pem).decode()
    exempt_managed = exempt_users([operator_username, *CONTROLLERS_EXEMPT_FROM_MANAGED])
    base = base_url.rstrip("/")
    mutating = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": CONFIGURATION_NAME},
        "webhooks": [
            _hook(
                "mutate-pods",
                f"{base}/mutate-pods",
                ca,
                [
                    _rule("", ["pods"], ["CREATE"], "Namespaced"),
                    _rule("", ["pods/ephemeralcontainers"], ["UPDATE"], "Namespaced"),
                ],
                namespaceSelector=MANAGED_NAMESPACES,
                failurePolicy="Fail",
                reinvocationPolicy="IfNeeded",
            ),
            _hook(
                "mutate-allocations",
                f"{base}/mutate-allocations",
                ca,
                [_rule("gpuaas.io", ["gpuallocations"], ["CREATE", "UPDATE"], "Cluster")],
                failurePolicy="Ignore",
            ),
        ],
    }
    validating = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": CONFIGURATION_NAME},
        "webhooks": [
            _hook(
                "validate-pods",
                f"{base}/validate-pods",
                ca,
                [
                    _rule("", ["pods"], ["CREATE", "UPDATE"], "Namespaced"),
                    _rule("", ["pods/ephemeralcontainers"], ["UPDATE"], "Namespaced"),
                ],
                namespaceSelector=MANAGED_NAMESPACES,
                failurePolicy="Fail",
            ),
            _hook(
                "validate-managed",
                f"{base}/validate-managed",
                ca,
                [
                    _rule(
                        "", ["namespaces", "namespaces/status", "namespaces/finalize"], ["UPDATE", "DELETE"], "Cluster"
                    ),
                    _rule("", ["resourcequotas", "limitranges"], ["CREATE", "UPDATE", "DELETE"], "Namespaced"),
                    {
                        **_rule("rbac.authorization.k8s.io", ["rolebindings"], ["CREATE", "UPDATE", "DELETE"]),
                        "scope": "Namespaced",
                    },
                ],
                namespaceSelector=MANAGED_NAMESPACES,
                failurePolicy="Fail",
                **exempt_managed,
            ),
            _hook(
                "validate-network",
                f"{base}/validate-network",
                ca,
                [
                    _rule("", ["services", "endpoints"], ["CREATE", "UPDATE"], "Namespaced"),
                    {**_rule("discovery.k8s.io", ["endpointslices"], ["CREATE", "UPDATE"]), "scope": "Namespaced"},
                ],
                namespaceSelector=MANAGED_NAMESPACES,
                failurePolicy="Fail",
                **exempt_managed,
            ),
            _hook(
                "validate-claims",
                f"{base}/validate-claims",
                ca,
                [
                    {
                        **_rule("resource.k8s.io", ["resourceclaims", "resourceclaimtemplates"], ["CREATE"]),
                        "scope": "Namespaced",
                    }
                ],
                namespaceSelector=MANAGED_NAMESPACES,
                failurePolicy="Fail",
            ),
            _hook(
                "validate-allocations",
                f"{base}/validate-allocations",
                ca,
                [_rule("gpuaas.io", ["gpuallocations"], ["CREATE", "UPDATE"], "Cluster")],
                failurePolicy="Ignore",
            ),
            _hook(
                "stamp-allocation-deletes",
                f"{base}/stamp-allocation-deletes",
                ca,
                [_rule("gpuaas.io", ["gpuallocations"], ["DELETE"], "Cluster")],
                failurePolicy="Ignore",
                sideEffects="NoneOnDryRun",
            ),
        ],
    }
    return mutating, validating


def apply_configurations(base_url: str, ca_pem: bytes, operator_username: str) -> None:
    mutating, validating = desired_configurations(base_url, ca_pem, operator_username)
    api = client.AdmissionregistrationV1Api()
    options: dict[str, Any] = {
        "field_manager": FIELD_MANAGER,
        "force": True,
        "_content_type": "application/apply-patch+yaml",
    }
    api.patch_mutating_webhook_configuration(CONFIGURATION_NAME, mutating, **options)
    api.patch_validating_webhook_configuration(CONFIGURATION_NAME, validating, **options)


def whoami() -> str:
    """The operator's own username, so its webhooks let its own writes through."""
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    review = client.AuthenticationV1Api().create_self_subject_review(body)  # type: ignore[arg-type]
    user = review.status.user_info if review.status else None
    if user is None or not user.username:
        raise RuntimeError("the API server did not say who the operator is (SelfSubjectReview)")
    return str(user.username)


def delete_configurations() -> None:
    api = client.AdmissionregistrationV1Api()
    for delete in (api.delete_mutating_webhook_configuration, api.delete_validating_webhook_configuration):
        try:
            delete(CONFIGURATION_NAME)
        except ApiException as error:
            if error.status != 404:
                raise
