"""Leader election on a coordination.k8s.io Lease: the rules, without a client or a clock.

Every replica watches and indexes everything and serves the admission webhooks (a hot standby); only the holder of
the Lease runs pool passes, the only writers. The rules follow client-go's leader election:
- a follower times the holder by its own clock, from when it first saw the record's current version, so clocks that
  disagree between nodes do not matter;
- the holder renews every `renew_every` and steps down when it has not renewed for `renew_deadline`, which is shorter
  than the lease, so that it stops writing before anyone may take over;
- a holder that stops cleanly releases the Lease (empty holder), and a follower takes an empty Lease at once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class LeaseTiming:
    lease_seconds: float

    @property
    def renew_every(self) -> float:
        return self.lease_seconds / 4

    @property
    def renew_deadline(self) -> float:
        return self.lease_seconds * 3 / 4


@dataclass(frozen=True)
class LeaseRecord:
    """What a replica read from the Lease."""

    holder: str  # "" when released
    lease_seconds: float
    transitions: int
    version: str  # resourceVersion: a new value means the holder renewed (or someone took over)


@dataclass(frozen=True)
class Sighting:
    """When this replica first saw a record version, by its own monotonic clock."""

    version: str
    seen_at: float


class Step(enum.Enum):
    CREATE = "create"  # no Lease yet
    RENEW = "renew"  # ours
    TAKE = "take"  # released, or its holder stopped renewing
    FOLLOW = "follow"  # someone else holds it


def sighting(record: LeaseRecord | None, previous: Sighting | None, now: float) -> Sighting | None:
    """Keep the first time a version was seen; a new version restarts the holder's clock."""
    if record is None:
        return None
    if previous is not None and previous.version == record.version:
        return previous
    return Sighting(record.version, now)


def next_step(record: LeaseRecord | None, me: str, seen: Sighting | None, now: float) -> Step:
    if record is None:
        return Step.CREATE
    if record.holder == me:
        return Step.RENEW
    if not record.holder:
        return Step.TAKE
    if seen is not None and now - seen.seen_at >= record.lease_seconds:
        return Step.TAKE
    return Step.FOLLOW


def still_leader(last_renewed: float | None, now: float, timing: LeaseTiming) -> bool:
    """A holder leads only while its last successful renewal is younger than the renew deadline."""
    return last_renewed is not None and now - last_renewed < timing.renew_deadline
