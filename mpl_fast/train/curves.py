"""metrics.png: the run's training curves (mpl_fast.plot), redrawn by the rank that writes
metrics.jsonl at each evaluation and at the end.

Drawing never fails a run: without matplotlib the run says so once and stops trying, and any
other error is reported once and drawing stops. One drawing costs about a second or two of CPU
(matplotlib's layout and PNG encoding, whatever the run's size), so an evaluation's redraw is
skipped while less than ``SPACING`` drawing-durations of wall time have passed since the last
one: drawing then takes at most ~1/SPACING of the run. The end's drawing is never skipped.
``--no-plot`` turns it off; ``MPL_FAST_NO_PLOT=1`` does for every run (a test suite).
"""

from __future__ import annotations

import os
import time
import typing

SPACING = 20.0


def plotting_enabled(cfg_plot: bool) -> bool:
    return cfg_plot and os.environ.get("MPL_FAST_NO_PLOT") != "1"


class Curves:
    """Redraws ``out_dir``/metrics.png from ``out_dir``/metrics.jsonl; ``say`` prints one line."""

    def __init__(self, out_dir: str, say: typing.Callable, clock: typing.Callable[[], float] = time.perf_counter):
        self.out_dir, self.say, self.clock = out_dir, say, clock
        self.path = os.path.join(out_dir, "metrics.png")
        self.stopped = False
        self.last_end: float | None = None  # when the last drawing finished
        self.last_cost = 0.0                # how long it took
        self.drawn = 0

    def due(self) -> bool:
        return self.last_end is None or self.clock() - self.last_end >= SPACING * self.last_cost

    def update(self, final: bool = False) -> bool:
        """Redraws metrics.png unless stopped (or, before the end, too soon); True if it drew."""
        if self.stopped or not (final or self.due()):
            return False
        from mpl_fast import plot  # noqa: PLC0415 - matplotlib only loads when a run draws

        start = self.clock()
        try:
            plot.plot_runs([self.out_dir], self.path)
        except plot.PlotError as exc:  # matplotlib missing
            self.stop(f"note: not drawing metrics.png: {exc}")
            return False
        except Exception as exc:  # noqa: BLE001 - the curves must never end a run
            self.stop(f"warning: drawing metrics.png failed ({type(exc).__name__}: {str(exc).strip()[:200]}); "
                      f"the run goes on without it (python -m mpl_fast.plot {self.out_dir} draws it later)")
            return False
        self.last_end = self.clock()
        self.last_cost = self.last_end - start
        self.drawn += 1
        return True

    def stop(self, message: str) -> None:
        self.stopped = True
        self.say(message)
