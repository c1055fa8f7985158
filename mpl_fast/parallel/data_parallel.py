"""Data parallel MPL without DDP: gradients averaged explicitly where the step needs them.

DDP's reducer hooks ``loss.backward()`` and expects one forward per backward; the MPL step runs
the student forward several times per step (one of them under no_grad for finite-diff), takes
g_l' with a second backward after setting g_u aside, and needs each gradient averaged at a
precise point. So the step averages, itself, every gradient of a global-batch mean loss:

  (1) the student's g_u after its backward, before the clip and the student's step;
  (2) g_l', before the dot product: every rank computes the same h;
  (3) the teacher's gradients after its backward, before the clip and the teacher's step,
      in the same all_reduce as this rank's losses, so that every rank logs the global batch's
      losses and takes the same decision to skip a non-finite step.

For ``--feedback finite-diff`` the two labeled losses are averaged instead of g_l'.
Each rank's mean over its B rows, averaged over N ranks, is the mean over the N*B rows of the
global batch: with equal shards, the step is the single-process step on the global batch up to
round-off. BatchNorm is the exception: each rank normalises with its own batch's statistics and
keeps its own running statistics (as DDP without SyncBatchNorm; rank 0's are the ones evaluated
and checkpointed).

Under ``--fsdp`` (mpl_fast.parallel.sharding) FSDP2 does (1)-(3)'s gradient averaging itself
in backward() (reduce-scatter), and each rank holds only its shards: ``ShardedSync`` averages
the losses alone and sums the feedback's partial dot products over the ranks instead.

No host sync: all_reduce on device tensors is enqueued on the stream (NCCL) or runs in the
calling CPU thread (gloo).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from mpl_fast.algo.interfaces import NoGradientSync


class GradientAverager(NoGradientSync):
    """mpl_fast.algo.interfaces.GradientSync over torchrun ranks. Averages tensors in place over the
    ranks of ``group``: one all_reduce per call.

    The tensors of each dtype are copied into one flat buffer (kept between calls for the same
    list of shapes: the student's g_u and g_l' share one, the teacher's gradients another; this
    is the only extra memory, one copy of the gradients as in DDP's buckets), summed across
    ranks, divided by the world size and copied back.
    """

    active = True

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self._buffers: dict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def _flat(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The flat buffer for this list's layout and its views shaped like ``tensors``."""
        key = tuple((t.dtype, t.device, tuple(t.shape)) for t in tensors)
        if key not in self._buffers:
            flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
            views = [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
            self._buffers[key] = (flat, views)
        return self._buffers[key]

    @torch.no_grad()
    def average_(self, tensors: Iterable[torch.Tensor | None]) -> None:
        """Replaces each tensor by its mean over the ranks (None entries, unused parameters, are skipped)."""
        by_dtype: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            if t is not None:
                by_dtype.setdefault((t.dtype, t.device), []).append(t)
        for group in by_dtype.values():
            flat, views = self._flat(group)
            torch._foreach_copy_(views, group)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            flat.div_(self.world_size)
            torch._foreach_copy_(group, views)

    def average_grads_and_values(self, module: nn.Module, values: Sequence[torch.Tensor]) -> tuple:
        """Averages ``module``'s gradients in place and returns ``values`` (0-dim tensors, e.g.
        this rank's losses) averaged as fp32, detached: both in one all_reduce."""
        stacked = torch.stack([v.detach().float() for v in values])  # a fresh tensor: no aliasing
        self.average_([p.grad for p in module.parameters()] + [stacked])
        return tuple(stacked.unbind())


class ShardedSync(GradientAverager):
    """``--fsdp``: FSDP2 has already reduce-scattered and averaged every gradient in backward(),
    so gradients are left alone; the logged losses are still averaged (one all_reduce, so that
    every rank takes the same skip decision), and a dot product over this rank's shards of the
    student's tensors (the feedback h) is summed over the ranks."""

    def average_grads_(self, grads: Iterable[torch.Tensor | None]) -> None:
        """Nothing: FSDP averaged them in backward()."""

    def average_grads_and_values(self, module: nn.Module, values: Sequence[torch.Tensor]) -> tuple:
        """``values`` (0-dim tensors) averaged over the ranks as fp32, detached; ``module``'s
        gradients untouched (FSDP averaged them)."""
        stacked = torch.stack([v.detach().float() for v in values])
        self.average_([stacked])
        return tuple(stacked.unbind())

    @torch.no_grad()
    def sum_partial_(self, t: torch.Tensor) -> torch.Tensor:
        """Sums ``t`` over the ranks in place and returns it."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t


@torch.no_grad()
def broadcast_from_rank0(modules: Iterable[nn.Module], group: dist.ProcessGroup | None = None) -> None:
    """Copies rank 0's parameters and buffers into every rank's modules, so replicas start equal."""
    src = dist.get_global_rank(group, 0) if group is not None else 0
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src, group=group)



class StopAgreement:
    """Lets the ranks agree to stop after the same step (a signal reaches them at different
    moments) without a device sync: every step, each rank posts its flag in an asynchronous
    all_reduce on a CPU (gloo) group and reads the result posted one step earlier. Every rank
    reads the same result at the same step, so all stop together, one step after the first
    signal."""

    def __init__(self, timeout_s: float = 600.0):
        import datetime  # noqa: PLC0415

        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self._pending: tuple | None = None

    def poll(self, signalled: bool) -> bool:
        """Posts this rank's flag; True when some rank had posted a flag at the previous call."""
        agreed = self.drain()
        flag = torch.tensor([1.0 if signalled else 0.0])
        self._pending = (dist.all_reduce(flag, group=self.group, async_op=True), flag)
        return agreed

    def drain(self) -> bool:
        """Waits for the flag posted last (every rank posted it) and returns it."""
        if self._pending is None:
            return False
        work, flag = self._pending
        self._pending = None
        work.wait()
        return flag.item() > 0
