"""Atomic checkpoints: written to a temporary file in the same folder, fsynced, then renamed
over the old one, so a crash at any moment leaves either the old or the new checkpoint."""

from __future__ import annotations

import os
import tempfile

import torch


def save_atomic(state: dict, path: str) -> None:
    """torch.save ``state`` to ``path`` atomically (temp file, fsync, rename, fsync of the folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def map_tensors(obj, fn):
    """``obj`` (tensors in nested dicts, lists and tuples) with every tensor replaced by
    ``fn(tensor)``, walked in order; any other value as it is."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def load(path: str, map_location="cpu") -> dict:
    """Loads a checkpoint written by save_atomic (tensors, numbers, strings and containers only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def all_finite(state_dicts: list[dict]) -> bool:
    """True when every floating tensor in the (nested) state dicts is finite (one host sync)."""
    flags = []

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point():
                flags.append(torch.isfinite(obj).all())
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    for sd in state_dicts:
        walk(sd)
    return bool(torch.stack(flags).all()) if flags else True
