"""The run folder: checked before anything is built (a file, an unwritable place, or another
run's folder without --resume/--overwrite is refused), created only once the inputs proved
usable, and cleared of a killed checkpoint write's temp files."""

from __future__ import annotations

import os
import shutil

from mpl_fast.checkpoint import remove_stale_temp_files
from mpl_fast.train.errors import UserInputError

# What makes a folder a run's: running into it without --resume would replace these.
RUN_MARKERS = ("metrics.jsonl", "checkpoint.pt")
# What --overwrite removes before a fresh run writes its own (a stale checkpoint.prev.pt would
# otherwise be the fallback of the new run's first damaged checkpoint).
RUN_FILES = RUN_MARKERS + ("checkpoint.prev.pt", "summary.json", "config.json", "split.json", "finetuned.pt",
                           "metrics.png")
RUN_FOLDERS = ("tensorboard",)  # the old run's event files would mix with the new run's


def check_output_dir(path: str, *, overwrite: bool = False) -> None:
    """Refuses, with one sentence naming --output-dir, a path that is a file, a folder that
    cannot be created or written, and a folder holding another run (unless ``overwrite``)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserInputError(f"--output-dir {path} is a file, not a folder: name a folder for the run")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserInputError(f"--output-dir {path}: {existing} is a file, so the folder cannot be created: "
                             f"name another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"--output-dir {path}: {existing} is not writable: choose a folder you can write")
    held = [name for name in RUN_MARKERS if os.path.exists(os.path.join(path, name))]
    if held and not overwrite:
        raise UserInputError(f"--output-dir {path} already holds a run ({', '.join(held)}): continue it with "
                             f"--resume {path}, or pass --overwrite to replace it with a new run")


def create(path: str, *, fresh: bool) -> list[str]:
    """Makes the folder (a fresh run: removing an overwritten run's files) and removes the temp
    files of killed checkpoint writes; returns the paths removed."""
    os.makedirs(path, exist_ok=True)
    removed = []
    if fresh:
        for name in RUN_FILES:
            target = os.path.join(path, name)
            if os.path.isfile(target):
                os.unlink(target)
                removed.append(target)
        for name in RUN_FOLDERS:
            target = os.path.join(path, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
                removed.append(target)
    return removed + remove_stale_temp_files(path)
