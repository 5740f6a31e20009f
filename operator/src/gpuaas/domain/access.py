"""Who may hold rights in a tenant namespace, whatever RoleBindings the tenant writes itself.

The program office lists the owners (spec.owners); gpuaas binds them to `admin`. An owner may share rights, but only
with other owners and with the namespace's own ServiceAccounts: a binding to anyone else would outlive that person's
removal from the owners, or the grant itself. When the owners change, tenant bindings lose the subjects no longer
allowed; when the allocation is released, they lose all of them (the namespace and its data stay).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

SubjectKey = tuple[str, str, str]


@dataclass(frozen=True)
class TenantBinding:
    """A RoleBinding in a tenant namespace that gpuaas did not write."""

    namespace: str
    name: str
    resource_version: str
    subjects: tuple[Mapping[str, Any], ...]


def subject_key(subject: Mapping[str, Any]) -> SubjectKey:
    kind = str(subject.get("kind", ""))
    return kind, str(subject.get("name", "")), str(subject.get("namespace") or "") if kind == "ServiceAccount" else ""


def is_allowed(subject: Mapping[str, Any], owners: Iterable[Mapping[str, Any]], namespace: str) -> bool:
    key = subject_key(subject)
    if key[0] == "ServiceAccount" and key[2] == namespace:
        return True
    return key in {subject_key(owner) for owner in owners}


def allowed_subjects(
    subjects: Iterable[Mapping[str, Any]], owners: Iterable[Mapping[str, Any]] | None, namespace: str
) -> list[Mapping[str, Any]]:
    """The subjects a tenant binding keeps; `owners` None means the allocation is released: none."""
    if owners is None:
        return []
    owner_list = list(owners)
    return [subject for subject in subjects if is_allowed(subject, owner_list, namespace)]


def binding_problems(
    binding: Mapping[str, Any], owners: Iterable[Mapping[str, Any]] | None, namespace: str
) -> list[str]:
    """Why a tenant may not write this RoleBinding; empty when every subject is an owner or a local ServiceAccount."""
    subjects = list(binding.get("subjects") or [])
    kept = allowed_subjects(subjects, owners, namespace)
    refused = [subject for subject in subjects if subject not in kept]
    if not refused:
        return []
    names = ", ".join(f"{s.get('kind')} {s.get('name')}" for s in refused)
    if owners is None:
        return [f"the GpuAllocation of namespace {namespace} was released: no one may be granted rights here ({names})"]
    return [
        f"subjects {names}: in a gpuaas namespace, rights may be shared only with the allocation's owners and with "
        f"ServiceAccounts of {namespace}; ask the program office to add them to spec.owners"
    ]
