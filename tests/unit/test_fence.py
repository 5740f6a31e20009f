from __future__ import annotations

import copy
import dataclasses
from dataclasses import replace
from typing import Any

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuaas.domain.fence import (
    NO_DEVICES,
    USAGE_FINALIZER,
    VISIBLE_DEVICES_ENV,
    Fence,
    mutate_pod,
    pod_gpus,
    validate_pod,
)

POOL_SELECTOR = {"gpuaas.io/pool": "nhn-b200-a", "nvidia.com/gpu.product": "NVIDIA-B200"}
OTHER_POOLS = {
    "kakao-b200-a": {"gpuaas.io/pool": "kakao-b200-a", "nvidia.com/gpu.product": "NVIDIA-B200"},
    "naver-h200-a": {"gpuaas.io/pool": "naver-h200-a", "nvidia.com/gpu.product": "NVIDIA-H200", "zone": "naver-1"},
}
FENCE = Fence(pool="nhn-b200-a", node_selector=POOL_SELECTOR, other_pools=OTHER_POOLS)
EXCLUSIVE = Fence(
    pool="nhn-b200-a",
    node_selector=POOL_SELECTOR,
    exclusive_label=("gpuaas.io/allocation", "fm-team-a-2026"),
    other_pools=OTHER_POOLS,
)


def gpu_container(name: str = "main", requests: int | None = None, limits: int | None = None) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if requests is not None:
        resources["requests"] = {"nvidia.com/gpu": str(requests)}
    if limits is not None:
        resources["limits"] = {"nvidia.com/gpu": limits}
    return {"name": name, "image": "pytorch:25.01-py3", "resources": resources}


def make_pod(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "train-0", "namespace": "fm-team-a"},
        "spec": {"containers": [gpu_container(limits=8)], **spec},
    }


def apply_patch(document: dict[str, Any], patch: list[dict[str, Any]]) -> dict[str, Any]:
    """A minimal RFC 6902 applier for the add/replace ops the fence emits."""
    result = copy.deepcopy(document)
    for op in patch:
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
        target: Any = result
        for token in tokens[:-1]:
            target = target[int(token)] if isinstance(target, list) else target[token]
        last = tokens[-1]
        assert op["op"] in ("add", "replace")
        if isinstance(target, list):
            assert last == "-"
            target.append(op["value"])
        else:
            if op["op"] == "replace":
                assert last in target
            target[last] = op["value"]
    return result


# --- pod_gpus -------------------------------------------------------------------------------------


def test_gpu_request_defaults_to_the_limit() -> None:
    assert pod_gpus(make_pod(containers=[gpu_container(limits=8)])) == 8
    assert pod_gpus(make_pod(containers=[gpu_container(requests=4, limits=4)])) == 4
    assert pod_gpus(make_pod(containers=[gpu_container(requests=2)])) == 2
    assert pod_gpus(make_pod(containers=[{"name": "cpu-only", "image": "busybox"}])) == 0


def test_app_containers_add_up_and_init_containers_take_the_max() -> None:
    pod = make_pod(
        containers=[gpu_container("a", limits=2), gpu_container("b", limits=3)],
        initContainers=[gpu_container("warmup", limits=8), gpu_container("check", limits=1)],
    )
    assert pod_gpus(pod) == 8
    pod["spec"]["initContainers"][0]["resources"]["limits"]["nvidia.com/gpu"] = 4
    assert pod_gpus(pod) == 5


def test_sidecar_init_containers_run_alongside_the_app() -> None:
    sidecar = gpu_container("sidecar", limits=1) | {"restartPolicy": "Always"}
    pod = make_pod(containers=[gpu_container(limits=4)], initContainers=[sidecar, gpu_container("late-init", limits=4)])
    # The regular init runs next to the sidecar (1 + 4); the app runs next to it too (4 + 1).
    assert pod_gpus(pod) == 5


def test_fractional_gpus_are_rejected() -> None:
    pod = make_pod(containers=[{"name": "m", "resources": {"limits": {"nvidia.com/gpu": "0.5"}}}])
    with pytest.raises(ValueError, match="whole numbers"):
        pod_gpus(pod)
    assert any("whole numbers" in p for p in validate_pod(pod, FENCE))


# --- mutation -------------------------------------------------------------------------------------


