"""The report's reads: one month's GpuUsage and GpuPoolUsage records of each cluster.

A report needs its month only, so it lists by the month label: a ledger grows by a month of records every month, and
reading them all made a report's time grow with the program's age. The labels can be trusted because the chart's
ValidatingAdmissionPolicy (templates/ledger-policy.yaml) lets no record's labels differ from its immutable spec, and
the report builds from `spec.month`, never from the label.

Each kind is one unpaged list. The API server answers an unpaged list from its watch cache (a consistent read);
the pages after the first of a paged list come from etcd, which reads past every other month's records to fill
each page: measured, 3 s a page of 500 against 0.2 s for the first (docs/benchmarks.md, "The report").

The reads go over the standard library where the kubeconfig allows (kubeconfig.py), and through the Kubernetes
client, loaded only then, where it uses what only the client supports.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

import yaml
from pydantic import ValidationError

from gpuaas.api.common import GROUP, VERSION
from gpuaas.api.usage import (
    MONTH_LABEL,
    POOL_USAGE_PLURAL,
    USAGE_PLURAL,
    GpuPoolUsage,
    GpuPoolUsageList,
    GpuUsage,
    GpuUsageList,
)
from gpuaas.k8s.kubeconfig import ApiError, ApiReader, KubeconfigError, NeedsKubernetesClientError, resolve_endpoint

# Seconds to connect to a cluster's API server, and to wait on each read of a list, before its ledger counts as
# unreadable.
READ_TIMEOUT = (10, 60)

FetchList = Callable[[str, str], bytes]
"""(plural, label selector) -> the list's JSON."""


@dataclass(frozen=True)
class LedgerSource:
    """One cluster's ledger: where to read it, and the name a merged report gives its rows."""

    name: str
    kubeconfig: str | None = None
    context: str | None = None

    def describe(self) -> str:
        where = [
            f"context {self.context}" if self.context else "",
            f"kubeconfig {self.kubeconfig}" if self.kubeconfig else "",
        ]
        named = f"cluster {self.name!r}" if self.name else "the cluster"
        return f"{named} ({', '.join(part for part in where if part) or 'in-cluster or $KUBECONFIG'})"


class LedgerUnreadableError(Exception):
    """A cluster's ledger could not be read; a report without it would be silently short."""


def read_month(fetch: FetchList, month: str) -> list[GpuUsage | GpuPoolUsage]:
    """The month's allocation records, then its pools' records (none where the cluster's gpuaas predates them).
    Each list is parsed straight from its bytes into the records (see GpuUsageList)."""
    selector = f"{MONTH_LABEL}={month}"
    records: list[GpuUsage | GpuPoolUsage] = list(
        GpuUsageList.model_validate_json(fetch(USAGE_PLURAL, selector)).records()
    )
    try:
        records.extend(GpuPoolUsageList.model_validate_json(fetch(POOL_USAGE_PLURAL, selector)).records())
    except ApiError as error:
        if error.status != 404:
            raise
    return records


def _read_with_stdlib(reader: ApiReader, month: str) -> list[GpuUsage | GpuPoolUsage]:
    def fetch(plural: str, selector: str) -> bytes:
        return reader.get(f"/apis/{GROUP}/{VERSION}/{plural}", {"labelSelector": selector})

    return read_month(fetch, month)


def _read_with_client(source: LedgerSource, month: str) -> list[GpuUsage | GpuPoolUsage]:
    """The same read through the Kubernetes client, for kubeconfigs only it understands (exec plugins and the like)."""
    import urllib3
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException

    from gpuaas.k8s.client import new_api_client

    try:
        with new_api_client(source.kubeconfig, context=source.context) as api:
            objects = client.CustomObjectsApi(api)

            def fetch(plural: str, selector: str) -> bytes:
                try:
                    response = cast(
                        urllib3.HTTPResponse,
                        objects.list_cluster_custom_object(
                            GROUP,
                            VERSION,
                            plural,
                            label_selector=selector,
                            _preload_content=False,
                            _request_timeout=READ_TIMEOUT,
                        ),
                    )
                except ApiException as error:
                    raise ApiError(error.status or 0, str(error.reason), "") from error
                return bytes(response.data)

            return read_month(fetch, month)
    except (urllib3.exceptions.HTTPError, ConfigException) as error:
        raise LedgerUnreadableError(f"{source.describe()}: {error}") from error


def read_ledger(source: LedgerSource, month: str) -> list[GpuUsage | GpuPoolUsage]:
    """A cluster's allocation records and its pools' records of `month`."""
    try:
        try:
            endpoint = resolve_endpoint(source.kubeconfig, source.context)
        except NeedsKubernetesClientError:
            return _read_with_client(source, month)
        with ApiReader(endpoint, *READ_TIMEOUT) as reader:
            return _read_with_stdlib(reader, month)
    except ApiError as error:
        raise LedgerUnreadableError(f"{source.describe()}: {error}") from error
    except (http.client.HTTPException, OSError, KubeconfigError, yaml.YAMLError, ValidationError) as error:
        raise LedgerUnreadableError(f"{source.describe()}: {error}") from error


def read_ledgers(sources: Sequence[LedgerSource], month: str) -> dict[str, list[GpuUsage | GpuPoolUsage]]:
    """Every source's records of `month` by name, read in parallel. Any unreadable source fails the whole read,
    naming each one that failed."""
    with ThreadPoolExecutor(max_workers=max(1, len(sources))) as pool:
        futures = [pool.submit(read_ledger, source, month) for source in sources]
    failures = [str(error) for future in futures if (error := future.exception()) is not None]
    if failures:
        raise LedgerUnreadableError("; ".join(failures))
    return {source.name: future.result() for source, future in zip(sources, futures, strict=True)}
