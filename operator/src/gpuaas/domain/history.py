"""Grant history: who changed an allocation, when, and how, kept with the ledger so it outlives the allocation.

Only admission sees who asked. The mutating webhook describes each change to an allocation's spec (create, GPUs,
window, suspend and resume, priority, and any other field) and stamps it on the allocation in the annotation
`gpuaas.io/recent-changes` (the latest ten, each with a digest of the spec it led to). The validating webhook stamps
a DELETE in `gpuaas.io/delete-requested`. The pool pass then copies each stamp, once, into the GpuUsage record of
the month it happened in (`ledger.history`), where backups keep it and the report reads it.

A spec that the latest stamp does not describe was changed without the webhook seeing it (it was down, or a write
went around it): that change is recorded too, by "unknown", so the history never silently skips one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from gpuaas.api.usage import GrantChange

RECENT_CHANGES_ANNOTATION = "gpuaas.io/recent-changes"
# Enough that no change is lost between two passes (a pass runs every few seconds); older ones are in the ledger.
RECENT_CHANGES_KEPT = 10
DELETE_REQUESTED_ANNOTATION = "gpuaas.io/delete-requested"
HISTORY_ANNOTATIONS = (RECENT_CHANGES_ANNOTATION, DELETE_REQUESTED_ANNOTATION)
UNKNOWN_REQUESTER = "unknown"
CREATED = "created"  # the first word of a create's description
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
        window, tenant = new.get("window") or {}, (new.get("tenant") or {}).get("name")
        return [
            f"{CREATED}: {new.get('gpus')} GPUs of pool {new.get('pool')} for {tenant}, "
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


def is_creation(change: GrantChange) -> bool:
    """Whether the change is the allocation's create (as the webhook stamped it)."""
    return change.changes[0].split(":", 1)[0] == CREATED


def stamp(spec: Mapping[str, Any], by: str, at: datetime, changes: Sequence[str]) -> dict[str, Any]:
    """One change as the annotation lists it: what, who asked, when, and the digest of the spec it led to."""
    return {"at": at.isoformat(), "by": by, "changes": list(changes), "spec": spec_digest(spec)}


def stamps_text(stamps: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps(list(stamps), ensure_ascii=False, sort_keys=True)


def _json(text: str | None) -> Any:
    """An annotation's JSON; None when absent or not JSON (stamps edited by hand while the webhook was down)."""
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _stamps(text: str | None) -> list[dict[str, Any]]:
    value = _json(text)
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _parsed(text: str | None) -> dict[str, Any] | None:
    value = _json(text)
    return value if isinstance(value, dict) else None


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
        # Appended to the stamps gpuaas wrote before (never to what the request sent): passes record them all,
        # even when several changes come between two passes.
        earlier = _stamps(old_annotations.get(RECENT_CHANGES_ANNOTATION))
        stamps = [*earlier, stamp(new_spec, by, at, changes)][-RECENT_CHANGES_KEPT:]
        result[RECENT_CHANGES_ANNOTATION] = stamps_text(stamps)
    return result


def _change(item: Mapping[str, Any]) -> GrantChange | None:
    try:
        return GrantChange.model_validate({"at": item.get("at"), "by": item.get("by"), "changes": item.get("changes")})
    except ValidationError:
        return None


def stamped_changes(
    annotations: Mapping[str, str], spec: Mapping[str, Any], deletion: datetime | None, now: datetime
) -> list[GrantChange]:
    """The history entries an allocation's stamps stand for: its recent changes and, once it is being deleted, the
    deletion. A spec that the latest stamp does not describe was changed unseen: that change is dated `now` (seen
    now, made earlier) and named by the spec's digest."""
    stamps = _stamps(annotations.get(RECENT_CHANGES_ANNOTATION))
    entries = [change for item in stamps if (change := _change(item)) is not None]
    if not stamps or stamps[-1].get("spec") != spec_digest(spec):
        unseen = (
            f"spec {spec_digest(spec)} not stamped by gpuaas's webhook (changed while it was unavailable, or before "
            "grant history was kept)"
        )
        entries.append(GrantChange(at=now, by=UNKNOWN_REQUESTER, changes=[unseen]))
    if deletion is not None:
        # A stamp that does not parse must not hold up the release: the deletion is then nobody's, at its timestamp.
        requested = _parsed(annotations.get(DELETE_REQUESTED_ANNOTATION)) or {}
        at, by = requested.get("at") or deletion, requested.get("by") or UNKNOWN_REQUESTER
        stamped = _change({"at": at, "by": by, "changes": ["deleted"]})
        entries.append(stamped or GrantChange(at=deletion, by=UNKNOWN_REQUESTER, changes=["deleted"]))
    return entries
