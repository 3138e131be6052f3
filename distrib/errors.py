"""Every error type distrib raises on purpose, in one place.

No module imports another for its errors, so there are no import cycles through
them, and the CLI maps each type to an exit code at its top:

    ConfigError, CheckpointError                  -> exit 2 (bad input; nothing started)
    ReplicaError, DivergenceError, PlacementError,
    WriteError                                    -> exit 1 (the run failed)
    StoppedAtOnce                                 -> exit 128 + the signal's number

Every message is one line that names what went wrong and the fix.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot run; the message is one line, naming key, value and rule."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


class ReplicaError(RuntimeError):
    """A replica failed, died or timed out; the message names the ranks, their nodes and the step."""

    def __init__(self, message: str, *, ranks: list[int], step: int | None = None, lost: bool = True,
                 cause: str = ""):
        super().__init__(message)
        self.ranks = ranks
        """World ranks to blame (the dead or stuck ones, not the peers they broke)."""
        self.step = step
        """Last step handed to the replicas when it failed (None outside training)."""
        self.lost = lost
        """Whether `ranks` are gone or stuck and must be replaced; False when they raised an error
        and live on (they left their process group and can join a new one)."""
        self.cause = cause or message
        """What went wrong, without names of ranks, nodes or pids: the same failure at the same
        step gives the same cause, which tells a deterministic failure from a fault."""
        self.outstanding: list = []
        """Refs of the calls queued behind the failure, which the recovery must consume."""


class ReplicaTimeout(ReplicaError):
    """Replicas did not finish a call within its timeout (a hang, a stall, a lost peer)."""


class DivergenceError(RuntimeError):
    """Replicas that must be bit-identical are not; names the rank and the first differing tensor."""


class PlacementError(RuntimeError):
    """The cluster could not hold all the replicas within start_timeout_s."""


class WriteError(RuntimeError):
    """A checkpoint could not be written mid-run (a full disk, a store's error, an upload that
    did not read back whole); names the file and the cause. The checkpoints before it stand."""


class StoppedAtOnce(BaseException):
    """A stop signal that ends the run at once, without a checkpoint at the step reached: a
    second signal, or one before training began. A BaseException, like KeyboardInterrupt,
    so that no `except Exception` on the way swallows it."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


def first_line(err: BaseException) -> str:
    """The first line of an error's text (a store's or a replica's run to several), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
