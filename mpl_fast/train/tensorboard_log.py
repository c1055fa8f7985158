"""--tensorboard: every number metrics.jsonl gets also goes to TensorBoard event files under
RUN_DIR/tensorboard, written by the rank that writes metrics.jsonl.

Tags name the kind of line and its key: ``train/loss_teacher``, ``train/h``, ``eval/val_ema``,
``final/test_finetuned``; the step is the line's step. A resumed run drops the events after its
checkpoint's step (TensorBoard's purge_step), as it drops those lines of metrics.jsonl. The
package is optional (``pip install mpl_fast[tensorboard]``); asking for it without the package is
refused before the run starts.
"""

from __future__ import annotations

import os

LINE_FLAGS = ("step", "eval", "final")  # what a metrics line says about itself, not a measurement


def check_available() -> None:
    """SystemExit with one sentence when torch's TensorBoard writer cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401, PLC0415
    except ImportError:
        raise SystemExit("error: --tensorboard needs the tensorboard package, which is not installed: "
                         "pip install mpl_fast[tensorboard] (or leave --tensorboard off)") from None


def scalars(line: dict) -> list[tuple[str, float]]:
    """(tag, value) of each number in a metrics line (NaN and infinities included, as TensorBoard
    shows them); None, booleans and text are left out."""
    kind = "final" if line.get("final") else "eval" if line.get("eval") else "train"
    return [(f"{kind}/{key}", float(value)) for key, value in line.items()
            if key not in LINE_FLAGS and isinstance(value, (int, float)) and not isinstance(value, bool)]


class TensorBoardLog:
    """An open event-file writer in ``run_dir``/tensorboard. ``resumed_at``: the step the run
    resumes from (later events of the earlier attempt are purged); None for a fresh run."""

    def __init__(self, run_dir: str, resumed_at: int | None = None, writer_class=None):
        if writer_class is None:
            from torch.utils.tensorboard import SummaryWriter as writer_class  # noqa: PLC0415
        self.log_dir = os.path.join(run_dir, "tensorboard")
        self.writer = writer_class(log_dir=self.log_dir,
                                   purge_step=None if resumed_at is None else resumed_at + 1)
        self.closed = False

    def write(self, line: dict) -> None:
        step = int(line["step"])
        for tag, value in scalars(line):
            self.writer.add_scalar(tag, value, global_step=step)
        if line.get("eval") or line.get("final"):  # rare lines: on disk at once, as in metrics.jsonl
            self.writer.flush()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()
