"""GPU pods whose objects are gone, remembered from the watch's DELETED event, so that none goes unbooked.

The usage finalizer keeps a GPU pod's object until its time is booked, and only gpuaas may remove it. A privileged
hand (system:masters, a controller) or a webhook outage can still remove it; then the object goes with the usage
since the last flush unbooked. The DELETED event carries the pod's last state: its interval is booked from it, by
the same rules as any pod's, so the usage finalizer is no longer the ledger's only guard.

Every deleted GPU pod is remembered, the ones gpuaas released too: the API server deletes a pod whose last
finalizer goes without storing that last update, so nothing on the object can say who removed the finalizer. A pod
gpuaas released is booked to its end already, and its watermark says so: booking it again adds nothing.

A departed pod is remembered for DEPARTED_POD_MEMORY after its end. Every replica remembers it, so a standby that
takes over books it too; what keeps that from double counting is the pod's watermark in the record, which booking
keeps for WATERMARK_KEEP (longer than any replica remembers the pod) after the pod has gone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from gpuaas.domain.dra import recorded_shared_claims
from gpuaas.domain.ledger import LedgerPod, pod_interval_from_pod

DEPARTED_POD_MEMORY = timedelta(minutes=10)
# Watermarks of pods that are gone stay this long past their booked end: longer than any replica remembers a departed
# pod (a standby's DELETED event may arrive late), so a remembered pod always finds its watermark.
WATERMARK_KEEP = 2 * DEPARTED_POD_MEMORY


def departed_pod(last_state: Mapping[str, Any], seen_at: datetime) -> LedgerPod | None:
    """The pod as the ledger books it once its object is gone; None if it never held GPUs. An end the last state does
    not show (a force deletion) is the moment the deletion was seen."""
    metadata = last_state.get("metadata") or {}
    interval = pod_interval_from_pod(last_state)
    shared = tuple(sorted(recorded_shared_claims(metadata).items()))
    if interval is None or (interval.gpus == 0 and not shared):
        return None
    if interval.end is None or interval.end > seen_at:
        interval = replace(interval, end=max(interval.start, seen_at), end_is_deadline=False)
    return LedgerPod(
        name=str(metadata.get("name")),
        namespace=str(metadata.get("namespace")),
        uid=interval.uid,
        interval=interval,
        has_finalizer=False,
        finished=True,
        departed=True,
        shared_claims=shared,
    )


@dataclass
class DepartedPods:
    """Departed pods by namespace and uid, each until DEPARTED_POD_MEMORY after its end."""

    by_namespace: dict[str, dict[str, tuple[LedgerPod, datetime]]] = field(default_factory=dict)

    def remember(self, pod: LedgerPod, now: datetime) -> None:
        self.forget_expired(now)
        end = pod.interval.end if pod.interval is not None and pod.interval.end is not None else now
        self.by_namespace.setdefault(pod.namespace, {})[pod.uid] = (pod, end + DEPARTED_POD_MEMORY)

    def of(self, namespace: str) -> list[LedgerPod]:
        return [pod for pod, _ in self.by_namespace.get(namespace, {}).values()]

    def forget_expired(self, now: datetime) -> None:
        for namespace, pods in list(self.by_namespace.items()):
            for uid, (_, expires) in list(pods.items()):
                if expires <= now:
                    del pods[uid]
            if not pods:
                del self.by_namespace[namespace]
