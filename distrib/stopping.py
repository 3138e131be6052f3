"""StopRequest: a request to end a run early, from a signal handler, another thread or a caller.

The first request asks for a graceful stop: the driver queues no more steps, finishes
the calls in flight and checkpoints at that step boundary, all within `grace_s`. A
second request, or one before training began, asks for a stop at once: every wait
raises StoppedAtOnce within half a second. Requests only set fields, so they are safe
from a signal handler (which must not raise inside ray.wait).
"""

from __future__ import annotations

import time

from distrib.errors import StoppedAtOnce


class StopRequest:
    def __init__(self, grace_s: float):
        self._grace_s = grace_s
        self.reason: str | None = None
        """Why the run was asked to stop (e.g. 'SIGTERM'); None while it may run on."""
        self.deadline: float | None = None
        """time.monotonic() past which no wait of a graceful stop goes; None before a request."""
        self._abort_reason: str | None = None

    def request(self, reason: str, *, training: bool) -> bool:
        """Record a request; returns whether it stops gracefully (the first one, while training)."""
        if self.reason is None:
            self.reason = reason
            self.deadline = time.monotonic() + self._grace_s
            if training:
                return True
        self._abort_reason = reason
        return False

    def check_abort(self) -> None:
        """Raise StoppedAtOnce if a stop at once was asked for."""
        if self._abort_reason is not None:
            raise StoppedAtOnce(self._abort_reason)
