"""The writer port: every API write of a pool pass (and of the webhooks' delete stamp) goes through
`ClusterWriter.perform`.

`KubernetesWriter` is the real one. Unit tests of the executor and the ledger writer use a recording fake; the
integration tests keep the real API server.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

from kubernetes.client import ApiClient

from gpuaas.domain.actions import (
    Action,
    AddAllocationFinalizer,
    AnnotateAllocation,
    ApplyObject,
    CreatePoolUsage,
    CreateUsage,
    DeleteNamespace,
    DeletePod,
    DeleteRoleBinding,
    PatchNode,
    PatchStatus,
    PostEvent,
    ReleasePod,
    RemoveAllocationFinalizer,
    SetRoleBindingSubjects,
    SuspendAllocation,
    WritePoolLedger,
    WriteUsageLedger,
)
from gpuaas.k8s import objects, usage
from gpuaas.k8s.resources import patch_cluster_status

logger = logging.getLogger(__name__)
# Tests' crash point: `<action kind>:<text>` exits the process right after the first write of that kind whose
# action mentions the text, as a SIGKILL between two writes would. The log line proves where it landed.
CRASH_AFTER_ENV = "GPUAAS_CRASH_AFTER"


class ClusterWriter(Protocol):
    def perform(self, action: Action) -> None:
        """Carry out one write; an ApiException means it did not happen."""


class KubernetesWriter:
    """Writes through `api` (the shared client when None): each pool's writer has a client of its own, whose
    connection pool holds that pool's writers at once."""

    def __init__(self, api: ApiClient | None = None) -> None:
        self.api = api

    def perform(self, action: Action) -> None:
        api = self.api
        match action:
            case ApplyObject(manifest):
                objects.apply(manifest, api)
            case PatchNode(name, patch):
                objects.patch_node(name, patch, api)
            case DeletePod(namespace, name, grace_seconds):
                objects.delete_pod(name, namespace, grace_seconds, api)
            case DeleteNamespace(name):
                objects.delete_namespace(name, api)
            case DeleteRoleBinding(namespace, name):
                objects.delete_role_binding(name, namespace, api)
            case SetRoleBindingSubjects(binding, subjects):
                objects.set_role_binding_subjects(binding, list(subjects), api)
            case PatchStatus(plural, name, patch):
                patch_cluster_status(plural, name, patch, api)
            case AddAllocationFinalizer(allocation, finalizer, has_any):
                objects.add_allocation_finalizer(allocation, finalizer, has_any, api)
            case RemoveAllocationFinalizer(allocation, finalizer, finalizers):
                objects.remove_allocation_finalizer(allocation, finalizer, list(finalizers), api)
            case SuspendAllocation(allocation):
                objects.suspend_allocation(allocation, api)
            case AnnotateAllocation(allocation, key, value):
                objects.annotate_allocation(allocation, key, value, api)
            case PostEvent(kind, name, uid, reason, message, event_type):
                objects.post_event(kind, name, uid, reason, message, event_type, api=api)
            case CreateUsage(record):
                usage.create_usage(record, api)
            case WriteUsageLedger(name, ledger, dropped_pods, labels):
                usage.write_usage_ledger(name, ledger, dropped_pods, labels, api)
            case CreatePoolUsage(record):
                usage.create_pool_usage(record, api)
            case WritePoolLedger(name, ledger, labels):
                usage.write_pool_ledger(name, ledger, labels, api)
            case ReleasePod(namespace, name, uid, finalizer_index):
                usage.release_pod(namespace, name, uid, finalizer_index, api)


class CrashAfterWriter:
    def __init__(self, inner: ClusterWriter, kind: str, text: str) -> None:
        self.inner, self.kind, self.text = inner, kind, text

    def perform(self, action: Action) -> None:
        self.inner.perform(action)
        if type(action).__name__ == self.kind and self.text in repr(action):
            logger.critical("crash point: exiting right after %s for %s", self.kind, self.text)
            logging.shutdown()
            os._exit(137)


def cluster_writer(api: ApiClient | None = None) -> ClusterWriter:
    """The API server's writer, through `api`; with GPUAAS_CRASH_AFTER set, one that crashes at that point."""
    crash_after = os.environ.get(CRASH_AFTER_ENV, "")
    if not crash_after:
        return KubernetesWriter(api)
    kind, _, text = crash_after.partition(":")
    return CrashAfterWriter(KubernetesWriter(api), kind, text)
