"""A tenant (an owner, or a service account in its namespace) tries to leave its pool or quota."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from gpuaas.domain.scenarios import SCENARIOS
from tests.integration.allocations import (
    allocation,
    allocation_manifest,
    can,
    gpu_pod,
    pod_phase,
    unique,
    wait_for_ready,
)
from tests.integration.conftest import LocalCluster, OperatorProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
B200, H200 = SCENARIOS["small"].pools
ROBOT = "ci-bot"


@pytest.fixture(scope="module")
def tenant(cluster: LocalCluster, operator: OperatorProcess) -> Iterator[str]:
    """A tenant on the H200 pool whose owners are alice and a service account of its own namespace."""
    name = unique("tenant")
    owners = [{"kind": "User", "name": "alice"}, {"kind": "ServiceAccount", "name": ROBOT}]
    with allocation(cluster, allocation_manifest(name, H200.name, 16, owners=owners)):
        wait_for_ready(cluster, name)
        client.CoreV1Api(cluster.api).create_namespaced_service_account(name, {"metadata": {"name": ROBOT}})
        yield name


def actors(namespace: str) -> list[str]:
    return ["alice", f"system:serviceaccount:{namespace}:{ROBOT}"]


def as_tenant(cluster: LocalCluster, actor: str, *args: str, manifest: dict[str, Any] | None = None) -> str:
    """Run kubectl as the tenant; returns stderr of a refused request, and fails the test if it was accepted."""
    stdin = json.dumps(manifest) if manifest is not None else None
    result = cluster.kubectl("--as", actor, *args, check=False, stdin=stdin)
    assert result.returncode != 0, f"{actor} was allowed: kubectl {' '.join(args)}: {result.stdout}"
    return result.stderr


def escaping_pod(namespace: str, **spec: Any) -> dict[str, Any]:
    return gpu_pod(unique("escape"), namespace, 1, **spec)


OTHER_POOL_AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": "gpuaas.io/pool", "operator": "In", "values": [B200.name]}]}
            ]
        }
    }
}
POD_ESCAPES = {
    "nodeName": ({"nodeName": f"{B200.name}-0000"}, "spec.nodeName"),
    "wildcard-toleration": ({"tolerations": [{"operator": "Exists"}]}, "tolerates every taint"),
    "other-pool-toleration": (
        {"tolerations": [{"key": "gpuaas.io/pool", "operator": "Equal", "value": B200.name, "effect": "NoSchedule"}]},
        B200.name,
    ),
    "other-pool-affinity": ({"affinity": OTHER_POOL_AFFINITY}, B200.name),
    # Issue 9: a system priority class preempts other tenants' pods on shared nodes.
    "system-priority": ({"priorityClassName": "system-node-critical"}, "system-node-critical is not allowed in pool"),
    # Issue 9: a day of grace keeps the GPUs a day after a delete, an expiry or a reclaim.
    "day-long-grace": ({"terminationGracePeriodSeconds": 86400}, "terminationGracePeriodSeconds 86400 is longer"),
    # Issue 9: GPUs by another name (a MIG slice, a DRA claim) that the quota and the ledger do not count.
    "mig-slice": (
        {
            "containers": [
                {
                    "name": "train",
                    "image": "pytorch:25.01-py3",
                    "resources": {"limits": {"nvidia.com/mig-1g.18gb": "1"}},
                }
            ]
        },
        "requests nvidia.com/mig-1g.18gb, which this grant's quota and usage ledger do not count",
    ),
    "dra-claim": (
        {"resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": "one-gpu"}]},
        f"spec.resourceClaims: pool {H200.name} grants GPUs as nvidia.com/gpu, not through DRA ResourceClaims",
    ),
}


@pytest.mark.parametrize("key", ["cdi.k8s.io/gpus", "cdi-devices.nri.io/container.train", "devices.nri.io"])
def test_device_injection_annotations_are_refused_on_create_and_update(
    cluster: LocalCluster, tenant: str, key: str
) -> None:
    """containerd injects CDI devices named in pod annotations: NVIDIA's CDI spec would give every GPU of the node."""
    pod = escaping_pod(tenant)
    pod["spec"]["containers"][0]["resources"] = {}  # no GPU requested at all
    pod["metadata"]["annotations"] = {key: "nvidia.com/gpu=all"}
    error = as_tenant(cluster, "alice", "apply", "-f", "-", manifest=pod)
    assert f"metadata.annotations[{key}] asks the container runtime for devices" in error
    del pod["metadata"]["annotations"]
    cluster.kubectl("--as", "alice", "apply", "-f", "-", stdin=json.dumps(pod))
    name = pod["metadata"]["name"]
    error = as_tenant(cluster, "alice", "annotate", "pod", name, "-n", tenant, f"{key}=nvidia.com/gpu=all")
    assert f"metadata.annotations[{key}]" in error
    cluster.kubectl("--as", "alice", "delete", "pod", name, "-n", tenant, "--wait=false")


