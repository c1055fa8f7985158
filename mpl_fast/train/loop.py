"""The run: set up, step until done (or a signal, or too many non-finite steps), evaluate
and checkpoint along the way, then finish (selection, finetuning, summary.json)."""

from __future__ import annotations

import json
import os
import signal
import time

import torch

from mpl_fast.parallel.distributed import shutdown
from mpl_fast.train import corrupt_counts
from mpl_fast.train.checkpointing import load_resume, save_checkpoint
from mpl_fast.train.config import TrainConfig
from mpl_fast.train.errors import RunStopped, UserInputError
from mpl_fast.train.evaluate import evaluate, finish, format_summary
from mpl_fast.train.run_folder import check_output_dir
from mpl_fast.train.session import Session, check_config, setup
from mpl_fast.train.topology import env_world_size, join_process_group


class TrainingStopped(RuntimeError):
    """Raised when too many consecutive steps were not finite."""


class DataParallelFailure(RuntimeError):
    """A collective failed: another rank died, or did not answer within the timeout."""


def run(cfg: TrainConfig, *, resume: str | None = None, progress: bool = True, quiet: bool = False,
        stop_after: int | None = None, dist_timeout: float = 600.0, overwrite: bool = False,
        resume_changes: dict | None = None, allow_world_size_change: bool = False) -> dict:
    """Trains per ``cfg`` and returns the summary (also written to summary.json).

    Under torchrun (WORLD_SIZE > 1 in the environment) every rank calls this, in the layout
    mpl_fast.train.topology resolves; rank 0 alone writes files and prints, and the other ranks
    return ``{"rank": r, "step": ..., "output_dir": ...}`` (the student's first rank of a split
    layout returns the summary of what it evaluated).
    Collectives time out after ``dist_timeout`` seconds. ``stop_after`` (tests) behaves like a
    SIGTERM after that many steps: checkpoint and return ``{"interrupted": True, ...}``.
    A fresh run refuses an ``output_dir`` holding another run unless ``overwrite``. On resume,
    ``resume_changes`` (dotted field -> value, see mpl_fast.train.resume_flags) are applied to
    the saved config; a checkpoint of another world size is refused unless
    ``allow_world_size_change``. Resuming a finished run returns ``{"finished": True, ...}``.
    """
    cfg, state = load_resume(cfg, resume, resume_changes)
    topology = check_config(cfg)
    if state is None and cfg.output_dir is not None and env_rank() == 0:
        check_output_dir(cfg.output_dir, overwrite=overwrite)
    if state is not None:
        done = finished_before(cfg, state)
        if done is not None:
            if env_rank() == 0:
                print(done.pop("message"), flush=True)
            return done
        check_world_size(state, resume, allow_world_size_change)
    ctx, owns_group = join_process_group(cfg, dist_timeout)
    sess = None
    try:
        sess = setup(cfg, state, ctx, topology, quiet, dist_timeout)
        del state
        with Signals() as signals:
            step, interrupted, seconds = train_loop(sess, progress, stop_after, signals)
            return end(sess, step, interrupted, seconds, signals)
    except RuntimeError as exc:
        if ctx.distributed and is_collective_failure(exc):
            raise DataParallelFailure(
                f"rank {ctx.rank} of {ctx.world_size}: a collective operation failed, so another rank has "
                f"probably died or stalled (see its own error above; timeout {dist_timeout:g} s). "
                f"Cause: {str(exc).strip().splitlines()[0][:300]}") from exc
        raise
    finally:
        if sess is not None and sess.metrics is not None:
            sess.metrics.close()
        if sess is not None and sess.tensorboard is not None:
            sess.tensorboard.close()
        del sess  # models and optimizers go before the process group (see shutdown())
        if owns_group:
            shutdown()


def env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0").strip() or 0)
    except ValueError:
        return 0


def saved_world_size(state: dict) -> int:
    """How many processes wrote the checkpoint (older checkpoints: one RNG state per rank)."""
    return int(state.get("world_size") or len(state.get("rng_per_rank") or []) or 1)


