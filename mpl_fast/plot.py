"""Training curves of one or more runs as one PNG:
``python -m mpl_fast.plot RUN_DIR [RUN_DIR ...] [--out FILE.png]``.

Panels: the teacher's losses (total, supervised, UDA, MPL term), the student's loss, the
feedback h, both learning rates, and validation and test top-1 of every network evaluated;
the final evaluation's selected and finetuned models appear as points at the last step.
Several runs (e.g. the four methods on one preset) are overlaid: one colour per run, one line
style per quantity. Default output: RUN_DIR/metrics.png for one run, metrics-comparison.png in
the current folder for several.

metrics.jsonl is read tolerantly: a line that is not complete JSON (a run still writing it, or
killed mid-line) is skipped, and NaN/Infinity or null values leave gaps in the curves.
matplotlib is an optional dependency: ``pip install mpl_fast[plot]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from mpl_fast import runs

# (panel title, the metrics.jsonl keys it shows, which lines: "train" or "eval")
PANELS = (
    ("teacher losses", ("loss_teacher", "loss_sup", "loss_uda", "loss_mpl"), "train"),
    ("student loss", ("loss_student",), "train"),
    ("feedback h", ("h",), "train"),
    ("learning rate", ("lr_teacher", "lr_student"), "train"),
    ("validation top-1 (%)", "val_", "eval"),
    ("test top-1 (%)", "test_", "eval"),
)
LINE_STYLES = ("-", "--", ":", "-.")
MODEL_ORDER = ("student", "ema", "teacher", "selected", "finetuned")


class PlotError(RuntimeError):
    """Curves that cannot be drawn; the message is one sentence."""


def read_metrics(run_dir: str) -> dict:
    """{"train": [...], "eval": [...], "final": {...} or None, "skipped_lines": n} of a run."""
    path = os.path.join(runs.check_run_dir(run_dir), "metrics.jsonl")
    if not os.path.isfile(path):
        raise runs.RunError(f"{run_dir} has no metrics.jsonl (is it the --output-dir of a training run?)")
    out = {"train": [], "eval": [], "final": None, "skipped_lines": 0}
    with open(path, encoding="utf-8", errors="replace") as f:
        for text in f:
            if not text.strip():
                continue
            try:
                line = json.loads(text)  # json reads NaN and Infinity as floats
            except ValueError:
                out["skipped_lines"] += 1
                continue
            if not isinstance(line, dict) or not isinstance(line.get("step"), (int, float)):
                out["skipped_lines"] += 1
                continue
            if line.get("final"):
                out["final"] = line
            elif line.get("eval"):
                out["eval"].append(line)
            else:
                out["train"].append(line)
    return out


def _value(v) -> float:
    """A plottable number: None, non-numbers and infinities become NaN (a gap)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v) if math.isfinite(v) else math.nan


def series(metrics: dict, keys, kind: str) -> dict[str, tuple[list, list]]:
    """{key: (steps, values)} of the panel's keys (a prefix string: every model with it) that
    have at least one finite value."""
    lines = metrics[kind]
    if isinstance(keys, str):
        prefix = keys
        found = {k for line in lines for k in line if k.startswith(prefix)}
        order = {f"{prefix}{m}": i for i, m in enumerate(MODEL_ORDER)}
        keys = sorted(found, key=lambda k: (order.get(k, len(order)), k))
    out = {}
    for key in keys:
        steps = [line["step"] for line in lines if key in line]
        values = [_value(line[key]) for line in lines if key in line]
        if any(not math.isnan(v) for v in values):
            out[key] = (steps, values)
    return out


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
        from matplotlib.figure import Figure  # noqa: PLC0415
        from matplotlib.lines import Line2D  # noqa: PLC0415
    except ImportError:
        raise PlotError("plotting needs matplotlib, which is not installed: pip install mpl_fast[plot]") from None
    return Figure, FigureCanvasAgg, Line2D


def run_labels(run_dirs: list[str]) -> list[str]:
    """Short distinct names: the folder names, or the whole paths where those repeat."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    return names if len(set(names)) == len(names) else [os.path.normpath(d) for d in run_dirs]


def plot_runs(run_dirs: list[str], out: str) -> dict:
    """Draws the runs' curves into the PNG ``out`` (no pyplot: safe to call from a training
    loop or a thread). Returns {"path", "panels": {title: number of curves}, "skipped_lines"}."""
    Figure, FigureCanvasAgg, Line2D = _matplotlib()
    metrics = [read_metrics(d) for d in run_dirs]
    labels = run_labels(run_dirs)
    fig = Figure(figsize=(15, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    colours = [f"C{i % 10}" for i in range(len(run_dirs))]
    counts = {}
    for ax, (title, keys, kind) in zip(axes, PANELS):
        drawn, styles = 0, {}
        for m, colour in zip(metrics, colours):
            for key, (steps, values) in series(m, keys, kind).items():
                style = styles.setdefault(key, LINE_STYLES[len(styles) % len(LINE_STYLES)])
                ax.plot(steps, values, color=colour, linestyle=style, marker="." if kind == "eval" else None)
                drawn += 1
            if kind == "eval" and m["final"]:
                drawn += _final_points(ax, m["final"], keys, colour)
        counts[title] = drawn
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if title == "feedback h":
            ax.axhline(0.0, color="grey", linewidth=0.8)
        if styles:
            handles = [Line2D([], [], color="black", linestyle=s, label=k) for k, s in styles.items()]
            ax.legend(handles=handles, fontsize=8)
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    if len(run_dirs) > 1:
        fig.legend(handles=[Line2D([], [], color=c, label=name) for c, name in zip(colours, labels)],
                   loc="outside lower center", ncol=min(len(labels), 4), fontsize=9)
    fig.suptitle(labels[0] if len(labels) == 1 else f"{len(labels)} runs")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    return {"path": out, "panels": counts, "skipped_lines": sum(m["skipped_lines"] for m in metrics)}


def _final_points(ax, final: dict, prefix: str, colour: str) -> int:
    """The final evaluation's selected and finetuned accuracies as labelled points."""
    drawn = 0
    for name, marker in (("selected", "s"), ("finetuned", "*")):
        v = _value(final.get(prefix + name))
        if not math.isnan(v):
            ax.plot([final["step"]], [v], color=colour, marker=marker, markersize=9, linestyle="none")
            ax.annotate(name, (final["step"], v), textcoords="offset points", xytext=(4, 4), fontsize=7)
            drawn += 1
    return drawn


def default_out(run_dirs: list[str]) -> str:
    return os.path.join(run_dirs[0], "metrics.png") if len(run_dirs) == 1 else "metrics-comparison.png"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpl_fast.plot",
                                description="Training curves of one or more runs (overlaid) as a PNG.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training run folders (their --output-dir)")
    p.add_argument("--out", default=None, metavar="FILE.png",
                   help="default: RUN_DIR/metrics.png for one run, ./metrics-comparison.png for several")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or default_out(args.run_dirs)
    try:
        result = plot_runs(args.run_dirs, out)
    except (runs.RunError, PlotError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    note = f" ({result['skipped_lines']} incomplete metrics lines skipped)" if result["skipped_lines"] else ""
    print(f"wrote {result['path']}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
