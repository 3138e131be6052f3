"""StallWatch: name a replica that stays in one place while its peers have moved on.

The driver probes every rank's position (step and phase, which each replica keeps on
the side, with no host sync added to its step) about once a second while a wait goes
on. A rank whose position has not changed for `limit_s` while some peer is further on
is stalled: its peers are waiting for it in a collective. A rank that stops answering
probes while its peers answer is stalled as well (a stopped or frozen process). A
group where every rank sits still is not named here: that is the hang limit's case
(the backstop), since no rank is behind the others; so is a rank that froze where its
peers then came to wait with it (at the front, in the same phase).

StallWatch is the rule, pure Python, unit-tested on its own; StallProbes feeds it
from the replicas during one of ReplicaGroup's waits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray

from distrib.errors import ReplicaTimeout
from distrib.protocol import Position

STALL_POLL_S = 1.0
"""While a wait lasts, how often every rank's position is probed."""


@dataclass
class _Seen:
    position: Position | None
    """The last answer; None until the rank answered once."""
    since: float
    """When it last changed (or the watch began)."""


class StallWatch:
    def __init__(self, num_ranks: int, *, limit_s: float, now: float):
        self.limit_s = limit_s
        self._seen = [_Seen(None, now) for _ in range(num_ranks)]

    def update(self, rank: int, position: Position | None, now: float) -> None:
        """Rank's answer to a probe (None: it did not answer this one)."""
        seen = self._seen[rank]
        if position is None or position == seen.position:
            return
        # A first answer counts as still since the watch began: a rank stalled before the first
        # probe is named limit_s after the wait began, not limit_s after the probe.
        if seen.position is not None:
            seen.since = now
        seen.position = position

    def stalled(self, now: float) -> list[tuple[int, str]]:
        """(rank, how) for each stalled rank, e.g. (1, 'at step 4 in data for 3.2 s')."""
        answered = [s.position.progress() for s in self._seen if s.position is not None]
        if not answered:
            return []
        front = max(answered)
        stalled = []
        for rank, seen in enumerate(self._seen):
            still_s = now - seen.since
            if still_s < self.limit_s:
                continue
            if seen.position is None:
                stalled.append((rank, f"silent for {still_s:.1f} s"))
            elif seen.position.progress() < front:
                stalled.append((rank, f"at step {seen.position.step} in {seen.position.phase} for {still_s:.1f} s"))
        return stalled

    def front(self) -> str:
        """Where the furthest rank is, for the message."""
        ranked = [(s.position.progress(), -rank) for rank, s in enumerate(self._seen) if s.position is not None]
        rank = -max(ranked)[1]  # the lowest rank among the furthest
        position = self._seen[rank].position
        return f"rank {rank} is at step {position.step} in {position.phase}"


class StallProbes:
    """The stall watch of one wait: from STALL_POLL_S on, probes every rank's position once per
    STALL_POLL_S (on each replica's probe thread) and raises ReplicaTimeout for a stalled rank."""

    def __init__(self, group, limit_s: float, started: float):
        self._group = group
        self._watch = StallWatch(len(group.replicas), limit_s=limit_s, now=started)
        self._probes: dict[ray.ObjectRef, int] = {}
        self._sent = started

    def close(self) -> None:
        """The wait is over: the group reads the probes still out when it stops."""
        self._group.read_at_stop(list(self._probes))
        self._probes = {}

    def poll(self, what: str, step: int | None) -> None:
        now = time.monotonic()
        if self._probes:
            done, _ = ray.wait(list(self._probes), num_returns=len(self._probes), timeout=0)
            for ref in done:
                rank = self._probes.pop(ref)
                try:
                    self._watch.update(rank, ray.get(ref), now)
                except ray.exceptions.RayError:
                    pass
        if now - self._sent >= STALL_POLL_S:
            self._sent = now
            waiting = set(self._probes.values())  # one probe per rank in flight
            for rank, replica in enumerate(self._group.replicas):
                if rank not in waiting:
                    self._probes[replica.position.remote()] = rank
        stalled = self._watch.stalled(now)
        if stalled:
            ranks = [rank for rank, _ in stalled]
            how = "; ".join(f"{self._group.name([rank])} {text}" for rank, text in stalled)
            raise ReplicaTimeout(f"{what}: {how} while {self._watch.front()} (stalled)", ranks=ranks, step=step,
                                 cause=f"{what}: stalled")
