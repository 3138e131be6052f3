"""Fault injection, for testing a setup's recovery: `faults: "kill:1@5, stall:0@8"`.

- `kill:R@S`  rank R's process kills itself (SIGKILL) as step S starts: a crash.
- `stall:R@S` rank R stops making progress as step S starts (sleeps for an hour): a hang.
- `error:R@S` rank R raises an error every time it starts step S: a deterministic failure,
  like an out-of-memory error from a batch too large or an unreadable file.
- `slow:R@S`  rank R takes SLOW_DELAY_S longer to load each batch from step S on: a straggler
  (a slow disk, a busy host), which its peers wait for at their next collective.

A kill or a stall fires once per run: after a recovery, the driver re-arms only the faults
past the last step it had handed out, so faults closer together than the steps in flight
(calls_in_flight x steps_per_call) may not all fire.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass
from typing import Literal

from distrib.errors import ConfigError

_FAULT = re.compile(r"^(kill|stall|error|slow):(\d+)@(\d+)$")
SLOW_DELAY_S = 0.2
"""What `slow` adds to each of its rank's steps, in the data phase."""


@dataclass(frozen=True)
class Fault:
    kind: Literal["kill", "stall", "error", "slow"]
    rank: int
    step: int


def parse(text: str, *, num_workers: int) -> list[Fault]:
    """The faults in a `faults` config string; ConfigError on a malformed entry or a missing rank."""
    faults = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        match = _FAULT.match(entry)
        if not match:
            raise ConfigError(f"faults: {entry!r} is invalid: write KIND:RANK@STEP with KIND kill, stall, error "
                              "or slow, comma-separated")
        fault = Fault(kind=match[1], rank=int(match[2]), step=int(match[3]))
        if fault.rank >= num_workers:
            raise ConfigError(f"faults: {entry!r} is invalid: rank {fault.rank} does not exist with "
                              f"num_workers={num_workers}")
        faults.append(fault)
    return faults


def unspent(faults: list[Fault], *, handed_out: int | None) -> list[Fault]:
    """The faults still to come once the steps up to `handed_out` were handed to the replicas
    (None: none were): a kill or stall there has fired; an error fault fires every time it
    comes, and a slow one on every step from its own."""
    if handed_out is None:
        return faults
    return [f for f in faults if f.step > handed_out or f.kind in ("error", "slow")]


def fire(fault: Fault) -> None:
    """Make this process fail as `fault` says."""
    if fault.kind == "error":
        raise RuntimeError(f"injected error at step {fault.step}")
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(SLOW_DELAY_S if fault.kind == "slow" else 3600)
