"""What resumable DALI streams cost: the weak-view training pipeline's images/s with DALI
checkpointing on vs off, the time of one state_dict() (DALI's checkpoint), and the time to
the first batch of a resumed stream, from the checkpoint vs by skip-ahead (what a rank whose
own checkpoint was not saved does), for --skip batches already consumed.

All in the same run, same files. Prints a table and writes JSON.
Usage: python benchmarks/bench_dali_resume.py [--quick] [--json PATH] [--profile DIR]
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402 - benchmarks/ is on the path when run as a script

from mpl_fast.data.dali_pipeline import DaliTrainBatches, _train_pipeline, dali_unavailable_reason  # noqa: E402
from mpl_fast.data.tiny import write_tiny_imagefolder  # noqa: E402


def batches_from(files, args, checkpointing=True):
    def build(checkpoint):
        return _train_pipeline(files, list(range(len(files))), batch_size=args.batch,
                               image_size=args.size, flip=True, shard_id=0, num_shards=1,
                               reader_seed=1, seed=2, decode="cpu", device_id=None,
                               num_threads=args.threads, checkpoint=checkpoint,
                               checkpointing=checkpointing)
    return DaliTrainBatches(build, rank=0, world_size=1)


def images_per_s(stream, batches, warmup):
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        _, images, _ = next(stream)
    return batches * images.shape[0] / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_flags(parser, quick="few batches, for a smoke run", devices=("cpu",), threads=2,
                            threads_help="DALI threads (default 2)", profile="write a Chrome trace of a resume here")
    parser.add_argument("--batch", type=int, default=56)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--skip", type=int, default=None, help="batches consumed before the resume")
    parser.add_argument("--rounds", type=int, default=2, help="best of this many rounds per case")
    parser.add_argument("--machine", default=None,
                        help="a note on the machine's state (e.g. 'quiet'), kept in the JSON")
    args = parser.parse_args()
    reason = dali_unavailable_reason()
    if reason is not None:
        sys.exit(f"DALI cannot run: {reason}")
    batches, warmup = (3, 1) if args.quick else (10, 2)
    args.skip = args.skip or (4 if args.quick else 20)
    warnings.simplefilter("ignore")
    root = write_tiny_imagefolder(tempfile.mkdtemp(prefix="bench_dali_resume_"), num_classes=8,
                                  train_per_class=16 if args.quick else 48, val_per_class=1,
                                  bad_files=False)
    files = sorted(glob.glob(os.path.join(root, "train", "*", "*.jpg")))

    rates, save_s, restore_s, skip_s = {}, [], [], []
    for _ in range(args.rounds):  # interleaved rounds, best counts: the machine is shared
        for on in (False, True):
            rate = images_per_s(batches_from(files, args, on), batches, warmup)
            rates[on] = max(rates.get(on, 0.0), rate)
        stream = batches_from(files, args)
        for _ in range(args.skip):
            next(stream)
        start = time.perf_counter()
        state = stream.state_dict()
        save_s.append(time.perf_counter() - start)
        for target, other_rank in ((restore_s, False), (skip_s, True)):
            resumed = batches_from(files, args)
            resumed.load_state_dict({**state, "rank": 1} if other_rank else state)
            start = time.perf_counter()
            next(resumed)
            target.append(time.perf_counter() - start)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        resumed = batches_from(files, args)
        resumed.load_state_dict(state)
        with torch.profiler.profile() as prof:
            next(resumed)
        prof.export_chrome_trace(os.path.join(args.profile, "bench_dali_resume.json"))

    off, on = rates[False], rates[True]
    rows = [{"case": "weak-view pipeline img/s (baseline: checkpointing off)", "baseline": off, "ours": on,
             "ratio": on / off},
            {"case": f"first batch after resume at batch {args.skip}, s (baseline: skip-ahead)",
             "baseline": min(skip_s), "ours": min(restore_s), "ratio": min(skip_s) / min(restore_s)},
            {"case": "state_dict() (DALI checkpoint), ms", "baseline": None, "ours": 1e3 * min(save_s),
             "ratio": None}]
    print(f"\nDALI CPU pipeline, {len(files)} JPEGs, {args.size}x{args.size}, batch {args.batch}, "
          f"{args.threads} threads, best of {args.rounds}")
    common.print_table(rows)
    common.write_results(args, "dali_resume", {"machine_note": args.machine, "quick": args.quick,
                                               "files": len(files), "size": args.size, "batch": args.batch,
                                               "dali_threads": args.threads, "skip": args.skip,
                                               "rounds": args.rounds, "rows": rows}, tag="cpu")


if __name__ == "__main__":
    main()
