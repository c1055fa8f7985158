"""The trainer: ``python -m mpl_fast.train [--preset digits] [--method mpl] [...]``.

With no arguments it trains MPL on scikit-learn's bundled 8x8 digits on the CPU (about a
minute) and prints the test accuracies of the student, its EMA, the teacher and the
finetuned student. Every number of a preset can be overridden by a flag named after its
place in the configuration tree (``--teacher.lr 0.1``, ``--mpl.uda-weight 2``,
``--data.labels-per-class 4``; see ``--help``).

The run writes to ``--output-dir`` (default runs/<preset>-<method>-<timestamp>):
config.json, split.json, metrics.jsonl (one line per log interval and per evaluation),
checkpoint.pt (atomic; every ``--checkpoint-every`` steps, at the end and on SIGINT/SIGTERM),
summary.json, metrics.png (the curves; ``--no-plot``: not), finetuned.pt (the finetuned
student) and, with ``--tensorboard``, tensorboard/.

Where teacher and student live is the run's layout (mpl_fast.train.topology): "single-device"
(one process, or under ``torchrun --nproc_per_node=N`` data-parallel replicas, with ``--fsdp``
FSDP2 shards, over all ranks), "two-devices" (``--model-parallel`` in one process),
"rank-pair" (``--model-parallel`` on 2 torchrun ranks: a teacher rank and a student rank) and
"rank-groups" (``--model-parallel`` on 2k ranks: a teacher rank group and a student rank
group, each data parallel or FSDP). Batch sizes are per rank; rank 0 writes and prints.

The modules, in the order a run meets them:
  __main__       parse -> validate -> run (or --dry-run's plan)
  cli, config    the flags, generated from the config tree (TrainConfig) and its presets
  config_file    --config FILE: a saved config.json as the start, checked leaf by leaf
  topology       the layout, resolved once: placement, shards, gradient sync, seeds, who evaluates
  build          the public builders: streams, networks, optimizers, precision, MPL
  precision      the --amp policy: autocast dtype and loss scalers
  session        what a run holds, and setting it up
  loop           run(): the step loop, logging, signals, the end
  checkpointing  what a checkpoint holds, gathering it across ranks, resuming
  evaluate       accuracy, best-validation selection, finetuning, the summary
  curves         metrics.png, redrawn at evaluations and at the end
  tensorboard_log  --tensorboard: metrics.jsonl's numbers as event files
  plan           --dry-run: parameter counts and per-device memory estimates
"""

from mpl_fast.train.build import build_mpl, build_precision, build_streams
from mpl_fast.train.cli import build_parser, config_from_args
from mpl_fast.train.evaluate import accuracy
from mpl_fast.train.loop import DataParallelFailure, TrainingStopped, run
from mpl_fast.train.plan import dry_run_report
from mpl_fast.train.topology import LAYOUTS, Topology, resolve_topology

__all__ = ["run", "main", "build_mpl", "build_streams", "build_precision", "build_parser", "config_from_args",
           "dry_run_report", "accuracy", "resolve_topology", "Topology", "LAYOUTS", "TrainingStopped",
           "DataParallelFailure"]


def __getattr__(name: str):
    # main lives in __main__.py; importing that module here, eagerly, would make
    # ``python -m mpl_fast.train`` find it already imported and warn (runpy), so it loads on first use.
    if name == "main":
        from mpl_fast.train.__main__ import main  # noqa: PLC0415

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
