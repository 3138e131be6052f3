"""Hot spares: actors placed and set up ahead (model built, no process group), each in a
bundle of its own, waiting to take a lost rank's place in a heal."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import ray

log = logging.getLogger(__name__)


@dataclass
class _Spare:
    actor: ray.actor.ActorHandle
    bundle: int
    ready: ray.ObjectRef
    """Its `prepare` call: done once the model is built."""
    node: ray.ObjectRef
    """Its `node_info` call, queued behind `prepare`."""


class SparePool:
    def __init__(self, start: Callable[[int], tuple[ray.actor.ActorHandle, ray.ObjectRef]]):
        """`start(bundle)` starts an actor in that bundle and its `prepare`: (actor, prepare ref)."""
        self._start = start
        self._spares: list[_Spare] = []
        self._free_bundles: list[int] = []

    def add(self, bundle: int) -> None:
        actor, ready = self._start(bundle)
        self._spares.append(_Spare(actor, bundle, ready, actor.node_info.remote()))

    def take(self, *, avoid_nodes: set[str]) -> tuple[ray.actor.ActorHandle, int] | None:
        """A spare whose model is built, out of the pool: (actor, its bundle), one off
        `avoid_nodes` (the lost ranks' nodes, which may be gone) if there is one; None when
        none is ready. Spares that failed (their node went) are dropped on the way."""
        ready = []
        for spare in list(self._spares):
            done, _ = ray.wait([spare.ready, spare.node], num_returns=2, timeout=0)
            if len(done) < 2:  # still starting
                continue
            try:
                ray.get(spare.ready)
                ready.append((ray.get(spare.node).node_id in avoid_nodes, spare))
            except ray.exceptions.RayError as err:
                log.warning("a hot spare failed to start and is replaced: %s", str(err).strip().splitlines()[0])
                self._spares.remove(spare)
                ray.kill(spare.actor, no_restart=True)  # one whose set-up raised lives on, holding its bundle
                self.refill_later(spare.bundle)
        if not ready:
            return None
        _, spare = min(ready, key=lambda pair: pair[0])  # False (off the lost nodes) first
        self._spares.remove(spare)
        return spare.actor, spare.bundle

    def refill_later(self, bundle: int) -> None:
        """`bundle` (a used spare left it) gets a new spare at the next `replenish`."""
        self._free_bundles.append(bundle)

    def replenish(self) -> None:
        for bundle in self._free_bundles:
            self.add(bundle)
        self._free_bundles = []

    def actors(self) -> list[ray.actor.ActorHandle]:
        return [spare.actor for spare in self._spares]

    def refs(self) -> list[ray.ObjectRef]:
        """The spares' set-up calls, to read once they are killed."""
        return [ref for spare in self._spares for ref in (spare.ready, spare.node)]

    def clear(self) -> None:
        self._spares, self._free_bundles = [], []
