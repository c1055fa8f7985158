"""``python -m mpl_fast.train``: parse the flags, validate the config, then train (or, with
``--dry-run``, print the memory plan and exit)."""

from __future__ import annotations

import sys

from mpl_fast.train.cli import build_parser, config_from_args
from mpl_fast.train.config import validate
from mpl_fast.train.loop import DataParallelFailure, TrainingStopped, run
from mpl_fast.train.plan import dry_run_report
from mpl_fast.train.topology import env_world_size


def main(argv: list[str] | None = None) -> int:
    """The command line's exit status: 0 done, 2 bad flags (argparse), 3 too many non-finite
    steps, 4 another rank failed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    try:
        validate(cfg)
    except ValueError as exc:
        parser.error(str(exc))
    if args.dry_run:
        world_size = env_world_size()
        plan_for = {}
        if cfg.fsdp and world_size > 1:
            plan_for["fsdp_devices"] = world_size
        if cfg.model_parallel and world_size > 2 and world_size % 2 == 0:  # rank groups: 2k ranks
            plan_for.update(model_parallel_ranks=world_size, sharded_halves=cfg.fsdp)
        print(dry_run_report(cfg, **plan_for))
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
