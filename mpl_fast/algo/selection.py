"""Which network a run selects on validation (keeps the best-validation weights of, finetunes,
and hands to the labeller by default): one rule for the trainer (mpl_fast.train.evaluate) and
for readers of a finished run (mpl_fast.reduced.run_folder)."""

from __future__ import annotations


def selected_network(method: str | None, has_ema: bool) -> str:
    """"teacher" for --method uda (UDA trains the teacher alone); else the student's EMA when the
    run keeps one (--mpl.ema-decay > 0), else "student"."""
    if method == "uda":
        return "teacher"
    return "ema" if has_ema else "student"
