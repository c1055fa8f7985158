"""The trainer's side of checkpoints: what a run saves (networks, optimizers, data-stream
positions, every rank's RNG, the best weights), gathering it from the ranks onto rank 0, and
putting it back on resume. The file itself is written atomically by mpl_fast.checkpoint."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from mpl_fast import checkpoint as ckpt
from mpl_fast.metrics_log import MetricsLog, keep_through_step
from mpl_fast.parallel import sharding
from mpl_fast.train import corrupt_counts
from mpl_fast.train.config import TrainConfig, from_dict, to_dict
from mpl_fast.train.errors import UserInputError
from mpl_fast.train.resume_flags import apply_resume_flags
from mpl_fast.train.topology import rank_seed


def load_resume(cfg: TrainConfig, resume: str | None,
                given: dict | None = None) -> tuple[TrainConfig, dict | None]:
    """(config, checkpoint) of the run to continue, or (cfg, None) for a fresh run (its
    data_dir and split_file made absolute, so config.json names them from anywhere).
    ``given``: the flags of the command line (mpl_fast.train.resume_flags), applied to the
    saved config and printed; None (the Python API) continues the saved config as it is."""
    if resume is None:
        for name in ("data_dir", "split_file"):
            if getattr(cfg.data, name):
                setattr(cfg.data, name, os.path.abspath(getattr(cfg.data, name)))
        return cfg, None
    path = os.path.join(resume, "checkpoint.pt") if os.path.isdir(resume) else resume
    if not os.path.isfile(path):
        raise UserInputError(f"--resume {resume}: no checkpoint.pt there (a run folder or its checkpoint.pt)")
    state = ckpt.load(path)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or "step" not in state:
        raise UserInputError(f"--resume {path} is not a checkpoint of this trainer (no config or step in it)")
    try:
        cfg = from_dict(state["config"])
    except TypeError as exc:
        raise UserInputError(f"--resume {path}: its config does not fit this version of the trainer ({exc})") from None
    cfg.output_dir = os.path.dirname(os.path.abspath(path))
    if given is not None:
        changes = apply_resume_flags(cfg, given, resume)
        if changes and int(os.environ.get("RANK", "0") or 0) == 0:
            print("resume changes: " + "; ".join(changes), flush=True)
    return cfg, state


def restore(sess, state: dict) -> None:
    """Loads a checkpoint into the session (every rank reads the same file)."""
    mpl, streams, ctx = sess.mpl, sess.streams, sess.ctx
    mpl.load_state_dict(state["mpl"])
    if state["streams"] is not None:
        saved = own_stream_state(sess, state)
        for name in ("labeled", "unlabeled"):
            getattr(streams, name).load_state_dict(saved[name])
    else:
        sess.say("warning: this checkpoint holds no data-stream position (written before the DALI streams "
                 "could save theirs): the resumed run starts its data streams from the first batch again")
    rng = state["rng"]
    if ctx.distributed:
        per_rank = state.get("rng_per_rank") or []
        rng = per_rank[ctx.rank] if len(per_rank) == ctx.world_size else None
        if rng is None:  # saved by another number of ranks: fresh per-rank streams
            torch.manual_seed(rank_seed(sess.cfg.seed, ctx.rank) + int(state["step"]))
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and rng.get("cuda"):
            torch.cuda.set_rng_state_all(rng["cuda"])
    corrupt_counts.restore(sess, state)
    sess.start_step, sess.clock_offset = int(state["step"]), int(state["clock_offset"])
    sess.best = state["best"]
    sess.elapsed_before = float(state["elapsed"])


def own_stream_state(sess, state: dict) -> dict:
    """This rank's saved stream states: its own under data parallel when the checkpoint holds
    one per rank for this many ranks; else rank 0's (a DALI stream of another shard then skips
    ahead, exact but decoding the consumed batches again). ``sess`` needs ``shards_data``,
    ``ctx.rank``, ``ctx.world_size`` and ``say``."""
    per_rank = state.get("streams_per_rank") or []
    if not sess.shards_data or not per_rank:
        return state["streams"]
    if len(per_rank) == sess.ctx.world_size:
        return per_rank[sess.ctx.rank]
    sess.say(f"note: the checkpoint was written by {len(per_rank)} ranks and this run has {sess.ctx.world_size}: "
             f"the data streams start from rank 0's saved position (a DALI stream of another shard skips "
             f"ahead, decoding the batches consumed so far again)")
    return state["streams"]


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save_checkpoint(sess, step: int, elapsed: float) -> None:
    """Rank 0 writes checkpoint.pt atomically; under torchrun every rank calls this (rank 0
    gathers each rank's RNG state and, for data parallel, each rank's stream states) and waits
    at a barrier until the file is written."""
    rng, streams = rng_state(), stream_states(sess)
    per_rank = gather_per_rank(sess, rng, streams)
    # --fsdp: every rank all-gathers its shards (collective), so the file holds whole tensors
    mpl_state = sharding.full_state_dict(sess.mpl.state_dict()) if sess.cfg.fsdp else None
    # With teacher and student on different ranks, every rank offers its state and rank 0 merges
    # the student's half in (the sync is the identity otherwise).
    mine = (checkpoint_state(sess, step, elapsed, rng, streams, mpl_state)
            if sess.ctx.is_main or sess.topology.split else None)
    state = sess.sync.gather_checkpoint(mine, student_extra={"best": sess.best, "rng": rng})
    if state is not None:
        if per_rank is not None:
            state["rng_per_rank"] = [mine["rng"] for mine in per_rank]
            if sess.shards_data and streams is not None:
                state["streams_per_rank"] = [mine["streams"] for mine in per_rank]
            state["corrupt_per_rank"] = [mine.get("corrupt") for mine in per_rank]
        sd = state["mpl"]
        if ckpt.all_finite([sd["student"], sd["teacher"] or {}, sd["ema"] or {}]):
            ckpt.save_atomic(state, os.path.join(sess.out_dir, "checkpoint.pt"))
        else:
            sess.say(f"warning: not checkpointing step {step}: the weights are not finite")
    if sess.ctx.distributed:
        dist.barrier()


def stream_states(sess) -> dict | None:
    """This rank's positions in its training streams (None for a pipeline that cannot save one)."""
    if not sess.resumable:
        return None
    return {n: getattr(sess.streams, n).state_dict() for n in ("labeled", "unlabeled")}


