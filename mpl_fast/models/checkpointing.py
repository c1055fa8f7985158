"""Activation checkpointing (``--activation-checkpointing``): keep only each block's input during
the forward and recompute the block's activations when its backward needs them; about one extra
forward per step buys the memory of every block's inner activations.

Which API, and why: ``torch.distributed._composable.checkpoint`` (non-reentrant; the same
machinery as ``torch.utils.checkpoint(use_reentrant=False)``), applied to each block in place:
- it works through forward hooks, so the module tree and every parameter name stay as they are:
  state_dicts and checkpoints of runs with and without the flag load into each other, the EMA's
  copy matches, and FSDP2's ``fully_shard(block)`` (applied AFTER this, per block and at the root)
  finds the same blocks and composes with it: that is the pattern PyTorch tests for FSDP2;
- non-reentrant checkpointing saves nothing through the reentrant autograd.Function, so
  ``torch.autograd.grad`` (the feedback's g_l') differentiates through it, and it recomputes
  under the autocast state and the RNG state (dropout/drop-path masks) of the original forward.
A wrapper module (``checkpoint_wrapper``) would rename every parameter; a reentrant checkpoint
would not support ``autograd.grad``.

The BatchNorm trap: the recompute runs a train-mode BatchNorm's forward a second time, which
would move running_mean/var (and num_batches_tracked) twice per step. During a recompute, every
BatchNorm inside a checkpointed block snapshots its buffers before its forward and gets them
back when the recompute ends (``_BN_RESTORE``): a checkpointed step equals a plain step. This is
done by hooks that receive the module (not by closures over it), so ``copy.deepcopy`` of a
checkpointed model (the student's EMA, the finetuned copy) stays correct.

torch.compile: refused together with checkpointing (mpl_fast.train.config.validate). Dynamo accepts a
checkpoint's context only as a TorchDispatchMode pair, which the BatchNorm guard is not, and a
compiled WRN with these hooks failed here (torch 2.14.1, CPU) in its first backward with
"CheckpointError: Recomputed values ... have different metadata than during the forward pass".
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# Blocks by (module, class name): matched by name so that timm and torchvision are never imported here.
KNOWN_BLOCKS = {
    ("mpl_fast.models.wrn", "_Block"),
    ("torchvision.models.resnet", "BasicBlock"),
    ("torchvision.models.resnet", "Bottleneck"),
    ("timm.models.resnet", "BasicBlock"),
    ("timm.models.resnet", "Bottleneck"),
    ("timm.models._efficientnet_blocks", "ConvBnAct"),
    ("timm.models._efficientnet_blocks", "DepthwiseSeparableConv"),
    ("timm.models._efficientnet_blocks", "InvertedResidual"),
    ("timm.models._efficientnet_blocks", "EdgeResidual"),
    ("timm.models._efficientnet_blocks", "CondConvResidual"),
    ("timm.models._efficientnet_blocks", "UniversalInvertedResidual"),
    ("timm.models._efficientnet_blocks", "MobileAttention"),
}
# A model may name its own units: a method returning the modules to checkpoint.
UNITS_METHOD = "activation_checkpoint_units"


def find_checkpoint_units(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that checkpointing wraps: ``model.activation_checkpoint_units()``
    if the model defines it, else every outermost known residual block (KNOWN_BLOCKS). Raises a
    ValueError naming the model when there are none."""
    if hasattr(model, UNITS_METHOD):
        units = list(getattr(model, UNITS_METHOD)())
    else:
        units = []
        _collect_blocks(model, units)
    if not units:
        raise ValueError(f"activation checkpointing: no blocks to checkpoint in {type(model).__name__} "
                         f"({type(model).__module__}); known blocks are WRN blocks, torchvision/timm ResNet "
                         f"blocks and timm EfficientNet blocks, or the model can name its units with a method "
                         f"{UNITS_METHOD}()")
    return units


def _collect_blocks(module: nn.Module, out: list[nn.Module]) -> None:
    for child in module.children():
        if (type(child).__module__, type(child).__name__) in KNOWN_BLOCKS:
            out.append(child)  # outermost only: a block inside a block is recomputed with it
        else:
            _collect_blocks(child, out)


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoints every block of ``model`` in place (see the module docstring); returns how many.

    Call it after the model's layout is final (device, channels_last) and before any
    ``fully_shard``; a model checkpointed once is refused a second time."""
    from torch.distributed._composable import checkpoint  # noqa: PLC0415 - torch.distributed is slow to import

    units = find_checkpoint_units(model)
    for unit in units:
        if is_checkpointed(unit):
            raise ValueError(f"activation checkpointing: {type(unit).__name__} in {type(model).__name__} "
                             f"is checkpointed already")
    for unit in units:
        for m in unit.modules():
            if isinstance(m, _BatchNorm):
                m.register_forward_pre_hook(_snapshot_bn_during_recompute)
        checkpoint(unit, use_reentrant=False, preserve_rng_state=True, context_fn=_contexts)
        unit._mpl_fast_checkpointed = True
    return len(units)


def is_checkpointed(module: nn.Module) -> bool:
    """True if ``enable_activation_checkpointing`` wrapped ``module`` (a block)."""
    return getattr(module, "_mpl_fast_checkpointed", False)


def checkpointed_units(model: nn.Module) -> list[nn.Module]:
    """The checkpointed blocks of ``model`` (empty when checkpointing is off)."""
    return [m for m in model.modules() if is_checkpointed(m)]


# -------------------------------------------------------------------- the BatchNorm guard

# Per thread, because on a GPU the autograd engine recomputes on its device threads; each
# recompute is one (snapshot list) frame; None when no recompute runs in this thread.
_RECOMPUTE = threading.local()


def _contexts():
    """(forward context, recompute context) for torch's checkpoint."""
    return nullcontext(), _restore_batchnorm_buffers()


@contextmanager
def _restore_batchnorm_buffers() -> Iterator[None]:
    """While a block recomputes, each BatchNorm that runs snapshots its buffers (forward pre-hook);
    on exit, even when the recompute stops early, every buffer gets its snapshot back."""
    outer = getattr(_RECOMPUTE, "saved", None)
    _RECOMPUTE.saved = saved = []
    try:
        yield
    finally:
        _RECOMPUTE.saved = outer
        with torch.no_grad():
            for buffer, snapshot in reversed(saved):  # reversed: a BN run twice ends at its first snapshot
                buffer.copy_(snapshot)


def _snapshot_bn_during_recompute(module: _BatchNorm, _inputs) -> None:
    saved = getattr(_RECOMPUTE, "saved", None)
    if saved is None:  # the original forward: BN updates its statistics as usual
        return
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        buffer = getattr(module, name, None)
        if buffer is not None:
            saved.append((buffer, buffer.detach().clone()))


# -------------------------------------------------------------------- measuring it

def saved_activation_bytes(run, exclude: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes autograd keeps for the backward while ``run()`` executes (its forward): the distinct
    storages of every tensor saved through saved_tensors_hooks, less those of ``exclude``
    (pass the parameters and buffers: they live anyway). With checkpointing, a block saves only
    its inputs here (its inner tensors go to the checkpoint's own hooks and are dropped)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(storages.values())