@pytest.mark.parametrize("escape", list(POD_ESCAPES))
@pytest.mark.parametrize("actor_index", [0, 1], ids=["owner", "serviceaccount"])
def test_pod_escapes_are_refused(cluster: LocalCluster, tenant: str, escape: str, actor_index: int) -> None:
    spec, expected = POD_ESCAPES[escape]
    error = as_tenant(cluster, actors(tenant)[actor_index], "apply", "-f", "-", manifest=escaping_pod(tenant, **spec))
    assert "denied the request" in error
    assert expected in error


def test_other_pool_node_selector_is_reverted(cluster: LocalCluster, tenant: str) -> None:
    """The mutating webhook forces the pool's own selector over one aimed at another pool."""
    name = unique("selector")
    pod = gpu_pod(name, tenant, 1, nodeSelector={"gpuaas.io/pool": B200.name})
    cluster.kubectl("--as", "alice", "apply", "-f", "-", stdin=json.dumps(pod))
    wait_for(lambda: pod_phase(cluster, name, tenant) == "Running", message="pod Running")
    placed = client.CoreV1Api(cluster.api).read_namespaced_pod(name, tenant)
    assert placed.spec.node_selector["gpuaas.io/pool"] == H200.name
    assert placed.spec.node_name.startswith(H200.name)
    client.CoreV1Api(cluster.api).delete_namespaced_pod(name, tenant)
    wait_for(lambda: pod_phase(cluster, name, tenant) is None, message="pod booked and gone")


def test_gpus_in_init_containers_count_against_quota(cluster: LocalCluster, tenant: str) -> None:
    pod = gpu_pod(unique("init"), tenant, 1)
    pod["spec"]["initContainers"] = [
        {"name": "grab", "image": "busybox", "resources": {"limits": {"nvidia.com/gpu": "64"}}}
    ]
    error = as_tenant(cluster, "alice", "apply", "-f", "-", manifest=pod)
    assert "exceeded quota" in error


def test_limits_only_gpus_are_fenced_and_booked(cluster: LocalCluster, tenant: str) -> None:
    name = unique("limits")
    cluster.kubectl("--as", "alice", "apply", "-f", "-", stdin=json.dumps(gpu_pod(name, tenant, 8)))
    wait_for(lambda: pod_phase(cluster, name, tenant) == "Running", message="pod Running")
    pod = client.CoreV1Api(cluster.api).read_namespaced_pod(name, tenant)
    assert pod.spec.node_name.startswith(H200.name)
    assert "gpuaas.io/usage-ledger" in pod.metadata.finalizers
    quota = client.CoreV1Api(cluster.api).read_namespaced_resource_quota("gpuaas-quota", tenant)
    assert quota.status.used["requests.nvidia.com/gpu"] == "8"
    client.CoreV1Api(cluster.api).delete_namespaced_pod(name, tenant)
    wait_for(lambda: pod_phase(cluster, name, tenant) is None, message="pod booked and gone")


@pytest.mark.parametrize("actor_index", [0, 1], ids=["owner", "serviceaccount"])
def test_usage_finalizer_cannot_be_removed_by_the_tenant(cluster: LocalCluster, tenant: str, actor_index: int) -> None:
    """Removing gpuaas's finalizer and then deleting the pod would end its life unbooked (issue 14): refused, however
    the tenant writes it; the pod is then booked normally."""
    actor = actors(tenant)[actor_index]
    name = unique("unbooked")
    cluster.kubectl("--as", actor, "apply", "-f", "-", stdin=json.dumps(gpu_pod(name, tenant, 1)))
    wait_for(lambda: pod_phase(cluster, name, tenant) == "Running", message="pod Running")
    for patch_type, patch in (
        ("json", [{"op": "remove", "path": "/metadata/finalizers"}]),
        ("json", [{"op": "replace", "path": "/metadata/finalizers", "value": ["example.com/other"]}]),
        ("merge", {"metadata": {"finalizers": None}}),
    ):
        args = ("-n", tenant, "patch", "pod", name, "--type", patch_type, "-p", json.dumps(patch))
        error = as_tenant(cluster, actor, *args)
        assert "gpuaas.io/usage-ledger is removed by gpuaas" in error, error
    pod = client.CoreV1Api(cluster.api).read_namespaced_pod(name, tenant)
    assert pod.metadata.finalizers == ["gpuaas.io/usage-ledger"]
    cluster.kubectl("--as", actor, "-n", tenant, "delete", "pod", name, "--wait=false")
    wait_for(lambda: pod_phase(cluster, name, tenant) is None, message="pod booked and gone")