def test_mutation_pins_a_bare_pod_to_the_pool_and_adds_the_finalizer() -> None:
    pod = make_pod()
    patch = mutate_pod(pod, FENCE)
    assert {"op": "add", "path": "/spec/nodeSelector", "value": POOL_SELECTOR} in patch
    assert {
        "op": "add",
        "path": "/spec/tolerations",
        "value": [{"key": "gpuaas.io/pool", "operator": "Equal", "value": "nhn-b200-a", "effect": "NoSchedule"}],
    } in patch
    assert {"op": "add", "path": "/metadata/finalizers", "value": [USAGE_FINALIZER]} in patch
    mutated = apply_patch(pod, patch)
    assert mutated["spec"]["nodeSelector"] == POOL_SELECTOR
    assert validate_pod(mutated, FENCE) == []
    assert mutate_pod(mutated, FENCE) == []


def test_mutation_overwrites_conflicting_selector_entries_and_keeps_the_tenants_own() -> None:
    pod = make_pod(
        nodeSelector={"gpuaas.io/pool": "kakao-b200-a", "team/rack": "r7"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    )
    pod["metadata"]["finalizers"] = ["example.com/keep"]
    patch = mutate_pod(pod, FENCE)
    mutated = apply_patch(pod, patch)
    assert mutated["spec"]["nodeSelector"] == {**POOL_SELECTOR, "team/rack": "r7"}
    assert mutated["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert mutated["spec"]["tolerations"][1]["value"] == "nhn-b200-a"
    assert mutated["metadata"]["finalizers"] == ["example.com/keep", USAGE_FINALIZER]
    assert {"op": "replace", "path": "/spec/nodeSelector/gpuaas.io~1pool", "value": "nhn-b200-a"} in patch
    assert validate_pod(mutated, FENCE) == []


def test_cpu_only_pods_get_no_finalizer() -> None:
    pod = make_pod(containers=[{"name": "notebook", "image": "jupyter"}])
    assert not any(op["path"].startswith("/metadata/finalizers") for op in mutate_pod(pod, FENCE))


def test_exclusive_fence_adds_the_allocation_label_and_toleration() -> None:
    mutated = apply_patch(make_pod(), mutate_pod(make_pod(), EXCLUSIVE))
    assert mutated["spec"]["nodeSelector"]["gpuaas.io/allocation"] == "fm-team-a-2026"
    tolerated = {(t["key"], t["value"]) for t in mutated["spec"]["tolerations"]}
    assert tolerated == {("gpuaas.io/pool", "nhn-b200-a"), ("gpuaas.io/allocation", "fm-team-a-2026")}
    assert validate_pod(mutated, EXCLUSIVE) == []


def test_an_existing_exact_toleration_is_not_duplicated() -> None:
    pod = make_pod(tolerations=[{"key": "gpuaas.io/pool", "value": "nhn-b200-a", "effect": "NoSchedule"}])
    assert not any("tolerations" in op["path"] for op in mutate_pod(pod, FENCE))


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"nodeName": "nhn-b200-a-0001"}, "spec.nodeName"),
        ({"tolerations": [{"operator": "Exists"}]}, "tolerates every taint"),
        ({"tolerations": [{"key": "gpuaas.io/pool", "operator": "Exists"}]}, "with any value"),
        ({"tolerations": [{"key": "gpuaas.io/pool", "value": "kakao-b200-a"}]}, "gpuaas.io/pool=kakao-b200-a"),
        ({"tolerations": [{"key": "gpuaas.io/allocation", "value": "someone"}]}, "node reservation"),
        ({"nodeSelector": {"gpuaas.io/pool": "kakao-b200-a"}}, "contradicts the fence"),
        ({"nodeSelector": {"zone": "naver-1"}}, "targets pool naver-h200-a"),
        ({"nodeSelector": {"gpuaas.io/allocation": "someone"}}, "reserved for another allocation"),
    ],
)
def test_escapes_are_rejected_with_a_clear_message(spec: dict[str, Any], fragment: str) -> None:
    problems = validate_pod(make_pod(**spec), FENCE)
    assert len(problems) == 1, problems
    assert fragment in problems[0]


def affinity(operator: str, values: list[str], key: str = "gpuaas.io/pool", preferred: bool = False) -> dict[str, Any]:
    expression = {"key": key, "operator": operator, "values": values}
    if preferred:
        return {
            "nodeAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 10, "preference": {"matchExpressions": [expression]}}
                ]
            }
        }
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [expression]}]
            }
        }
    }


