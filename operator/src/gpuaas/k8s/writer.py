"""The writer port: every API write of a pool pass (and of the webhooks' delete stamp) goes through
`ClusterWriter.perform`.

`KubernetesWriter` is the real one. Unit tests of the executor and the ledger writer use a recording fake; the
integration tests keep the real API server.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

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
    def perform(self, action: Action) -> None:
        match action:
            case ApplyObject(manifest):
                objects.apply(manifest)
            case PatchNode(name, patch):
                objects.patch_node(name, patch)
            case DeletePod(namespace, name, grace_seconds):
                objects.delete_pod(name, namespace, grace_seconds)
            case DeleteNamespace(name):
                objects.delete_namespace(name)
            case DeleteRoleBinding(namespace, name):
                objects.delete_role_binding(name, namespace)
            case SetRoleBindingSubjects(binding, subjects):
                objects.set_role_binding_subjects(binding, list(subjects))
            case PatchStatus(plural, name, patch):
                patch_cluster_status(plural, name, patch)
            case AddAllocationFinalizer(allocation, finalizer, has_any):
                objects.add_allocation_finalizer(allocation, finalizer, has_any)
            case RemoveAllocationFinalizer(allocation, finalizer, finalizers):
                objects.remove_allocation_finalizer(allocation, finalizer, list(finalizers))
            case SuspendAllocation(allocation):
                objects.suspend_allocation(allocation)
            case AnnotateAllocation(allocation, key, value):
                objects.annotate_allocation(allocation, key, value)
            case PostEvent(kind, name, uid, reason, message, event_type):
                objects.post_event(kind, name, uid, reason, message, event_type)
            case CreateUsage(record):
                usage.create_usage(record)
            case WriteUsageLedger(name, ledger, dropped_pods, labels):
                usage.write_usage_ledger(name, ledger, dropped_pods, labels)
            case CreatePoolUsage(record):
                usage.create_pool_usage(record)
            case WritePoolLedger(name, ledger, labels):
                usage.write_pool_ledger(name, ledger, labels)
            case ReleasePod(namespace, name):
                usage.release_pod(namespace, name)


class CrashAfterWriter:
    def __init__(self, inner: ClusterWriter, kind: str, text: str) -> None:
        self.inner, self.kind, self.text = inner, kind, text

    def perform(self, action: Action) -> None:
        self.inner.perform(action)
        if type(action).__name__ == self.kind and self.text in repr(action):
            logger.critical("crash point: exiting right after %s for %s", self.kind, self.text)
            logging.shutdown()
            os._exit(137)


def cluster_writer() -> ClusterWriter:
    """The API server's writer; with GPUAAS_CRASH_AFTER set, one that crashes at that point."""
    crash_after = os.environ.get(CRASH_AFTER_ENV, "")
    if not crash_after:
        return KubernetesWriter()
    kind, _, text = crash_after.partition(":")
    return CrashAfterWriter(KubernetesWriter(), kind, text)