@pytest.mark.parametrize("actor_index", [0, 1], ids=["owner", "serviceaccount"])
def test_the_tenant_cannot_write_what_the_ledger_reads(cluster: LocalCluster, tenant: str, actor_index: int) -> None:
    """Issue 14, the kind of item 1: besides the usage finalizer (the webhook keeps it), the ledger reads a pod's
    status (container start and finish, written by the kubelet), the GpuUsage records, the allocation's grant, and
    the quota that bounds what pods hold. RBAC gives a namespace admin none of them to write."""
    actor = actors(tenant)[actor_index]
    assert can(cluster, actor, tenant, "delete", "pods")  # the check answers yes where the tenant may
    assert can(cluster, actor, tenant, "get", "pods", "status")
    for verb, resource, subresource in (
        ("update", "pods", "status"),
        ("patch", "pods", "status"),
        ("create", "gpuusages.gpuaas.io", ""),
        ("patch", "gpuusages.gpuaas.io", ""),
        ("delete", "gpuusages.gpuaas.io", ""),
        # Downtime credit: the pool's month record, and the node health it is computed from.
        ("patch", "gpupoolusages.gpuaas.io", ""),
        ("patch", "nodes", ""),
        ("patch", "nodes", "status"),
        ("patch", "gpuallocations.gpuaas.io", ""),
        ("patch", "gpuallocations.gpuaas.io", "status"),
        ("update", "resourcequotas", "status"),
    ):
        assert not can(cluster, actor, tenant, verb, resource, subresource), (
            f"{actor} may {verb} {resource} {subresource}"
        )


@pytest.mark.parametrize("actor_index", [0, 1], ids=["owner", "serviceaccount"])
def test_quota_and_limit_range_cannot_be_changed(cluster: LocalCluster, tenant: str, actor_index: int) -> None:
    actor = actors(tenant)[actor_index]
    raise_quota = '{"spec":{"hard":{"requests.nvidia.com/gpu":"1000"}}}'
    assert "forbidden" in as_tenant(cluster, actor, "-n", tenant, "patch", "quota", "gpuaas-quota", "-p", raise_quota)
    assert "forbidden" in as_tenant(cluster, actor, "-n", tenant, "delete", "quota", "gpuaas-quota")
    assert "forbidden" in as_tenant(cluster, actor, "-n", tenant, "delete", "limitrange", "gpuaas-limits")
    # RBAC lets a namespace admin delete RoleBindings; the guard webhook keeps gpuaas's own.
    assert "denied the request" in as_tenant(cluster, actor, "-n", tenant, "delete", "rolebinding", "gpuaas-owners")


@pytest.mark.parametrize("subresource", ["", "status", "finalize"])
def test_namespace_labels_cannot_be_changed(cluster: LocalCluster, tenant: str, subresource: str) -> None:
    patch = '{"metadata":{"labels":{"gpuaas.io/managed":null,"gpuaas.io/pool":"test-b200"}}}'
    args = ["patch", "namespace", tenant, "--type", "merge", "-p", patch]
    if subresource:
        args += ["--subresource", subresource]
    for actor in actors(tenant):
        assert "forbidden" in as_tenant(cluster, actor, *args).lower()
    labels = client.CoreV1Api(cluster.api).read_namespace(tenant).metadata.labels
    assert labels["gpuaas.io/managed"] == "true"
    assert labels["gpuaas.io/pool"] == H200.name


def test_cannot_bind_cluster_admin(cluster: LocalCluster, tenant: str) -> None:
    for actor in actors(tenant):
        error = as_tenant(
            cluster, actor, "-n", tenant, "create", "rolebinding", unique("grab"), "--clusterrole", "cluster-admin",
            "--user", "alice",
        )  # fmt: skip
        assert "forbidden" in error


def test_cannot_create_pods_in_another_tenants_namespace(cluster: LocalCluster, tenant: str) -> None:
    other = unique("other")
    with allocation(cluster, allocation_manifest(other, B200.name, 8, owners=[{"kind": "User", "name": "bob"}])):
        wait_for_ready(cluster, other)
        for actor in actors(tenant):
            error = as_tenant(cluster, actor, "apply", "-f", "-", manifest=gpu_pod(unique("intruder"), other, 1))
            assert "forbidden" in error