def gather_per_rank(sess, rng: dict, streams: dict | None) -> list | None:
    """Under torchrun, on rank 0: every rank's {"rng", "streams"} in one gather (stream states
    only where each rank reads its own shard: data parallel, rank groups of k > 1 ranks; the two
    ranks of a rank pair read the same streams, so rank 0's state is right for both).
    None in one process and on other ranks."""
    if not sess.ctx.distributed:
        return None
    mine = {"rng": rng, "streams": streams if sess.shards_data else None, "corrupt": corrupt_counts.state(sess)}
    gathered = [None] * sess.ctx.world_size if sess.ctx.is_main else None
    dist.gather_object(mine, gathered, dst=0)
    return gathered


def checkpoint_state(sess, step: int, elapsed: float, rng: dict, streams: dict | None,
                     mpl_state: dict | None = None) -> dict:
    return {
        "config": to_dict(sess.cfg), "step": step, "clock_offset": sess.clock_offset,
        "mpl": sess.mpl.state_dict() if mpl_state is None else mpl_state,
        "streams": streams, "rng": rng, "best": sess.best, "elapsed": elapsed,
        "world_size": sess.ctx.world_size, "corrupt": corrupt_counts.state(sess),
    }


FINETUNED_FILE = "finetuned.pt"


def save_finetuned(out_dir: str, module: torch.nn.Module, base_model: str) -> str:
    """Writes the finetuned student to ``out_dir``/finetuned.pt (atomically, tensors and strings
    only, so it loads with torch.load(weights_only=True)): ``{"state_dict", "base"}``, where
    ``base`` names the network whose selected weights were finetuned. Returns the path."""
    path = os.path.join(out_dir, FINETUNED_FILE)
    state_dict = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    ckpt.save_atomic({"state_dict": state_dict, "base": base_model}, path)
    return path


def resume_metrics(path: str, step: int, *, finished_part: bool = False) -> None:
    """Drops the metric lines written after the checkpoint of ``step`` a run resumes from (and
    an incomplete last line). ``finished_part``: the checkpoint is the end of training, so the
    end's lines (final evaluation, final) are dropped too: the resumed end writes them again."""
    kept = keep_through_step(path, step)
    if finished_part and any(r.get("step") == step and (r.get("eval") or r.get("final")) for r in kept):
        with MetricsLog(path, append=False) as log:
            for r in kept:
                if not (r.get("step") == step and (r.get("eval") or r.get("final"))):
                    log.write(r)
