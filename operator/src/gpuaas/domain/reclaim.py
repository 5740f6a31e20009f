"""GPUs taken away from a grant: which pods must stop, and what the pool may not promise until they have.

A pod holds its namespace's GPU quota from creation (Pending and scheduling-gated pods too) until it finishes, and it
holds devices from its start until the kubelet has stopped it. Every transition that takes GPUs away from a grant
(suspension, idle reclaim, a smaller spec.gpus, expiry after its grace) stops the pods that hold what was taken; until
they are gone their GPUs stay out of what the pool offers to others.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from gpuaas.api.allocation import Phase
from gpuaas.domain.tenant import quota_open


@dataclass(frozen=True)
class HeldPod:
    """A GPU pod of a tenant namespace as these rules see it."""

    name: str
    gpus: int
    created: str  # RFC 3339, so it sorts by time
    finished: bool  # terminal, or being deleted
    started: datetime | None
    released_at: datetime | None  # when its GPUs are free: the container finish or the kill deadline; None if running


def holds_quota(pod: HeldPod) -> bool:
    return pod.gpus > 0 and not pod.finished


def holds_devices(pod: HeldPod, now: datetime) -> bool:
    return pod.gpus > 0 and pod.started is not None and (pod.released_at is None or pod.released_at > now)


def quota_held(pods: Iterable[HeldPod]) -> int:
    return sum(pod.gpus for pod in pods if holds_quota(pod))


def pods_to_stop(phase: Phase, granted_gpus: int, pods: Sequence[HeldPod]) -> list[HeldPod]:
    """The pods holding GPUs the grant no longer covers: all of them when it is not in force (Expired waits for its
    grace period, a separate rule); the newest first, while a smaller grant is exceeded."""
    holding = [pod for pod in pods if holds_quota(pod)]
    if phase == "Expired":
        return []
    if not quota_open(phase):
        return holding
    excess = quota_held(holding) - granted_gpus
    stop: list[HeldPod] = []
    for pod in sorted(holding, key=lambda p: (p.created, p.name), reverse=True):
        if excess <= 0:
            break
        stop.append(pod)
        excess -= pod.gpus
    return stop


def held_beyond_grants(granted: Mapping[str, int], pods: Mapping[str, Sequence[HeldPod]], now: datetime) -> int:
    """GPUs that pods still hold beyond their allocation's grant (by allocation): the pool must not offer them."""
    return sum(
        max(0, sum(p.gpus for p in held if holds_devices(p, now)) - granted.get(allocation, 0))
        for allocation, held in pods.items()
    )
