"""What a run shows a person while it goes: a bar on a terminal, plain lines in a log.

On a terminal, a tqdm bar with the latest loss and images/s; in a log (a job's
output, CI) a plain line every tenth of the run instead, since a bar's carriage
returns make a log unreadable. Messages (restarts, waits) go above the bar.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from distrib.metrics import StepMetrics

LOG_LINES_PER_RUN = 10
"""Plain progress lines over a whole run, when stderr is not a terminal."""


def say(text: str) -> None:
    """One message line on stderr, above the bar if there is one."""
    tqdm.write(text, file=sys.stderr)


class Progress:
    """Progress towards `end_step` of a run of `total_steps` steps, on stderr; nothing at all
    when not `enabled`."""

    def __init__(self, *, total_steps: int, steps_done: int, end_step: int, enabled: bool):
        self.total_steps = total_steps
        self.end_step = end_step
        on_terminal = sys.stderr.isatty()
        self._log_lines = enabled and not on_terminal
        self._log_every = max(1, total_steps // LOG_LINES_PER_RUN)
        self._bar = tqdm(total=total_steps, initial=steps_done, unit="step", dynamic_ncols=True, file=sys.stderr,
                         disable=not (enabled and on_terminal))

    def advance(self, num_steps: int, steps_done: int, latest: StepMetrics) -> None:
        """`num_steps` more steps are done (`steps_done` in all); `latest` is the last of them."""
        self._bar.update(num_steps)
        self._bar.set_postfix(loss=f"{latest.loss:.4f}", img_s=f"{latest.images_per_s:.0f}")
        if self._log_lines and (steps_done % self._log_every < num_steps or steps_done == self.end_step):
            say(f"step {steps_done}/{self.total_steps}: loss {latest.loss:.4f}, "
                f"{latest.images_per_s:.0f} images/s")

    def rewind(self, steps_done: int) -> None:
        """The run went back to `steps_done` (a recovery)."""
        self._bar.reset(total=self.total_steps)
        self._bar.update(steps_done)

    def close(self) -> None:
        self._bar.close()