@pytest.mark.parametrize(
    "node_affinity",
    [
        affinity("In", ["kakao-b200-a"]),
        affinity("In", ["nhn-b200-a", "kakao-b200-a"]),
        affinity("NotIn", ["nhn-b200-a"]),
        affinity("DoesNotExist", []),
        affinity("Exists", []),
        affinity("In", ["kakao-b200-a"], preferred=True),
        affinity("In", ["NVIDIA-H200"], key="nvidia.com/gpu.product"),
        affinity("In", ["naver-1"], key="zone"),
    ],
)
def test_affinity_on_fence_keys_is_rejected(node_affinity: dict[str, Any]) -> None:
    problems = validate_pod(make_pod(affinity=node_affinity), FENCE)
    assert len(problems) == 1
    assert "pinned to pool nhn-b200-a" in problems[0]


def test_affinity_selecting_exactly_this_pool_or_unrelated_labels_is_fine() -> None:
    assert validate_pod(make_pod(affinity=affinity("In", ["nhn-b200-a"])), FENCE) == []
    assert validate_pod(make_pod(affinity=affinity("In", ["r1", "r2"], key="team/rack")), FENCE) == []
    assert validate_pod(make_pod(affinity=affinity("In", ["nhn-b200-a"], preferred=True)), FENCE) == []


def test_harmless_tolerations_are_fine() -> None:
    pod = make_pod(
        tolerations=[
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {
                "key": "node.kubernetes.io/not-ready",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            },
            {"key": "gpuaas.io/pool", "operator": "Equal", "value": "nhn-b200-a", "effect": "NoExecute"},
        ]
    )
    assert validate_pod(pod, FENCE) == []


def test_bound_pods_pass_on_update() -> None:
    bound = apply_patch(make_pod(), mutate_pod(make_pod(), FENCE))
    bound["spec"]["nodeName"] = "nhn-b200-a-0001"
    assert validate_pod(bound, FENCE, creating=False) == []
    assert validate_pod(bound, FENCE, creating=True) != []


def test_several_problems_are_all_reported() -> None:
    pod = make_pod(nodeName="x", tolerations=[{"operator": "Exists"}], affinity=affinity("NotIn", ["nhn-b200-a"]))
    assert len(validate_pod(pod, FENCE)) == 3


# --- mutate then validate: the final pod always passes and mutation is idempotent -----------------

label_keys = st.sampled_from(["gpuaas.io/pool", "nvidia.com/gpu.product", "team/rack", "kubernetes.io/arch"])
label_values = st.sampled_from(["nhn-b200-a", "kakao-b200-a", "NVIDIA-B200", "r1", "amd64"])
safe_tolerations = st.lists(
    st.fixed_dictionaries(
        {
            "key": st.sampled_from(["nvidia.com/gpu", "example.com/maintenance", "gpuaas.io/pool"]),
            "operator": st.just("Equal"),
            "value": st.sampled_from(["nhn-b200-a", "x"]),
            "effect": st.sampled_from(["NoSchedule", "NoExecute", ""]),
        }
    ).filter(lambda t: t["key"] != "gpuaas.io/pool" or t["value"] == "nhn-b200-a"),
    max_size=3,
)


