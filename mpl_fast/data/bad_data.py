"""Corrupt images: skipped with a warning and counted in the run's stats, or (strict) a stop
that names the file. Raised and counted in the main process, never deep inside a worker."""

from __future__ import annotations

import warnings


class CorruptImageError(RuntimeError):
    """A corrupt or unreadable image under strict mode."""


def new_stats(loader: str) -> dict:
    """The stats a pipeline keeps up to date while it runs (DataStreams.stats):
    corrupt_images distinct corrupt files met so far, corrupt_skips how often one was skipped
    (a training stream meets the same file again each epoch), corrupt_files their paths."""
    return {"loader": loader, "corrupt_images": 0, "corrupt_skips": 0, "corrupt_files": []}


def record_corrupt(stats: dict, path: str, reason: str, *, strict: bool) -> None:
    """Count one corrupt image in ``stats`` and warn the first time, or raise under ``strict``."""
    if strict:
        raise CorruptImageError(f"corrupt image {path}: {reason} (strict mode stops here; without "
                                "--strict it would be skipped and counted)")
    stats["corrupt_skips"] += 1
    if path not in stats["corrupt_files"]:
        stats["corrupt_files"].append(path)
        stats["corrupt_images"] = len(stats["corrupt_files"])
        warnings.warn(f"skipping corrupt image {path}: {reason}", stacklevel=3)
