"""One random stream per DataLoader worker from the generator given to an augment module.

A forked (or spawned) DataLoader worker gets a copy of the module, generator state included,
so every worker would draw the same numbers: identical augmentations across workers. Inside a
worker the module therefore draws from its own generator, seeded from the given generator's
state mixed with the worker's seed (``torch.utils.data.get_worker_info().seed``: the
DataLoader's base seed, new each epoch and drawn from the DataLoader's own generator or torch's
global one, plus the worker id). Seed the DataLoader (``generator=`` or ``torch.manual_seed``)
and the module's generator to reproduce a run; in the main process the given generator is used
as is.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch


def worker_generator(generator: Optional[torch.Generator], cache: dict) -> Optional[torch.Generator]:
    """``generator`` outside DataLoader workers; inside one, that worker's own stream (kept in
    ``cache``, the module's, so it advances across the worker's batches)."""
    if generator is None:  # torch's global generator: DataLoader already seeds it per worker
        return None
    info = torch.utils.data.get_worker_info()
    if info is None:
        return generator
    if cache.get("worker_seed") != info.seed:
        digest = hashlib.blake2b(generator.get_state().numpy().tobytes() + info.seed.to_bytes(8, "little"),
                                 digest_size=8).digest()
        cache["worker_seed"] = info.seed
        cache["generator"] = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return cache["generator"]
