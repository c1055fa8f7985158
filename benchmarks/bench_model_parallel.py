"""Benchmark of model-parallel MPL: what the link between the teacher half and the student half
costs.

Cases (same seeded models, same batches, same number of CPU threads per network):
  one process   mpl_fast.algo.MPL with the default in-process link (both networks here)
  two ranks     the rank-pair layout: rank 0 the teacher, rank 1 the student, gloo send/recv of y_hat,
                (h, loss_student) and ok each step (torch.multiprocessing, file rendezvous)
  four ranks    the rank-groups layout, k = 2: ranks 0-1 the teacher, 2-3 the student, each rank on half of
                the same global batch, each half averaging its gradients over its 2 ranks
                (--groups-world to change 2k; 0 skips the case)

The halves depend on each other (teacher forward -> y_hat -> student step -> h -> teacher
step), so two processes cannot overlap them: on a CPU "two ranks" measures the link's latency
and the process split, not a speed-up. On GPUs the point of the layout is memory (each network
gets a whole device), see `python -m mpl_fast.train --dry-run`. One process runs before and
after the two ranks (timing noise on a shared machine shows as the gap between the two).

    python benchmarks/bench_model_parallel.py [--quick] [--steps 20] [--groups-world 4] [--json PATH]
                                              [--profile DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402 - benchmarks/ is on the path when run as a script

from mpl_fast.algo import MPL, MPLConfig, Schedules  # noqa: E402
from mpl_fast.models import create_model  # noqa: E402
from mpl_fast.optim import FusedSGD  # noqa: E402
from mpl_fast.parallel.data_parallel import GradientAverager  # noqa: E402
from mpl_fast.parallel.model_parallel import HalfGroups  # noqa: E402

WARMUP = 3


def _setup(args) -> dict:
    if args.quick:
        return dict(model="digits-cnn", shape=(1, 8, 8), classes=10, batch=16, mu=4)
    return dict(model="wrn28-2", shape=(3, 32, 32), classes=10, batch=8, mu=2)


def _batches(setup: dict, steps: int):
    g = torch.Generator().manual_seed(0)
    b, u = setup["batch"], setup["batch"] * setup["mu"]
    out = []
    for _ in range(steps):
        x_uw = torch.randn(u, *setup["shape"], generator=g)
        x_l = torch.randn(b, *setup["shape"], generator=g)
        y_l = torch.randint(0, setup["classes"], (b,), generator=g)
        out.append(((x_l, y_l), (x_uw, x_uw + 0.3 * torch.randn(u, *setup["shape"], generator=g))))
    return out


def _mpl(setup: dict, role: str = "both", link=None, grad_sync=None) -> MPL:
    torch.manual_seed(0)
    in_channels = setup["shape"][0]
    student = create_model(setup["model"], setup["classes"], in_channels=in_channels)
    teacher = create_model(setup["model"], setup["classes"], in_channels=in_channels)
    student, teacher = (None if role == "teacher" else student), (None if role == "student" else teacher)
    opt = lambda m: None if m is None else FusedSGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True)  # noqa: E731
    schedules = Schedules(total_steps=1000, teacher_lr=0.05, student_lr=0.05, uda_weight=1.0)
    return MPL(teacher, student, opt(teacher), opt(student), schedules, MPLConfig(ema_decay=0.99), link=link,
               grad_sync=grad_sync)


def _shard(batches, index: int, k: int):
    """Shard ``index`` of ``k`` of every global batch (the rows peers i and k+i read)."""
    def part(t):
        n = t.shape[0] // k
        return t[index * n:(index + 1) * n]

    return [((part(x_l), part(y_l)), (part(x_uw), part(x_us))) for (x_l, y_l), (x_uw, x_us) in batches]


def _time_steps(mpl: MPL, batches, profile_path: str | None = None) -> list[float]:
    times = []
    prof = None
    if profile_path:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        prof.__enter__()
    for i, (labeled, unlabeled) in enumerate(batches):
        t0 = time.perf_counter()
        mpl.step(labeled, unlabeled, clock=i)
        times.append(time.perf_counter() - t0)
    if prof is not None:
        prof.__exit__(None, None, None)
        prof.export_chrome_trace(profile_path)
    return times[WARMUP:]


def _rank(rank: int, world: int, init_file: str, setup: dict, steps: int, out_dir: str, profile_dir: str | None):
    torch.set_num_threads(setup["threads"])
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    groups = HalfGroups.create(world, rank)
    k = groups.per_half
    grad_sync = GradientAverager(groups.half_group) if k > 1 else None
    mpl = _mpl(setup, groups.role, groups.link("cpu", "hard", setup["classes"]), grad_sync)
    profile = os.path.join(profile_dir, f"{world}_ranks_{groups.role}{groups.index}.json") if profile_dir else None
    times = _time_steps(mpl, _shard(_batches(setup, steps), groups.index, k), profile)
    torch.save({"times": times, "h": float(mpl.totals["h"])}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _ranks(world: int, setup: dict, steps: int, profile_dir: str | None) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, os.path.join(tmp, "rendezvous"), setup, steps, tmp, profile_dir),
                 nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_flags(parser, quick="digits CNN at 8x8 (link latency dominates)", devices=("cpu",), threads=1,
                            threads_help="torch threads per network (default 1)",
                            profile="write torch.profiler Chrome traces here")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case (after 3 warm-up steps)")
    parser.add_argument("--groups-world", type=int, default=4,
                        help="2k ranks for the rank-groups case (k per network, batch / k each); 0 skips it")
    args = parser.parse_args()
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    torch.set_num_threads(args.threads)
    setup = {**_setup(args), "threads": args.threads}
    steps = args.steps + WARMUP
    batches = _batches(setup, steps)

    single = _mpl(setup)
    before = _time_steps(single, batches)
    ranks = _ranks(2, setup, steps, args.profile)
    groups = _ranks(args.groups_world, setup, steps, args.profile) if args.groups_world > 2 else None
    again = _mpl(setup)
    after = _time_steps(again, batches, os.path.join(args.profile, "one_process.json") if args.profile else None)
    # The two processes ran the same steps as one: their summed h must agree with one process's.
    h_one, h_two = float(single.totals["h"]), ranks[0]["h"]

    u = setup["batch"] * setup["mu"]
    link_bytes = u * 8 + 2 * 4 + 1  # y_hat (int64 per row), (h, loss_student) fp32, ok
    one = statistics.median(before + after)
    two = statistics.median(ranks[0]["times"])
    rows = [("one process (before)", statistics.median(before)), ("one process (after)", statistics.median(after)),
            ("two ranks (gloo)", two)]
    if groups is not None:  # the step ends when the slowest rank's does: rank 0 waits for every h
        many = statistics.median(groups[0]["times"])
        rows.append((f"{args.groups_world} ranks (k={args.groups_world // 2})", many))
    print(f"{setup['model']} {setup['shape']}, labeled {setup['batch']}, unlabeled {u} (weak + strong), "
          f"{args.threads} CPU thread(s) per network, {args.steps} timed steps; baseline: one process (median of both)")
    common.print_table([{"case": name, "baseline": 1e3 * one, "ours": 1e3 * t} for name, t in rows], unit=" ms")
    print(f"across the link per step: {link_bytes} bytes (y_hat {u} x int64, h and the student's loss, ok); "
          f"summed h one process {h_one:+.6e}, two ranks {h_two:+.6e}"
          + (f", {args.groups_world} ranks {groups[0]['h']:+.6e}" if groups is not None else ""))
    common.write_results(args, "model_parallel", {
        "setup": setup, "steps": args.steps, "threads_per_network": args.threads,
        "one_process_ms": {"before": 1e3 * statistics.median(before), "after": 1e3 * statistics.median(after)},
        "two_ranks_ms": 1e3 * two, "ratio_two_ranks_vs_one": two / one, "link_bytes_per_step": link_bytes,
        "h_sum": {"one_process": h_one, "two_ranks": h_two,
                  **({f"{args.groups_world}_ranks": groups[0]["h"]} if groups is not None else {})},
        **({"groups_world": args.groups_world, "groups_ms": 1e3 * many, "ratio_groups_vs_one": many / one}
           if groups is not None else {}),
    }, tag=setup["model"], threads=args.threads)


if __name__ == "__main__":
    main()
