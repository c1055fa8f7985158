"""``python -m mpl_fast.train``: parse the flags, validate the config, then train (or, with
``--dry-run``, print the memory plan and exit)."""

from __future__ import annotations

import sys

from mpl_fast.train.cli import build_parser, config_from_args
from mpl_fast.train.config import validate
from mpl_fast.train.loop import DataParallelFailure, TrainingStopped, run
from mpl_fast.train.plan import dry_run_report
from mpl_fast.train.topology import dry_run_layouts, env_world_size


def main(argv: list[str] | None = None) -> int:
    """The command line's exit status: 0 done, 2 bad flags (argparse), 3 too many non-finite
    steps, 4 another rank failed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config and args.resume:
        parser.error("--config and --resume cannot be combined: a resumed run continues with its own config.json")
    try:
        cfg = config_from_args(args)  # the preset, then the --config file, then the flags
        validate(cfg)
    except ValueError as exc:
        parser.error(str(exc))
    if args.dry_run:
        print(dry_run_report(cfg, **dry_run_layouts(cfg, env_world_size())))
        return 0
    try:
        run(cfg, resume=args.resume, dist_timeout=args.dist_timeout)
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except DataParallelFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
