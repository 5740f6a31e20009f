"""Grant history: who changed an allocation, when, and how, kept with the ledger so it outlives the allocation.

Only admission sees who asked. The mutating webhook describes each change to an allocation's spec (create, GPUs,
window, suspend and resume, priority, and any other field) and stamps it on the allocation in the annotation
`gpuaas.io/last-change`, with a digest of the spec it describes. A DELETE is stamped by the validating webhook in
`gpuaas.io/delete-requested`. The pool pass then copies each stamp, once, into the GpuUsage record of the month it
happened in (`ledger.history`), where backups keep it and the report reads it.

A spec whose digest differs from the stamp's was changed without the webhook seeing it (it was down, or a write went
around it): that change is recorded too, by "unknown", so the history never silently skips one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from gpuaas.api.usage import GrantChange

LAST_CHANGE_ANNOTATION = "gpuaas.io/last-change"
DELETE_REQUESTED_ANNOTATION = "gpuaas.io/delete-requested"
HISTORY_ANNOTATIONS = (LAST_CHANGE_ANNOTATION, DELETE_REQUESTED_ANNOTATION)
UNKNOWN_REQUESTER = "unknown"
# The spec fields a person reads first, in this order; any other changed field is named by its path.
_NAMED_FIELDS = ("gpus", "window", "suspend", "priority")


def spec_digest(spec: Mapping[str, Any]) -> str:
    """A short digest of the spec's canonical JSON: which spec a stamp describes."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _text(value: object) -> str:
    return (
        json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
        if isinstance(value, dict | list)
        else str(value)
    )


def describe_spec_change(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """What changed from `old` to `new` in words; `old` None is a create. Empty: nothing in the spec changed."""
    if old is None:
        window = new.get("window") or {}
        return [
            f"created: {new.get('gpus')} GPUs of pool {new.get('pool')} for {((new.get('tenant') or {}).get('name'))}, "
            f"window {window.get('start')} to {window.get('end')}"
        ]
    changes: list[str] = []
    if old.get("gpus") != new.get("gpus"):
        changes.append(f"gpus {old.get('gpus')} -> {new.get('gpus')}")
    old_window, new_window = old.get("window") or {}, new.get("window") or {}
    for bound in ("start", "end"):
        if old_window.get(bound) != new_window.get(bound):
            changes.append(f"window {bound} {old_window.get(bound)} -> {new_window.get(bound)}")
    if bool(old.get("suspend")) != bool(new.get("suspend")):
        changes.append("suspended" if new.get("suspend") else "resumed")
    if (old.get("priority") or 0) != (new.get("priority") or 0):
        changes.append(f"priority {old.get('priority') or 0} -> {new.get('priority') or 0}")
    for key in sorted(set(old) | set(new)):
        if key not in _NAMED_FIELDS and old.get(key) != new.get(key):
            changes.append(f"{key} {_text(old.get(key))} -> {_text(new.get(key))}")
    return changes


def stamp(spec: Mapping[str, Any], by: str, at: datetime, changes: Sequence[str]) -> str:
    """The annotation's value: the change, who asked, when, and the digest of the spec it led to."""
    return json.dumps(
        {"at": at.isoformat(), "by": by, "changes": list(changes), "spec": spec_digest(spec)},
        ensure_ascii=False,
        sort_keys=True,
    )


def delete_stamp(by: str, at: datetime) -> str:
    return json.dumps({"at": at.isoformat(), "by": by}, sort_keys=True)


def needs_delete_stamp(annotations: Mapping[str, str], by: str) -> bool:
    """Whether a DELETE by `by` must stamp. Writing the object makes the API server retry the delete, and with it
    this webhook: the retry finds its own stamp and lets the delete through (stamping again would never end)."""
    current = _parsed(annotations.get(DELETE_REQUESTED_ANNOTATION))
    return current is None or current.get("by") != by


def stamp_annotations(
    old: Mapping[str, Any] | None, new: Mapping[str, Any], by: str, by_operator: bool, at: datetime
) -> dict[str, str | None]:
    """What the mutating webhook sets in an allocation's annotations on a create (`old` None) or an update: the
    stamp of a spec change, and, since only gpuaas writes stamps, anyone else's edit of them undone (None removes)."""
    old_annotations = ((old or {}).get("metadata") or {}).get("annotations") or {}
    new_annotations = (new.get("metadata") or {}).get("annotations") or {}
    result: dict[str, str | None] = {}
    if not by_operator:
        for key in HISTORY_ANNOTATIONS:
            if new_annotations.get(key) != old_annotations.get(key):
                result[key] = old_annotations.get(key)
    new_spec = new.get("spec") or {}
    changes = describe_spec_change(None if old is None else old.get("spec") or {}, new_spec)
    if changes:
        result[LAST_CHANGE_ANNOTATION] = stamp(new_spec, by, at, changes)
    return result


def _parsed(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def stamped_changes(
    annotations: Mapping[str, str], spec: Mapping[str, Any], deletion: datetime | None, now: datetime
) -> list[GrantChange]:
    """The history entries an allocation's stamps stand for: its latest change and, once it is being deleted, the
    deletion. `now` dates a change no stamp describes (seen now, made earlier)."""
    entries: list[GrantChange] = []
    last = _parsed(annotations.get(LAST_CHANGE_ANNOTATION))
    described = None
    if last is not None:
        try:
            described = GrantChange.model_validate(
                {"at": last.get("at"), "by": last.get("by"), "changes": last.get("changes")}
            )
        except ValidationError:
            described = None
    if described is not None and last is not None and last.get("spec") == spec_digest(spec):
        entries.append(described)
    else:
        entries.append(
            GrantChange(
                at=now, by=UNKNOWN_REQUESTER, changes=[f"spec changed to {spec_digest(spec)} unseen by the webhook"]
            )
        )
    if deletion is not None:
        requested = _parsed(annotations.get(DELETE_REQUESTED_ANNOTATION)) or {}
        by = str(requested.get("by") or UNKNOWN_REQUESTER)
        at = requested.get("at") or deletion.isoformat()
        entries.append(GrantChange.model_validate({"at": at, "by": by, "changes": ["deleted"]}))
    return entries