@settings(max_examples=200, deadline=None)
@given(
    selector=st.one_of(st.none(), st.dictionaries(label_keys, label_values, max_size=4)),
    tolerations=st.one_of(st.none(), safe_tolerations),
    app=st.lists(st.one_of(st.none(), st.integers(0, 8)), min_size=1, max_size=3),
    init=st.lists(st.one_of(st.none(), st.integers(0, 8)), max_size=2),
    finalizers=st.one_of(st.none(), st.just([]), st.just(["example.com/x"])),
    exclusive=st.booleans(),
)
def test_mutated_pods_always_validate_and_mutation_is_idempotent(
    selector: dict[str, str] | None,
    tolerations: list[dict[str, str]] | None,
    app: list[int | None],
    init: list[int | None],
    finalizers: list[str] | None,
    exclusive: bool,
) -> None:
    fence = EXCLUSIVE if exclusive else FENCE
    spec: dict[str, Any] = {
        "containers": [gpu_container(f"c{i}", limits=n) for i, n in enumerate(app)],
        "initContainers": [gpu_container(f"i{i}", requests=n) for i, n in enumerate(init)],
    }
    if selector is not None:
        spec["nodeSelector"] = selector
    if tolerations is not None:
        spec["tolerations"] = tolerations
    pod = make_pod(**spec)
    if finalizers is not None:
        pod["metadata"]["finalizers"] = finalizers
    mutated = apply_patch(pod, mutate_pod(pod, fence))
    assert validate_pod(mutated, fence) == []
    assert mutate_pod(mutated, fence) == []
    for key, value in fence.labels.items():
        assert mutated["spec"]["nodeSelector"][key] == value
    has_finalizer = USAGE_FINALIZER in (mutated["metadata"].get("finalizers") or [])
    assert has_finalizer == (pod_gpus(pod) > 0)
    # Every container without a GPU request sees no device; GPU containers get theirs from the device plugin.
    for container in [*mutated["spec"]["containers"], *mutated["spec"]["initContainers"]]:
        hidden = {"name": VISIBLE_DEVICES_ENV, "value": NO_DEVICES} in (container.get("env") or [])
        assert hidden == (pod_gpus({"spec": {"containers": [container]}}) == 0), container


# --- device visibility ----------------------------------------------------------------------------


def test_containers_without_gpus_see_no_device() -> None:
    pod = make_pod(
        containers=[
            gpu_container("trainer", limits=2),
            {"name": "sidecar", "image": "busybox", "env": [{"name": "A", "value": "1"}]},
        ],
        initContainers=[{"name": "fetch", "image": "busybox"}],
    )
    mutated = apply_patch(pod, mutate_pod(pod, FENCE))
    sidecar, trainer, fetch = (
        mutated["spec"]["containers"][1],
        mutated["spec"]["containers"][0],
        mutated["spec"]["initContainers"][0],
    )
    assert sidecar["env"] == [{"name": "A", "value": "1"}, {"name": VISIBLE_DEVICES_ENV, "value": NO_DEVICES}]
    assert fetch["env"] == [{"name": VISIBLE_DEVICES_ENV, "value": NO_DEVICES}]
    assert "env" not in trainer, "the device plugin sets the GPU container's devices"
    assert validate_pod(mutated, FENCE) == []


@pytest.mark.parametrize(
    ("container", "fragment"),
    [
        ({"name": "c", "env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"}]}, "sets NVIDIA_VISIBLE_DEVICES"),
        (
            {
                "name": "c",
                "env": [
                    {"name": "NVIDIA_VISIBLE_DEVICES", "valueFrom": {"configMapKeyRef": {"name": "x", "key": "k"}}}
                ],
            },
            "sets NVIDIA_VISIBLE_DEVICES",
        ),
        (
            {"name": "c", "env": [{"name": "NVIDIA_MIG_CONFIG_DEVICES", "value": "all"}]},
            "sets NVIDIA_MIG_CONFIG_DEVICES",
        ),
        (
            {**gpu_container("c", limits=1), "env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}]},
            "sets NVIDIA_VISIBLE_DEVICES",
        ),
        (
            {**gpu_container("c", limits=1), "envFrom": [{"configMapRef": {"name": "settings"}}]},
            "envFrom without a safe prefix",
        ),
        (
            {**gpu_container("c", limits=1), "envFrom": [{"prefix": "NV", "secretRef": {"name": "s"}}]},
            "envFrom without a safe prefix",
        ),
    ],
)
def test_device_selection_by_environment_is_refused(container: dict[str, Any], fragment: str) -> None:
    pod = make_pod(containers=[{"image": "busybox", **container}])
    mutated = apply_patch(pod, mutate_pod(pod, FENCE))
    problems = validate_pod(mutated, FENCE)
    assert any(fragment in problem for problem in problems), problems


def test_gpu_containers_may_take_prefixed_env_from_config_maps() -> None:
    pod = make_pod(
        containers=[
            {**gpu_container("c", limits=1), "envFrom": [{"prefix": "APP_", "configMapRef": {"name": "settings"}}]}
        ]
    )
    assert validate_pod(apply_patch(pod, mutate_pod(pod, FENCE)), FENCE) == []


