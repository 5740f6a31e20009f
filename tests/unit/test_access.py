"""Who may hold rights in a tenant namespace: owners and the namespace's own ServiceAccounts, nobody once released."""

from __future__ import annotations

from gpuaas.domain.access import allowed_subjects, binding_problems

ALICE = {"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}
BOB = {"kind": "User", "name": "bob", "apiGroup": "rbac.authorization.k8s.io"}
EVERYONE = {"kind": "Group", "name": "system:authenticated", "apiGroup": "rbac.authorization.k8s.io"}
LOCAL_SA = {"kind": "ServiceAccount", "name": "ci", "namespace": "lab"}
FOREIGN_SA = {"kind": "ServiceAccount", "name": "ci", "namespace": "other"}


def test_owners_and_local_service_accounts_are_kept() -> None:
    subjects = [ALICE, BOB, EVERYONE, LOCAL_SA, FOREIGN_SA]
    assert allowed_subjects(subjects, [ALICE], "lab") == [ALICE, LOCAL_SA]
    assert allowed_subjects(subjects, [ALICE, BOB, FOREIGN_SA], "lab") == [ALICE, BOB, LOCAL_SA, FOREIGN_SA]


def test_a_released_namespace_keeps_no_one() -> None:
    assert allowed_subjects([ALICE, LOCAL_SA], None, "lab") == []
    assert "was released" in binding_problems({"subjects": [LOCAL_SA]}, None, "lab")[0]


def test_bindings_naming_others_are_refused_with_who() -> None:
    problems = binding_problems({"subjects": [ALICE, BOB, EVERYONE]}, [ALICE], "lab")
    assert len(problems) == 1
    assert "User bob, Group system:authenticated" in problems[0]
    assert binding_problems({"subjects": [ALICE, LOCAL_SA]}, [ALICE], "lab") == []
    assert binding_problems({}, [ALICE], "lab") == []
