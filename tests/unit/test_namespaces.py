"""The namespace-claim rules, one home for the webhook and the pass; and what a terminating namespace says."""

from __future__ import annotations

from gpuaas.domain.namespaces import NamespaceClaim, namespace_problem, terminating_namespace

STUCK = {
    "metadata": {"name": "lab", "deletionTimestamp": "2026-11-30T10:00:00Z"},
    "status": {
        "phase": "Terminating",
        "conditions": [
            {"type": "NamespaceDeletionDiscoveryFailure", "status": "False", "reason": "ResourcesDiscovered"},
            {
                "type": "NamespaceFinalizersRemaining",
                "status": "True",
                "reason": "SomeFinalizersRemain",
                "message": "Some content in the namespace has finalizers remaining: example.com/never-released in "
                "1 resource instances",
            },
        ],
    },
}


def test_a_terminating_namespace_says_what_holds_it() -> None:
    terminating = terminating_namespace(STUCK)
    assert terminating is not None
    assert terminating.since == "2026-11-30T10:00:00Z"
    assert "example.com/never-released" in terminating.holding
    assert "ResourcesDiscovered" not in terminating.holding  # only conditions that hold it
    assert terminating_namespace({"metadata": {"name": "lab"}}) is None


def test_a_new_grant_hears_what_is_really_in_the_way() -> None:
    terminating = terminating_namespace(STUCK)
    old_labels = {"gpuaas.io/allocation": "lab-2025"}
    reason, message = namespace_problem("lab-2026", "lab", [], old_labels, terminating) or ("", "")
    assert reason == "NamespaceTerminating"
    assert "still being deleted" in message
    assert "example.com/never-released" in message
    # The allocation whose own namespace is terminating is not told it is in its own way.
    assert namespace_problem("lab-2025", "lab", [NamespaceClaim("t", "lab-2025")], old_labels, terminating) is None


def test_the_oldest_claim_owns_the_namespace() -> None:
    older, newer = NamespaceClaim("2026-01-01T00:00:00Z", "a"), NamespaceClaim("2026-02-01T00:00:00Z", "b")
    assert namespace_problem("a", "lab", [older, newer], None, None) is None
    assert namespace_problem("b", "lab", [older, newer], None, None) == (
        "NamespaceClaimed",
        "namespace lab already belongs to allocation a",
    )
    assert namespace_problem("c", "lab", [older], None, None) is not None  # a new one, not in the index yet


def test_existing_and_system_namespaces() -> None:
    assert (namespace_problem("a", "kube-system", [], None, None) or ("",))[0] == "ReservedNamespace"
    assert (namespace_problem("a", "lab", [], {"team": "x"}, None) or ("",))[0] == "NamespaceExists"
    assert (namespace_problem("a", "lab", [], {"gpuaas.io/allocation": "b"}, None) or ("",))[0] == "NamespaceClaimed"
    assert namespace_problem("a", "lab", [], {"gpuaas.io/allocation": "a"}, None) is None
