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


class SparePool:
    def __init__(self, start: Callable[[int], tuple[ray.actor.ActorHandle, ray.ObjectRef]]):
        """`start(bundle)` starts an actor in that bundle and its `prepare`: (actor, prepare ref)."""
        self._start = start
        self._spares: list[_Spare] = []
        self._free_bundles: list[int] = []

    def add(self, bundle: int) -> None:
        actor, ready = self._start(bundle)
        self._spares.append(_Spare(actor, bundle, ready))

    def take(self) -> tuple[ray.actor.ActorHandle, int] | None:
        """A spare whose model is built, out of the pool: (actor, its bundle); None when none is
        ready. Spares that failed to start (their node went) are dropped on the way."""
        if not self._spares:
            return None
        done, _ = ray.wait([s.ready for s in self._spares], num_returns=len(self._spares), timeout=0)
        for spare in [s for s in self._spares if s.ready in done]:
            self._spares.remove(spare)
            try:
                ray.get(spare.ready)
                return spare.actor, spare.bundle
            except ray.exceptions.RayError as err:
                log.warning("a hot spare failed to start and is dropped: %s", str(err).strip().splitlines()[0])
        return None

    def refill_later(self, bundle: int) -> None:
        """`bundle` (a used spare left it) gets a new spare at the next `replenish`."""
        self._free_bundles.append(bundle)

    def replenish(self) -> None:
        for bundle in self._free_bundles:
            self.add(bundle)
        self._free_bundles = []

    def actors(self) -> list[ray.actor.ActorHandle]:
        return [spare.actor for spare in self._spares]

    def clear(self) -> None:
        self._spares, self._free_bundles = [], []
