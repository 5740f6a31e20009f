"""Grant history: what the webhooks stamp, what the stamps stand for, and how the ledger keeps them once."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from gpuaas.api.usage import GpuUsage, GrantChange
from gpuaas.domain.actions import CreateUsage, PostEvent, WriteUsageLedger
from gpuaas.domain.booking import WrittenLedger, plan_booking
from gpuaas.domain.history import (
    DELETE_REQUESTED_ANNOTATION,
    RECENT_CHANGES_ANNOTATION,
    RECENT_CHANGES_KEPT,
    UNKNOWN_REQUESTER,
    delete_stamp,
    describe_spec_change,
    needs_delete_stamp,
    spec_digest,
    stamp,
    stamp_annotations,
    stamped_changes,
    stamps_text,
)
from gpuaas.domain.ledger import GrantState
from tests.builders import NOW, usage_identity

SPEC: dict[str, Any] = {
    "tenant": {"name": "kaist-nlp", "organization": "KAIST"},
    "pool": "h200-a",
    "gpus": 8,
    "window": {"start": "2026-11-01T00:00:00+09:00", "end": "2027-01-01T00:00:00+09:00"},
}


def allocation(spec: dict[str, Any], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "kaist-nlp", "annotations": annotations or {}}, "spec": spec}


def test_each_kind_of_change_is_described() -> None:
    assert describe_spec_change(None, SPEC) == [
        "created: 8 GPUs of pool h200-a for kaist-nlp, window 2026-11-01T00:00:00+09:00 to 2027-01-01T00:00:00+09:00"
    ]
    longer = {**SPEC, "gpus": 16, "window": {**SPEC["window"], "end": "2027-02-01T00:00:00+09:00"}}
    assert describe_spec_change(SPEC, longer) == [
        "gpus 8 -> 16",
        "window end 2027-01-01T00:00:00+09:00 -> 2027-02-01T00:00:00+09:00",
    ]
    suspended = {**SPEC, "suspend": True, "priority": 10}
    assert describe_spec_change(SPEC, suspended) == ["suspended", "priority 0 -> 10"]
    assert describe_spec_change(suspended, SPEC) == ["resumed", "priority 10 -> 0"]
    owners = {**SPEC, "owners": [{"kind": "User", "name": "bob"}]}
    assert describe_spec_change(SPEC, owners) == ['owners None -> [{"kind": "User", "name": "bob"}]']
    assert describe_spec_change(SPEC, dict(SPEC)) == []


def stamps_of(annotations: dict[str, str | None]) -> list[dict[str, Any]]:
    value: list[dict[str, Any]] = json.loads(annotations[RECENT_CHANGES_ANNOTATION] or "")
    return value


def test_a_create_and_each_change_are_stamped_with_who_asked() -> None:
    created = stamp_annotations(None, allocation(SPEC), "program-office", False, NOW)
    assert stamps_of(created) == [
        {"at": NOW.isoformat(), "by": "program-office", "changes": describe_spec_change(None, SPEC)}
        | {"spec": spec_digest(SPEC)}
    ]
    resized_spec = {**SPEC, "gpus": 4}
    old = allocation(SPEC, {RECENT_CHANGES_ANNOTATION: created[RECENT_CHANGES_ANNOTATION] or ""})
    resized = stamp_annotations(old, allocation(resized_spec), "officer-kim", False, NOW + timedelta(seconds=1))
    # Appended: a pass that comes after both changes still records the first one.
    assert [(item["by"], item["changes"]) for item in stamps_of(resized)] == [
        ("program-office", describe_spec_change(None, SPEC)),
        ("officer-kim", ["gpus 8 -> 4"]),
    ]
    assert [
        change.by
        for change in stamped_changes(
            {RECENT_CHANGES_ANNOTATION: resized[RECENT_CHANGES_ANNOTATION] or ""}, resized_spec, None, NOW
        )
    ] == ["program-office", "officer-kim"]


def test_only_the_latest_changes_are_kept_on_the_allocation() -> None:
    current: dict[str, str] = {}
    spec = SPEC
    for gpus in range(9, 9 + RECENT_CHANGES_KEPT + 3):
        changed = {**spec, "gpus": gpus}
        current = {
            RECENT_CHANGES_ANNOTATION: stamp_annotations(
                allocation(spec, current), allocation(changed), "k", False, NOW
            )[RECENT_CHANGES_ANNOTATION]
            or ""
        }
        spec = changed
    stamps = json.loads(current[RECENT_CHANGES_ANNOTATION])
    assert len(stamps) == RECENT_CHANGES_KEPT
    assert stamps[-1]["changes"] == [f"gpus {spec['gpus'] - 1} -> {spec['gpus']}"]


def test_nobody_but_gpuaas_writes_the_stamps() -> None:
    old = allocation(SPEC, {RECENT_CHANGES_ANNOTATION: "real"})
    forged = allocation(SPEC, {RECENT_CHANGES_ANNOTATION: "forged", DELETE_REQUESTED_ANNOTATION: "forged"})
    assert stamp_annotations(old, forged, "someone", False, NOW) == {
        RECENT_CHANGES_ANNOTATION: "real",
        DELETE_REQUESTED_ANNOTATION: None,
    }
    # On a create, the webhook's own stamp replaces a forged one.
    on_create = stamp_annotations(None, forged, "someone", False, NOW)
    assert on_create[DELETE_REQUESTED_ANNOTATION] is None
    assert [item["by"] for item in stamps_of(on_create)] == ["someone"]
    # gpuaas's own delete stamp goes through.
    mine = allocation(SPEC, {RECENT_CHANGES_ANNOTATION: "real", DELETE_REQUESTED_ANNOTATION: "x"})
    assert stamp_annotations(old, mine, "gpuaas", True, NOW) == {}


def test_a_stamp_stands_for_the_spec_it_describes_only() -> None:
    stamped = {RECENT_CHANGES_ANNOTATION: stamps_text([stamp(SPEC, "program-office", NOW, ["gpus 4 -> 8"])])}
    assert stamped_changes(stamped, SPEC, None, NOW + timedelta(hours=1)) == [
        GrantChange(at=NOW, by="program-office", changes=["gpus 4 -> 8"])
    ]
    # The spec moved on without the webhook: the change is recorded, by nobody known, when it was seen.
    *_, unseen = stamped_changes(stamped, {**SPEC, "gpus": 16}, None, NOW + timedelta(hours=1))
    assert (unseen.by, unseen.at) == (UNKNOWN_REQUESTER, NOW + timedelta(hours=1))
    assert spec_digest({**SPEC, "gpus": 16}) in unseen.changes[0]
    # An allocation from before grant history: one unattributed entry.
    (before,) = stamped_changes({}, SPEC, None, NOW)
    assert before.by == UNKNOWN_REQUESTER


def test_a_deletion_names_who_asked_or_says_nobody_knows() -> None:
    stamps = {
        RECENT_CHANGES_ANNOTATION: stamps_text([stamp(SPEC, "program-office", NOW, ["created"])]),
        DELETE_REQUESTED_ANNOTATION: delete_stamp("officer-kim", NOW + timedelta(days=3)),
    }
    deleting = NOW + timedelta(days=3, seconds=1)
    assert stamped_changes(stamps, SPEC, deleting, deleting)[1] == GrantChange(
        at=NOW + timedelta(days=3), by="officer-kim", changes=["deleted"]
    )
    del stamps[DELETE_REQUESTED_ANNOTATION]
    assert stamped_changes(stamps, SPEC, deleting, deleting)[1] == GrantChange(
        at=deleting, by=UNKNOWN_REQUESTER, changes=["deleted"]
    )


def book(changes: list[GrantChange], ledger: WrittenLedger, indexed: dict[str, GpuUsage] | None = None) -> Any:
    return plan_booking(
        usage_identity(),
        indexed or {},
        ledger,
        [],
        GrantState(gpus=0, active_from=NOW),
        NOW,
        "UTC",
        timedelta(hours=1),
        changes=changes,
    )


def test_each_change_is_kept_once_in_the_record_of_its_month() -> None:
    earlier = GrantChange(at=NOW - timedelta(days=40), by="program-office", changes=["created"])
    latest = GrantChange(at=NOW, by="officer-kim", changes=["gpus 8 -> 16"])
    plan = book([earlier, latest], WrittenLedger(last_write=NOW))  # not due: history is written at once all the same
    created = {action.record.spec.month: action.record for action in plan.actions if isinstance(action, CreateUsage)}
    assert sorted(created) == ["2026-10", "2026-11"]
    assert created["2026-10"].ledger.history == [earlier]
    assert created["2026-11"].ledger.history == [latest]
    # An event for each change but the create, which the allocation's first phase event marks.
    events = [action for action in plan.actions if isinstance(action, PostEvent)]
    assert [event.message for event in events] == ["officer-kim: gpus 8 -> 16"]
    # Booked again with what was written: nothing more to write, and no second event.
    again = book([earlier, latest], WrittenLedger(records=dict(created), last_write=NOW))
    assert [a for a in again.actions if isinstance(a, CreateUsage | WriteUsageLedger | PostEvent)] == []


def test_an_unattributed_change_is_kept_once_whenever_it_is_seen() -> None:
    seen = GrantChange(at=NOW, by=UNKNOWN_REQUESTER, changes=["spec abc not stamped"])
    first = book([seen], WrittenLedger(last_write=NOW))
    (record,) = [action.record for action in first.actions if isinstance(action, CreateUsage)]
    later = GrantChange(at=NOW + timedelta(minutes=5), by=UNKNOWN_REQUESTER, changes=["spec abc not stamped"])
    again = book([later], WrittenLedger(records={"2026-11": record}, last_write=NOW))
    assert [a for a in again.actions if isinstance(a, CreateUsage | WriteUsageLedger)] == []


def test_a_delete_is_stamped_once_per_requester() -> None:
    """The stamp is a write to the object being deleted: the API server retries the delete and asks again."""
    assert needs_delete_stamp({}, "officer-kim")
    stamped = {DELETE_REQUESTED_ANNOTATION: delete_stamp("officer-kim", NOW)}
    assert not needs_delete_stamp(stamped, "officer-kim")
    assert needs_delete_stamp(stamped, "officer-lee")  # someone else deletes after a refused attempt


def test_a_delete_stamp_that_does_not_parse_never_holds_up_the_release() -> None:
    deleting = NOW + timedelta(days=3)
    stamps = {
        RECENT_CHANGES_ANNOTATION: stamps_text([stamp(SPEC, "program-office", NOW, ["created"])]),
        DELETE_REQUESTED_ANNOTATION: json.dumps({"at": "yesterday", "by": "officer-kim"}),
    }
    assert stamped_changes(stamps, SPEC, deleting, deleting)[-1] == GrantChange(
        at=deleting, by=UNKNOWN_REQUESTER, changes=["deleted"]
    )


def test_a_stamped_create_posts_no_event_but_a_spec_changed_unseen_does() -> None:
    """The create's first phase event (Active, Queued...) marks it; a spec no stamp describes is worth a warning."""
    created = GrantChange(at=NOW, by="program-office", changes=describe_spec_change(None, SPEC))
    (unseen,) = stamped_changes({}, SPEC, None, NOW + timedelta(minutes=1))
    plan = book([created, unseen], WrittenLedger(last_write=NOW))
    (record,) = [action.record for action in plan.actions if isinstance(action, CreateUsage)]
    assert record.ledger.history == [created, unseen]
    events = [action for action in plan.actions if isinstance(action, PostEvent)]
    assert [event.message for event in events] == [f"{UNKNOWN_REQUESTER}: {unseen.changes[0]}"]
