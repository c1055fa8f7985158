"""``python -m mpl_fast.train``: parse the flags, validate the config, then train (or, with
``--dry-run``, print the memory plan and exit). Exit codes: mpl_fast.train.errors."""

from __future__ import annotations

import sys

from mpl_fast.checkpoint import CheckpointError
from mpl_fast.data.bad_data import CorruptImageError
from mpl_fast.metrics_log import MetricsFileError
from mpl_fast.train.cli import build_parser, config_from_args
from mpl_fast.train.config import validate
from mpl_fast.train.errors import EXIT_BAD_INPUT, EXIT_FINISHED, EXIT_NONFINITE, EXIT_RANK_FAILED, EXIT_STOPPED, report
from mpl_fast.train.loop import DataParallelFailure, TrainingStopped, run
from mpl_fast.train.plan import dry_run_report
from mpl_fast.train.resume_flags import given_flags
from mpl_fast.train.topology import dry_run_layouts, env_world_size


def main(argv: list[str] | None = None) -> int:
    """The command line's exit status (mpl_fast.train.errors): 0 finished, 2 bad input, 3 too
    many non-finite steps, 4 another rank failed, 5 stopped by a signal (checkpoint saved)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config and args.resume:
        parser.error("--config and --resume cannot be combined: a resumed run continues with its own config.json")
    if args.overwrite and args.resume:
        parser.error("--overwrite and --resume cannot be combined: --resume continues the run, --overwrite replaces it")
    try:
        cfg = config_from_args(args)  # the preset, then the --config file, then the flags
        if not args.resume:  # a resume validates the run's own config with the changes applied
            validate(cfg)
    except ValueError as exc:
        parser.error(str(exc))
    if args.dry_run:
        print(dry_run_report(cfg, **dry_run_layouts(cfg, env_world_size())))
        return EXIT_FINISHED
    try:
        result = run(cfg, resume=args.resume, dist_timeout=args.dist_timeout, overwrite=args.overwrite,
                     resume_changes=given_flags(args) if args.resume else None,
                     allow_world_size_change=args.allow_world_size_change)
    except TrainingStopped as exc:
        return report(exc, EXIT_NONFINITE)
    except DataParallelFailure as exc:
        return report(exc, EXIT_RANK_FAILED)
    except KeyboardInterrupt as exc:  # before the run's own signal handling was installed
        exc.args = ("interrupted before training started: nothing was saved",)
        return report(exc, EXIT_STOPPED)
    except SystemExit as exc:  # the trainer's own SystemExit("error: ...") refusals
        if isinstance(exc.code, str):  # printed once here; the exit status becomes bad input's
            exc.code = report(exc, EXIT_BAD_INPUT)
        raise
    # User-caused: a flag, data or checkpoint file the run cannot use, a full disk, a folder it
    # cannot write. Their messages name the file; anything else keeps its traceback.
    except (CheckpointError, MetricsFileError, CorruptImageError, ValueError, OSError) as exc:
        return report(exc, EXIT_BAD_INPUT)
    return EXIT_STOPPED if isinstance(result, dict) and result.get("interrupted") else EXIT_FINISHED


if __name__ == "__main__":
    sys.exit(main())
