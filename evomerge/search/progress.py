"""The live progress bar of a search stage (tqdm on stderr): trials done, best objective, failures, item
evaluations spent, trials/h."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from tqdm import tqdm

from evomerge.search.objectives import Objective, format_best


class Progress:
    """One stage's bar; a disabled one does nothing.

    Args:
        enabled: whether to show it.
        total: the stage's trial budget (None or inf: unknown).
        done: trials of the stage already finished (a resumed run).
        label: shown before the bar (``NAME:STAGE``).
    """

    def __init__(self, enabled: bool, total: float | None, done: int, label: str):
        self.bar = None
        if enabled:
            self.bar = tqdm(total=None if total is None or total == float("inf") else int(total), initial=done,
                            desc=label, unit="trial", file=sys.stderr, mininterval=0.5, dynamic_ncols=True)
        self.start_done = done
        # the rate counts from the first trial finished in this part (not Ray's and the workers' start-up)
        self.rate_from: tuple[float, int] | None = None

    def update(self, done: int, failed: int, best: float | None, objectives: Sequence[Objective],
               items: int = 0, nodes_lost: int = 0) -> None:
        """Show ``done`` trials, ``failed`` of them failed, the best weighted score ``best`` (of fully scored
        trials), the ``items`` evaluations the stage's trials spent, and the Ray nodes lost with their workers
        during this part of the run (shown once there is one)."""
        if self.bar is None:
            return
        if self.rate_from is None and done > self.start_done:
            self.rate_from = (time.monotonic(), done)
        rate = 0.0
        if self.rate_from is not None and done > self.rate_from[1]:
            rate = (done - self.rate_from[1]) / max(1e-9, time.monotonic() - self.rate_from[0]) * 3600
        lost = f" nodes_lost={nodes_lost}" if nodes_lost else ""
        self.bar.set_postfix_str(f"best={format_best(best, objectives)} failed={failed} "
                                 f"items={format_count(items)} trials/h={rate:.0f}{lost}", refresh=False)
        self.bar.n = done
        self.bar.refresh()

    def note(self, line: str) -> None:
        """Print ``line`` on stderr (above the bar when there is one)."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()


def format_count(n: int) -> str:
    """A count for the bar: 950, 12.3k, 4.56M."""
    if n < 10_000:
        return str(n)
    if n < 10_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1e6:.2f}M"
