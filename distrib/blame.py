"""Naming the replicas to blame: the dead rather than the peers whose collective broke with
them, a rank's own error rather than the peers it broke, and on a timeout the rank that
holds the others up (a probe on each replica's own thread says where each one is).

Functions of a ReplicaGroup (its public side: replicas, call, name, read_at_stop).
"""

from __future__ import annotations

import re
import time

import ray

from distrib.errors import ReplicaError, first_line
from distrib.protocol import Position

DEAD_PEER_GRACE_S = 2.0
"""When a rank's collective fails, how long to look for a peer that died (the real cause)."""
PEER_PROBE_S = 1.0
"""After a collective failed, a peer that does not answer a probe this long is taken for lost
(and replaced): a lost node's processes are declared dead by Ray only seconds later. A live
peer whose probe thread cannot run that long (a long stretch holding the GIL) would be
replaced needlessly, which costs time, not correctness."""
PROBE_TIMEOUT_S = 3.0
"""How long a replica has to answer a position probe before it is called frozen or gone."""
PEER_FAILURE = re.compile(r"Connection closed by peer|Connection reset|Read error|Write error|Broken pipe|"
                          r"left its process group|NCCL communicator was aborted|remote process exited")
"""Errors a rank raises because a peer failed (its collective broke), not from a fault of its own."""


def blame(group, rank: int, err: ray.exceptions.RayError, pending: dict[ray.ObjectRef, int], what: str,
          step: int | None) -> ReplicaError:
    """The error to raise for `rank`'s failed call: a dead peer's death broke the collectives of
    the ranks still alive, and a rank's own error (not one caused by a peer) breaks its
    peers' collectives too, so those are blamed, rather than the first rank to report."""
    if isinstance(err, ray.exceptions.RayActorError):
        return ReplicaError(f"{group.name([rank])} died during {what}: {first_line(err)}", ranks=[rank],
                            step=step, cause="process died")
    causes = {rank: cause_of(err)}
    dead = peers_after_failure(group, pending, causes) if pending else []
    if dead:
        return ReplicaError(f"{group.name(dead)} died during {what} (so {group.name([rank])} failed: "
                            f"{causes[rank]})", ranks=dead, step=step, cause="process died")
    own = sorted(r for r, cause in causes.items() if not PEER_FAILURE.search(cause)) or [rank]
    return ReplicaError(f"{group.name(own)} failed during {what}: {causes[own[0]]}", ranks=own, step=step,
                        lost=False, cause=causes[own[0]])

def peers_after_failure(group, pending: dict[ray.ObjectRef, int], causes: dict[int, str]) -> list[int]:
    """Wait up to DEAD_PEER_GRACE_S for the other ranks' results of a failed call (`pending`),
    reading their errors into `causes`; returns the ranks found dead: their actor died, or
    they did not answer a probe within PEER_PROBE_S (a lost node, which Ray takes seconds to
    declare dead, while the connections of its processes closed at once)."""
    probes = {group.replicas[r].position.remote(): r for r in pending.values()}
    group.read_at_stop(list(probes))
    left, answered, dead = dict(pending), set(), set()
    started = time.monotonic()
    while left and time.monotonic() - started < DEAD_PEER_GRACE_S:
        refs = list(left) + [ref for ref, r in probes.items() if r not in answered]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0.05)
        for ref in done:
            if ref in probes:
                try:
                    ray.get(ref)
                    answered.add(probes[ref])
                except ray.exceptions.RayError:
                    dead.add(probes[ref])
                continue
            rank = left.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                dead.add(rank)
            except ray.exceptions.RayError as other:
                causes[rank] = cause_of(other)
        silent = set(left.values()) - answered
        # A rank seen dead does not make the silent ones dead: a healthy rank may be slow to
        # answer its probe (loaded cores). They are, once silent for PEER_PROBE_S (a lost node).
        if (dead and not silent) or (silent and time.monotonic() - started >= PEER_PROBE_S):
            return sorted(dead | silent)
    return []


def diagnose(group, late_ranks: list[int]) -> tuple[str, list[int]]:
    """Name the ranks holding the others up: those that do not answer a probe, else those
    of `late_ranks` furthest behind (the rest are waiting for them in a collective).
    Returns the text and those ranks."""
    probes = group.call("position")
    ready, _ = ray.wait(probes, num_returns=len(probes), timeout=PROBE_TIMEOUT_S)
    group.read_at_stop([ref for ref in probes if ref not in ready])
    positions: dict[int, Position] = {}
    for rank, ref in enumerate(probes):
        if ref in ready:
            try:
                positions[rank] = ray.get(ref)
            except ray.exceptions.RayError:
                pass
    silent = [r for r in range(len(probes)) if r not in positions]
    if silent:
        return f"{group.name(silent)} did not answer a probe (stopped, frozen or gone)", silent
    behind = min(positions[r].progress() for r in late_ranks)
    stuck = [r for r in late_ranks if positions[r].progress() == behind]
    where = positions[stuck[0]]
    waiting = "" if len(stuck) == len(positions) else "; the other ranks are waiting further on"
    return f"{group.name(stuck)} stuck at step {where.step} in {where.phase}{waiting}", stuck


OUT_OF_DISK = ("Ray's object store is full and the disk it spills to is fuller than Ray's "
               "local_fs_capacity_threshold (95% by default); free space on that disk (Ray's temp dir, "
               "/tmp/ray by default)")
"""Why an OutOfDiskError, whose own first line is an object id or 'Local disk is full'."""


def cause_of(err: ray.exceptions.RayError) -> str:
    """'Type: first line' of the exception a replica raised (for an OutOfDiskError, what to do)."""
    cause = getattr(err, "cause", None) or err
    text = OUT_OF_DISK if isinstance(cause, ray.exceptions.OutOfDiskError) else first_line(cause)
    if text.startswith("Caught ") and "in DataLoader worker" in text:
        # torch re-raises a loader process's error as "Caught E in DataLoader worker process N."
        # and puts the error's own text (the file, the fix) last, after the worker's traceback.
        text = str(cause).strip().splitlines()[-1].removeprefix(f"{type(cause).__name__}: ")
    return f"{type(cause).__name__}: {text}"