def test_priority_classes_only_as_the_pool_allows() -> None:
    pod = make_pod(priorityClassName="system-node-critical")
    problems = validate_pod(pod, FENCE)
    expected = "priorityClassName system-node-critical is not allowed in pool nhn-b200-a (allowed: none)"
    assert any(expected in problem for problem in problems), problems
    allowed = dataclasses.replace(FENCE, allowed_priority_classes=frozenset({"research-high"}))
    pod["spec"]["priorityClassName"] = "research-high"
    assert validate_pod(pod, allowed) == []
    del pod["spec"]["priorityClassName"]
    assert validate_pod(pod, FENCE) == []


def test_gpu_pods_get_a_bounded_grace() -> None:
    pod = make_pod(terminationGracePeriodSeconds=301)
    assert any("longer than pool nhn-b200-a allows for GPU pods (300s)" in p for p in validate_pod(pod, FENCE))
    pod["spec"]["terminationGracePeriodSeconds"] = 300
    assert validate_pod(pod, FENCE) == []
    # A pod without GPUs holds nothing of the pool, whatever its grace.
    cpu_only = make_pod(containers=[{"name": "db", "image": "x"}], terminationGracePeriodSeconds=3600)
    assert validate_pod(cpu_only, FENCE) == []


@pytest.mark.parametrize(
    ("annotation", "fragment"),
    [
        ("cdi.k8s.io/gpus", "metadata.annotations[cdi.k8s.io/gpus]"),
        ("nvidia.cdi.k8s.io/all", "metadata.annotations[nvidia.cdi.k8s.io/all]"),
        ("cdi-devices.nri.io/container.main", "asks the container runtime for devices"),
        ("devices.nri.io", "asks the container runtime for devices"),
    ],
)
def test_device_injection_annotations_are_refused(annotation: str, fragment: str) -> None:
    pod = make_pod(containers=[{"name": "main"}])
    pod["metadata"]["annotations"] = {annotation: "nvidia.com/gpu=all", "team": "vision"}
    problems = validate_pod(pod, FENCE)
    assert len(problems) == 1
    assert fragment in problems[0]


def test_an_update_is_refused_only_for_device_annotations_it_adds() -> None:
    admitted = make_pod(containers=[{"name": "main"}])
    admitted["metadata"]["annotations"] = {"cdi.k8s.io/old": "nvidia.com/gpu=0"}
    relabelled = {**admitted, "metadata": {**admitted["metadata"], "labels": {"x": "y"}}}
    assert validate_pod(relabelled, FENCE, creating=False, previous=admitted) == []
    added = {**admitted, "metadata": {**admitted["metadata"], "annotations": {"cdi.k8s.io/new": "nvidia.com/gpu=all"}}}
    (problem,) = validate_pod(added, FENCE, creating=False, previous=admitted)
    assert "cdi.k8s.io/new" in problem


@pytest.mark.parametrize(
    ("resources", "fragment"),
    [
        ({"limits": {"nvidia.com/mig-1g.18gb": "1"}}, "requests nvidia.com/mig-1g.18gb, which this grant's quota"),
        ({"requests": {"nvidia.com/gpu.shared": "1"}}, "requests nvidia.com/gpu.shared"),
    ],
)
def test_gpus_the_quota_and_ledger_do_not_count_are_refused(resources: dict[str, Any], fragment: str) -> None:
    pod = make_pod(containers=[{"name": "main", "resources": resources}])
    problems = validate_pod(pod, FENCE)
    assert any(fragment in problem for problem in problems), problems


def test_a_dra_claim_on_the_pod_is_refused_and_other_extended_resources_are_not() -> None:
    claims = make_pod(
        containers=[gpu_container(requests=1)],
        resourceClaims=[{"name": "gpu", "resourceClaimTemplateName": "one-gpu"}],
    )
    (problem,) = validate_pod(claims, FENCE)
    assert problem.startswith("spec.resourceClaims: pool nhn-b200-a grants GPUs as nvidia.com/gpu")
    dra_pool = replace(FENCE, device_class="gpu.nvidia.com", claim_templates={"one-gpu": 1})
    assert validate_pod(jsonpatch.apply_patch(claims, mutate_pod(claims, dra_pool)), dra_pool) == []
    rdma = make_pod(containers=[{"name": "main", "resources": {"limits": {"rdma/hca": "1", "nvidia.com/gpu": "1"}}}])
    assert validate_pod(rdma, FENCE) == []
