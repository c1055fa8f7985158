"""Data-parallel MPL on the CPU (gloo): what the explicit gradient averaging costs.

Two ranks (torch.multiprocessing, one thread each) build the trainer's MPL step
(``mpl_fast.train.build_mpl``, the preset's model) and time it on their per-rank batch:

  sync      the data-parallel step: g_u, g_l' and the teacher's gradients + losses averaged
            by ``GradientAverager`` (three all_reduce calls per step);
  no sync   the same step in the same processes without averaging (each rank alone).

  fsdp      (``--fsdp``) the same step with teacher, student and EMA sharded over the ranks
            (FSDP2, ``ShardedSync``), against the data-parallel step, plus each rank's bytes of
            parameters + gradients + momentum (+ EMA) in both layouts.

Blocks of the two alternate, so that both see the same machine load; the ratio sync / no-sync
is the price of the averaging. Then one process (with one, then two threads) runs the
single-process step on the global batch (2 x B) and the throughput of the layouts (images/s of
the global batch) is compared. On a shared 2-core VM only ratios measured in one run mean anything.

    python benchmarks/bench_data_parallel.py [--preset digits] [--model NAME] [--batch 16] [--steps 30]
                                             [--fsdp] [--quick] [--json PATH] [--profile DIR]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402 - benchmarks/ is on the path when run as a script

WORLD = 2


def _config(preset_name: str, batch: int, model: str | None = None, channels_last: bool = True):
    from mpl_fast.train.config import preset

    cfg = preset(preset_name)
    cfg.data.batch_size = batch
    cfg.channels_last = channels_last
    if model is not None:
        cfg.model.name = model
    cfg.mpl.student_wait_steps = 0  # every timed step is a full MPL step (h included)
    if cfg.data.dataset not in ("digits", "two-moons"):
        raise SystemExit("bench_data_parallel uses the embedded data sets (digits, two-moons): no files needed")
    return cfg


def _time_steps(mpl, streams, steps: int, clock0: int) -> list[float]:
    """Seconds per step (data drawn before the clock starts: the step alone is timed)."""
    times = []
    for i in range(steps):
        labeled, unlabeled = next(streams.labeled), next(streams.unlabeled)
        t0 = time.perf_counter()
        mpl.step(labeled, unlabeled, clock=clock0 + i)
        times.append(time.perf_counter() - t0)
    return times


def _state_bytes(mpl) -> int:
    """This rank's bytes of parameters, gradients and momentum of teacher and student, and of the
    EMA's parameters (its shards under --fsdp)."""
    from mpl_fast.shards import local

    tensors = []
    for net, opt in ((mpl.teacher, mpl.teacher_opt), (mpl.student, mpl.student_opt)):
        for p in net.parameters():
            tensors += [local(p), local(p.grad)] + [local(v) for v in opt.state.get(p, {}).values()
                                                    if isinstance(v, torch.Tensor)]
    if mpl.ema is not None:
        tensors += [local(p) for p in mpl.ema.module.parameters()]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _time_fsdp(args, cfg, streams, dp_mpl, averager, clock: int) -> dict:
    """Alternating blocks of the data-parallel step and the --fsdp step, in the same processes."""
    from mpl_fast.parallel.data_parallel import ShardedSync
    from mpl_fast.train import build_mpl

    cfg = copy.deepcopy(cfg)
    cfg.fsdp = True
    torch.manual_seed(cfg.seed)
    fsdp_mpl = build_mpl(cfg, streams, grad_sync=ShardedSync())
    _time_steps(fsdp_mpl, streams, 3, 0)
    dp_mpl.grad_sync = averager
    dp, sharded = [], []
    block = max(1, args.steps // 5)
    while len(sharded) < args.steps:
        dist.barrier()
        dp += _time_steps(dp_mpl, streams, block, clock)
        dist.barrier()
        sharded += _time_steps(fsdp_mpl, streams, block, clock)
        clock += block
    out = {"dp_s": statistics.median(dp), "fsdp_s": statistics.median(sharded),
           "dp_bytes": _state_bytes(dp_mpl), "fsdp_bytes": _state_bytes(fsdp_mpl)}
    del fsdp_mpl
    return out


def _rank(rank: int, args, init_file: str, results):
    from mpl_fast.parallel.data_parallel import GradientAverager, NoGradientSync, StopAgreement, broadcast_from_rank0
    from mpl_fast.parallel.distributed import DistContext
    from mpl_fast.train import build_mpl, build_streams

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    cfg = _config(args.preset, args.batch, args.model, args.channels_last)
    torch.manual_seed(cfg.seed)
    streams = build_streams(cfg, DistContext(rank=rank, world_size=WORLD))
    averager = GradientAverager()
    mpl = build_mpl(cfg, streams, grad_sync=averager)
    broadcast_from_rank0(mpl.models().values())
    _time_steps(mpl, streams, 3, 0)  # warm-up: first allocations, flat buffers
    sync, alone, clock = [], [], 3
    block = max(1, args.steps // 5)
    while len(sync) < args.steps:
        mpl.grad_sync = averager
        dist.barrier()
        sync += _time_steps(mpl, streams, block, clock)
        mpl.grad_sync = NoGradientSync()
        dist.barrier()
        alone += _time_steps(mpl, streams, block, clock + block)
        clock += 2 * block
    if args.profile and rank == 0:
        mpl.grad_sync = averager
        os.makedirs(args.profile, exist_ok=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _time_steps(mpl, streams, 3, clock)
        prof.export_chrome_trace(os.path.join(args.profile, "bench_data_parallel_rank0.json"))
    elif args.profile:
        mpl.grad_sync = averager
        _time_steps(mpl, streams, 3, clock)
    agreement, polls = StopAgreement(), []
    for _ in range(args.steps):  # the trainer's per-step stop flag, timed alone
        t0 = time.perf_counter()
        agreement.poll(False)
        polls.append(time.perf_counter() - t0)
    agreement.drain()
    results[rank] = {"sync_s": statistics.median(sync), "alone_s": statistics.median(alone),
                     "stop_poll_s": statistics.median(polls),
                     **(_time_fsdp(args, cfg, streams, mpl, averager, clock) if args.fsdp else {})}
    del mpl, streams
    import gc

    gc.collect()  # sharded modules go before the process group
    dist.destroy_process_group()


def _single_process(args, threads: int) -> float:
    """Median seconds of the single-process step on the global batch (2 x B)."""
    from mpl_fast.train import build_mpl, build_streams

    torch.set_num_threads(threads)
    cfg = _config(args.preset, args.batch * WORLD, args.model, args.channels_last)
    torch.manual_seed(cfg.seed)
    streams = build_streams(cfg)
    mpl = build_mpl(cfg, streams)
    _time_steps(mpl, streams, 3, 0)
    return statistics.median(_time_steps(mpl, streams, args.steps, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_flags(parser, quick="10 steps", devices=("cpu",), threads=1,
                            threads_help="torch threads per rank (default 1)",
                            profile="write a Chrome trace of 3 DP steps (rank 0)")
    parser.add_argument("--preset", default="digits", choices=("digits", "two-moons"))
    parser.add_argument("--model", default=None, help="override the preset's model (e.g. wrn28-2)")
    parser.add_argument("--batch", type=int, default=16, help="labeled batch per rank (unlabeled: mu x that)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="NHWC conv layout for the unsharded runs (the trainer's default; --fsdp is always NCHW)")
    parser.add_argument("--fsdp", action="store_true", help="also time the --fsdp (FSDP2-sharded) step against DP")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if args.quick:
        args.steps = 10
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(args, os.path.join(tmp, "rendezvous"), results), nprocs=WORLD, join=True)
        per_rank = dict(results)
    single = {threads: _single_process(args, threads) for threads in (1, WORLD)}
    cfg = _config(args.preset, args.batch, args.model, args.channels_last)
    images = WORLD * args.batch * (1 + 2 * cfg.data.mu)  # labeled + weak + strong, global batch
    sync_s = max(r["sync_s"] for r in per_rank.values())  # a DP step lasts as long as its slowest rank
    alone_s = max(r["alone_s"] for r in per_rank.values())
    rows = [
        {"case": f"2 ranks x B={args.batch}: step with averaging vs without", "baseline_s": alone_s,
         "ours_s": sync_s, "ratio": sync_s / alone_s},
    ]
    for threads, single_s in single.items():
        rows.append({"case": f"global batch {WORLD * args.batch}: 1 process ({threads} thread(s)) vs 2 ranks "
                             f"({args.threads} thread(s) each)", "baseline_s": single_s, "ours_s": sync_s,
                     "ratio": sync_s / single_s,
                     "images_per_s_single": images / single_s, "images_per_s_dp": images / sync_s})
    if args.fsdp:
        dp_s = max(r["dp_s"] for r in per_rank.values())
        fsdp_s = max(r["fsdp_s"] for r in per_rank.values())
        rows.append({"case": f"2 ranks x B={args.batch}: data parallel vs --fsdp (sharded) step", "baseline_s": dp_s,
                     "ours_s": fsdp_s, "ratio": fsdp_s / dp_s,
                     "bytes_per_rank_dp": [r["dp_bytes"] for r in per_rank.values()],
                     "bytes_per_rank_fsdp": [r["fsdp_bytes"] for r in per_rank.values()]})
    poll_s = max(r["stop_poll_s"] for r in per_rank.values())
    layout = 'channels_last' if args.channels_last else 'NCHW'
    print(f"\n{args.preset} ({cfg.model.name}, {layout}), per-rank labeled batch {args.batch} "
          f"(+{cfg.data.mu}x unlabeled), {args.steps} steps, "
          f"median step time; CPU, gloo; ratio: ours / baseline (the cost)")
    common.print_table([{"case": r["case"], "baseline": r["baseline_s"] * 1e3, "ours": r["ours_s"] * 1e3,
                         "ratio": r["ratio"]} for r in rows], unit=" ms")
    print("images/s of the global batch (labeled + weak + strong): data parallel "
          f"{rows[1]['images_per_s_dp']:.0f}; single process " +
          ", ".join(f"{r['images_per_s_single']:.0f} ({t} thread(s))" for t, r in zip(single, rows[1:])))
    if args.fsdp:
        row = rows[-1]
        print("parameters + gradients + momentum (teacher, student) + EMA parameters, bytes per rank: data parallel "
              + ", ".join(f"{b / 2**20:.2f} MiB" for b in row["bytes_per_rank_dp"]) + "; --fsdp "
              + ", ".join(f"{b / 2**20:.2f} MiB" for b in row["bytes_per_rank_fsdp"])
              + " (--fsdp runs NCHW: FSDP2 shards contiguous parameters only)")
    print(f"trainer's per-step stop flag (StopAgreement.poll, async gloo all_reduce): {poll_s * 1e6:.0f} us "
          f"({100 * poll_s / sync_s:.2f}% of a data-parallel step)")
    common.write_results(args, "data_parallel", {"stop_poll_s": poll_s, "preset": args.preset, "model": cfg.model.name,
                           "channels_last": args.channels_last,
                           "batch_per_rank": args.batch,
                           "steps": args.steps,
                           "world_size": WORLD, "per_rank": per_rank, "rows": rows},
                         tag=("fsdp_" if args.fsdp else "") + (args.model or args.preset), threads=args.threads)


if __name__ == "__main__":
    main()
