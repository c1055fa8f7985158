"""Corrupt images: skipped with a warning and counted in the run's stats, or (strict) a stop
that names the file. Raised and counted in the main process, never deep inside a worker.
The counts travel in a checkpoint through corrupt_state / restore_corrupt, so a resumed run
continues them instead of starting again at 0."""

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
                                "--data.strict it would be skipped and counted)")
    stats["corrupt_skips"] += 1
    if path not in stats["corrupt_files"]:
        stats["corrupt_files"].append(path)
        stats["corrupt_images"] = len(stats["corrupt_files"])
        warnings.warn(f"skipping corrupt image {path}: {reason}", stacklevel=3)


def corrupt_state(stats: dict) -> dict:
    """The corrupt-image record of ``stats`` as plain ints and strings (a checkpoint can hold it):
    {"corrupt_images": n, "corrupt_skips": n, "corrupt_files": [paths]}; zeros for a pipeline
    that reads no files."""
    files = [str(p) for p in stats.get("corrupt_files", [])]
    return {"corrupt_images": len(files), "corrupt_skips": int(stats.get("corrupt_skips", 0)),
            "corrupt_files": files}


def restore_corrupt(stats: dict, saved: dict) -> None:
    """Continues the record ``saved`` (corrupt_state of the run being resumed) in ``stats``:
    the files are the union (one already known is not warned about again) and the skips the
    larger count (a DALI pipeline counts its bad files again when it is built)."""
    files = list(saved.get("corrupt_files", []))
    files += [p for p in stats.get("corrupt_files", []) if p not in files]
    stats["corrupt_files"] = files
    stats["corrupt_images"] = len(files)
    stats["corrupt_skips"] = max(int(saved.get("corrupt_skips", 0)), int(stats.get("corrupt_skips", 0)))