def service(namespace: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": unique("svc"), "namespace": namespace},
        "spec": {"ports": [{"port": 80}], **spec},
    }


EXPOSURES = {
    "external-ips": ({"selector": {"app": "x"}, "externalIPs": ["203.0.113.10", "10.96.0.1"]}, "CVE-2020-8554"),
    "node-port": ({"selector": {"app": "x"}, "type": "NodePort"}, "spec.type NodePort exposes"),
    "load-balancer": ({"selector": {"app": "x"}, "type": "LoadBalancer"}, "spec.type LoadBalancer exposes"),
    "load-balancer-ip": ({"selector": {"app": "x"}, "loadBalancerIP": "203.0.113.11"}, "spec.loadBalancerIP"),
}


@pytest.mark.parametrize("exposure", sorted(EXPOSURES))
def test_services_cannot_reach_outside_the_namespace(cluster: LocalCluster, tenant: str, exposure: str) -> None:
    spec, message = EXPOSURES[exposure]
    for actor in actors(tenant):
        error = as_tenant(cluster, actor, "create", "-f", "-", manifest=service(tenant, **spec))
        assert message in error, error


def grant_robot(cluster: LocalCluster, tenant: str, rule: dict[str, Any]) -> None:
    """As a provider might: give the tenant's ServiceAccount a verb the built-in admin role lacks."""
    name = unique("extra")
    rbac = client.RbacAuthorizationV1Api(cluster.api)
    rbac.create_namespaced_role(tenant, {"metadata": {"name": name}, "rules": [rule]})
    rbac.create_namespaced_role_binding(tenant, {
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": ROBOT, "namespace": tenant}],
    })  # fmt: skip


def test_hand_made_endpoints_are_refused_and_selector_services_work(cluster: LocalCluster, tenant: str) -> None:
    """A Service without a selector plus a hand-made EndpointSlice would forward anywhere (CVE-2021-25740)."""
    plain = service(tenant, selector={"app": "web"})
    cluster.kubectl("--as", "alice", "create", "-f", "-", stdin=json.dumps(plain))
    name = plain["metadata"]["name"]
    # The control plane's EndpointSlice controller still writes the Service's slices.
    wait_for(
        lambda: (
            client.DiscoveryV1Api(cluster.api)
            .list_namespaced_endpoint_slice(tenant, label_selector=f"kubernetes.io/service-name={name}")
            .items
        ),
        message="the controller's EndpointSlice",
    )
    slice_manifest = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": unique("slice"), "namespace": tenant, "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.96.0.1"]}],
        "ports": [{"port": 443}],
    }
    endpoints_manifest = {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": unique("ep"), "namespace": tenant},
        "subsets": [{"addresses": [{"ip": "10.96.0.1"}], "ports": [{"port": 443}]}],
    }
    # The built-in admin role already lacks these verbs (Kubernetes' own fix for CVE-2021-25740)...
    for manifest in (slice_manifest, endpoints_manifest):
        error = as_tenant(cluster, "alice", "create", "-f", "-", manifest=manifest)
        assert "cannot create resource" in error, error
    # ...and the fence refuses them even to a subject a provider granted them to.
    grant_robot(cluster, tenant, {"apiGroups": ["", "discovery.k8s.io"], "resources": ["endpoints", "endpointslices"],
                                  "verbs": ["create"]})  # fmt: skip
    robot = actors(tenant)[1]
    for manifest in (slice_manifest, endpoints_manifest):
        error = wait_for(
            lambda manifest=manifest: (
                (e := as_tenant(cluster, robot, "create", "-f", "-", manifest=manifest))
                and "cannot create resource" not in e
                and e
            ),
            message="the RoleBinding in force",
        )
        assert "written by the control plane" in error, error


def team_binding(namespace: str, *subjects: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "team-admins", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
        "subjects": list(subjects),
    }


def user(name: str) -> dict[str, str]:
    return {"kind": "User", "name": name, "apiGroup": "rbac.authorization.k8s.io"}


def set_owners(custom: client.CustomObjectsApi, allocation_name: str, *users: str) -> None:
    owners = [{"kind": "User", "name": name} for name in users]
    body = {"spec": {"owners": owners}}
    custom.patch_cluster_custom_object("gpuaas.io", "v1alpha1", "gpuallocations", allocation_name, body)