def check_world_size(state: dict, resume: str, allow: bool) -> None:
    """A resume under another number of processes changes the global batch and the data
    shards, so it is refused unless asked for."""
    saved, now = saved_world_size(state), env_world_size()
    if saved != now and not allow:
        launch = (f"torchrun --nproc-per-node {saved} -m mpl_fast.train" if saved > 1
                  else "python -m mpl_fast.train")
        raise UserInputError(
            f"--resume {resume}: the run was written by {saved} process(es) and this launch has {now}, which "
            f"would change the global batch and the data shards: resume with {launch} --resume {resume}, "
            f"or pass --allow-world-size-change to continue with {now}")


def finished_before(cfg: TrainConfig, state: dict) -> dict | None:
    """The result of resuming a run that had already finished (its checkpoint is at its last
    step and summary.json is written), else None."""
    step = int(state["step"])
    path = os.path.join(cfg.output_dir, "summary.json")
    if step < cfg.steps or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None  # a summary cut short: the end runs again and writes it
    return {**summary, "finished": True, "step": step, "output_dir": cfg.output_dir,
            "message": f"{cfg.output_dir} is finished ({step} of {cfg.steps} steps, summary.json written): "
                       f"nothing to do (pass a larger --steps with --resume to train further)"}


def resume_command(sess: Session) -> str:
    """The command that continues this run, the same launch (torchrun and its process count)."""
    if not sess.ctx.distributed:
        return f"python -m mpl_fast.train --resume {sess.out_dir}"
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip() or str(sess.ctx.world_size)
    nodes = max(sess.ctx.world_size // max(int(local) if local.isdigit() else 1, 1), 1)
    node_part = f"--nnodes {nodes} " if nodes > 1 else ""
    return f"torchrun {node_part}--nproc-per-node {local} -m mpl_fast.train --resume {sess.out_dir}"


def is_collective_failure(exc: BaseException) -> bool:
    """True for the errors torch.distributed raises when a peer is gone or a collective times out."""
    if isinstance(exc, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(exc).lower()  # gloo raises plain RuntimeErrors whose text names its source file
    return "gloo" in text or "nccl" in text


def train_loop(sess: Session, progress: bool, stop_after: int | None,
               signals: "Signals") -> tuple[int, int | None, float]:
    """Steps until cfg.steps, a signal or ``stop_after``; returns (step, signal or None, seconds)."""
    cfg, mpl, ctx = sess.cfg, sess.mpl, sess.ctx
    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm  # noqa: PLC0415
        bar = tqdm(total=cfg.steps, initial=sess.start_step, desc=f"{cfg.method} {cfg.preset}",
                   dynamic_ncols=True, disable=None)
    t0 = time.perf_counter()
    clock = {"t_log": t0, "step_log": sess.start_step, "t0": t0}
    labeled, unlabeled = sess.streams.labeled, sess.streams.unlabeled
    interrupted = None
    step = sess.start_step
    try:
        # the run's Signals (installed by run()) stay up through the end of the run
        while step < cfg.steps:
            mpl.step(next(labeled), next(unlabeled), clock=step - sess.clock_offset)
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                log_interval(sess, step, clock, bar)
            if bar is not None:
                bar.update(1)
            if step % cfg.eval_every == 0 and step < cfg.steps and sess.joins_evaluation:
                evaluate(sess, step, sess.elapsed_before + time.perf_counter() - t0)
            # One process acts on a signal after the step it came in; data-parallel ranks
            # must agree on the step, so they act on it one step later (StopAgreement).
            if ctx.distributed:
                stop_requested = sess.stop_agreement.poll(signals.received is not None)
            else:
                stop_requested = signals.received is not None
            if stop_requested or (stop_after is not None and step - sess.start_step >= stop_after):
                interrupted = signals.received or signal.SIGTERM
                break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save_checkpoint(sess, step, sess.elapsed_before + time.perf_counter() - t0)
        if sess.stop_agreement is not None:
            sess.stop_agreement.drain()  # the last flag every rank posted
    finally:
        if bar is not None:
            bar.close()
    return step, interrupted, sess.elapsed_before + time.perf_counter() - t0


def log_interval(sess: Session, step: int, clock: dict, bar) -> None:
    """Writes one metrics line (rank 0) and checks the skip counters: the one host read per
    interval. Under data parallel the totals are already global-batch averages, equal on every
    rank (the step averages its losses with the teacher's gradients), so no collective is needed."""
    cfg, mpl = sess.cfg, sess.mpl
    totals, n = mpl.take_totals()
    keys = list(totals)
    values = torch.stack([totals[k] for k in keys] + [mpl.skipped_total.float(),
                                                      mpl.max_consecutive_skips.float()]).tolist()
    now = time.perf_counter()
    line = {"step": step, **{k: v / max(n, 1) for k, v in zip(keys, values)},
            "skipped_total": int(values[-2]), "lr_teacher": mpl.schedules.teacher(step - 1 - sess.clock_offset),
            "lr_student": mpl.schedules.student(step - 1 - sess.clock_offset),
            "steps_per_s": (step - clock["step_log"]) / max(now - clock["t_log"], 1e-9),
            "seconds": sess.elapsed_before + now - clock["t0"]}
    line.update(corrupt_counts.counts(sess))  # collective under data parallel
    if sess.ctx.distributed:
        line["world_size"] = sess.ctx.world_size
    clock["t_log"], clock["step_log"] = now, step
    sess.clock_offset = int(values[-2])  # the schedule clock counts applied steps only
    sess.write_metrics(line)
    if bar is not None:
        bar.set_postfix(sps=f"{line['steps_per_s']:.1f}", lt=f"{line['loss_teacher']:.3f}",
                        ls=f"{line['loss_student']:.3f}", h=f"{line['h']:+.2e}", refresh=False)
    if values[-1] >= cfg.max_nonfinite:
        raise TrainingStopped(
            f"stopped at step {step}: {cfg.max_nonfinite} steps in a row had a non-finite loss or h"
            f"{' or overflowing fp16 gradients' if mpl.grad_scaler or mpl.student_grad_scaler else ''} "
            f"(all of them skipped; {int(values[-2])} skipped in total). Lower the learning rates "
            f"or check the data; {last_checkpoint_note(sess)}")


def last_checkpoint_note(sess: Session) -> str:
    if os.path.exists(os.path.join(sess.out_dir, "checkpoint.pt")):
        return (f"the last checkpoint holds the last finite state (resume with --resume {sess.out_dir} "
                f"and lower rates, e.g. --teacher.lr)")
    return "no checkpoint was written before this step, so the run cannot be resumed: start it again"


def end(sess: Session, step: int, interrupted: int | None, seconds: float, signals: "Signals | None" = None) -> dict:
    """Checkpoint; then, unless interrupted, rank 0 evaluates, finetunes and writes summary.json
    (the student's rank of a model-parallel run evaluates and finetunes what it holds). A signal
    during the final evaluation or the finetune stops the run there: the checkpoint of the last
    step is on disk and a resume repeats the end."""
    if interrupted is not None:
        save_checkpoint(sess, step, seconds)
        return stopped(sess, step, interrupted, "")
    final = evaluate(sess, step, seconds) if sess.joins_evaluation else None
    save_checkpoint(sess, step, seconds)
    corrupt = corrupt_counts.counts(sess)  # every rank (a collective under data parallel)
    received = (lambda: signals.received) if signals is not None else (lambda: None)
    if received() is not None and not sess.ctx.distributed:
        return stopped(sess, step, received(), " during the final evaluation")
    try:
        summary = finish(sess, step, seconds, final, stop=received) if sess.evaluates else None
    except RunStopped:
        return stopped(sess, step, received(), " during the final finetune")
    if not sess.ctx.is_main:  # the student's rank of a model-parallel run has the summary too
        return summary if summary is not None else {"rank": sess.ctx.rank, "step": step, "output_dir": sess.out_dir}
    summary.update(corrupt)
    with open(os.path.join(sess.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    sess.say(format_summary(summary))
    return summary


def stopped(sess: Session, step: int, signum: int | None, where: str) -> dict:
    sess.say(f"stopped by signal {signum}{where} at step {step}; checkpoint saved. "
             f"Continue with: {resume_command(sess)}")
    return {"interrupted": True, "step": step, "output_dir": sess.out_dir}


class Signals:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
