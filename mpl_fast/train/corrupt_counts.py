"""The corrupt-image counts a run reports (per log interval in metrics.jsonl, in summary.json)
and carries through its checkpoints. Under data parallel every rank reads its own shard, so
the counts are summed over the ranks; where ranks read the same batches (a rank pair, the two
halves of rank groups) rank 0's own counts are reported."""

from __future__ import annotations

import torch
import torch.distributed as dist

ZERO = {"corrupt_images": 0, "corrupt_skips": 0}


def counts(sess) -> dict[str, int]:
    """{"corrupt_images", "corrupt_skips"} of the run; a collective under pure data parallel
    (every rank must call it at the same point)."""
    streams = sess.streams
    mine = streams.corrupt_counts() if hasattr(streams, "corrupt_counts") else dict(ZERO)
    if sess.ctx.distributed and sess.shards_data and not sess.topology.split:
        both = torch.tensor([mine["corrupt_images"], mine["corrupt_skips"]], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            both = both.to(sess.ctx.device)
        dist.all_reduce(both)
        mine = {"corrupt_images": int(both[0]), "corrupt_skips": int(both[1])}
    return mine


def state(sess) -> dict | None:
    """This rank's corrupt-image record, for a checkpoint."""
    return sess.streams.corrupt_state() if hasattr(sess.streams, "corrupt_state") else None


def restore(sess, saved: dict) -> None:
    """Continues the record of the checkpoint: this rank's own when the checkpoint holds one
    per rank for this many ranks, else (another world size, or one process) rank 0's on rank 0."""
    if not hasattr(sess.streams, "load_corrupt_state"):
        return
    per_rank = saved.get("corrupt_per_rank") or []
    if sess.ctx.distributed and len(per_rank) == sess.ctx.world_size and per_rank[sess.ctx.rank]:
        sess.streams.load_corrupt_state(per_rank[sess.ctx.rank])
    elif sess.ctx.is_main and saved.get("corrupt"):
        sess.streams.load_corrupt_state(saved["corrupt"])