def test_access_ends_with_ownership_and_with_the_grant(cluster: LocalCluster, operator: OperatorProcess) -> None:
    """Issue 14: rights an owner shared through its own RoleBinding outlived the sharee's removal from the owners,
    and the grant itself. Sharing is limited to owners and the namespace's ServiceAccounts, and is taken back."""
    name = unique("team")
    robot = {"kind": "ServiceAccount", "name": ROBOT, "namespace": name}
    manifest = allocation_manifest(name, H200.name, 8, deletionPolicy="Retain")
    core, custom = client.CoreV1Api(cluster.api), client.CustomObjectsApi(cluster.api)
    with allocation(cluster, manifest):
        wait_for_ready(cluster, name)
        # bob is not an owner: alice cannot make him admin, not even beside herself or through a group.
        for subjects in ((user("alice"), user("bob")), ({"kind": "Group", "name": "system:authenticated"},)):
            error = as_tenant(cluster, "alice", "create", "-f", "-", manifest=team_binding(name, *subjects))
            assert "rights may be shared only with the allocation's owners" in error, error
        assert not can(cluster, "bob", name, "create", "pods")
        # The program office adds bob; alice shares with him and with her namespace's ServiceAccount.
        set_owners(custom, name, "alice", "bob")
        wait_for(lambda: can(cluster, "bob", name, "create", "pods"), message="bob an owner")
        core.create_namespaced_service_account(name, {"metadata": {"name": ROBOT}})
        binding = team_binding(name, user("alice"), user("bob"), robot)
        cluster.kubectl("--as", "alice", "create", "-f", "-", stdin=json.dumps(binding))
        # The program office removes bob: gpuaas's binding and alice's both stop naming him.
        set_owners(custom, name, "alice")
        wait_for(lambda: not can(cluster, "bob", name, "create", "pods"), message="bob without rights")
        rbac = client.RbacAuthorizationV1Api(cluster.api)
        kept = rbac.read_namespaced_role_binding("team-admins", name).subjects
        assert [(s.kind, s.name) for s in kept] == [("User", "alice"), ("ServiceAccount", ROBOT)]
        assert can(cluster, f"system:serviceaccount:{name}:{ROBOT}", name, "create", "pods")
    # Released (Retain): the data stays, but nobody the tenant named keeps any right.
    assert core.read_namespace(name).metadata.labels["gpuaas.io/released"] == "true"
    wait_for(lambda: not rbac.read_namespaced_role_binding("team-admins", name).subjects, message="team emptied")
    for actor in ("alice", "bob", f"system:serviceaccount:{name}:{ROBOT}"):
        assert not can(cluster, actor, name, "create", "pods"), actor
        assert not can(cluster, actor, name, "create", "rolebindings"), actor
    core.delete_namespace(name)


def test_debug_containers_see_no_device(cluster: LocalCluster, tenant: str) -> None:
    """Issue 9: `kubectl debug` adds an ephemeral container through its own subresource. It gets
    NVIDIA_VISIBLE_DEVICES=void like any container without GPUs, and may not ask for the node's devices itself."""
    name = unique("debugged")
    cluster.kubectl("--as", "alice", "apply", "-f", "-", stdin=json.dumps(gpu_pod(name, tenant, 1)))
    wait_for(lambda: pod_phase(cluster, name, tenant) == "Running", message="pod Running")
    debug = ("-n", tenant, "debug", name, "--image=busybox", "--profile=baseline")
    # The built-in admin role lacks the subresource; a provider may grant it.
    assert "cannot patch resource" in as_tenant(cluster, "alice", *debug, "--container=peek")
    grant_robot(cluster, tenant, {"apiGroups": [""], "resources": ["pods/ephemeralcontainers"], "verbs": ["patch"]})
    robot = actors(tenant)[1]
    error = wait_for(
        lambda: (
            (e := as_tenant(cluster, robot, *debug, "--container=peek", "--env=NVIDIA_VISIBLE_DEVICES=all"))
            and "cannot patch resource" not in e
            and e
        ),
        message="the RoleBinding in force",
    )
    assert "spec.ephemeralContainers[peek].env sets NVIDIA_VISIBLE_DEVICES" in error, error
    cluster.kubectl("--as", robot, *debug, "--container=look")
    pod = client.CoreV1Api(cluster.api).read_namespaced_pod(name, tenant)
    added = {c.name: c for c in pod.spec.ephemeral_containers or []}
    assert set(added) == {"look"}
    assert [(e.name, e.value) for e in added["look"].env or []] == [("NVIDIA_VISIBLE_DEVICES", "void")]
    client.CoreV1Api(cluster.api).delete_namespaced_pod(name, tenant)
