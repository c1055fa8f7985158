"""The trainer's exit codes and the one place that turns a user-caused failure into one
``error:`` sentence on stderr instead of a traceback."""

from __future__ import annotations

import errno
import os
import sys

EXIT_FINISHED = 0    # the run finished (or was already finished)
EXIT_BAD_INPUT = 2   # a flag, file or folder the user gave cannot be used (argparse uses 2 too)
EXIT_NONFINITE = 3   # too many non-finite steps in a row
EXIT_RANK_FAILED = 4  # under torchrun: another rank died or stalled
EXIT_STOPPED = 5     # stopped by SIGINT/SIGTERM with a checkpoint saved: resume it

EXIT_CODES_HELP = (
    "exit status: 0 finished (or already finished); 2 bad input (a flag, file or folder; one "
    "'error:' sentence); 3 stopped after too many non-finite steps; 4 another torchrun rank "
    "failed; 5 stopped by SIGINT/SIGTERM with a checkpoint saved (continue with --resume). "
    "Set MPL_FAST_TRACEBACK=1 to see the traceback behind an 'error:' line.")


class UserInputError(ValueError):
    """A failure the user can fix; its message is one sentence naming the flag or file."""


class RunStopped(Exception):
    """A signal stopped the run where it could not continue (e.g. during the final finetune)."""


def one_sentence(exc: BaseException) -> str:
    """The message of ``exc`` as one line: its first line, without an ``error:`` prefix, with
    the file an OSError names."""
    if isinstance(exc, OSError) and not isinstance(exc, UserInputError):
        reason = exc.strerror or str(exc)
        where = f"{exc.filename}: " if exc.filename else ""
        hint = {errno.ENOSPC: " (free some space, then continue with --resume)",
                errno.EFBIG: " (a file-size limit was reached)",
                errno.EACCES: " (choose a folder you can write with --output-dir)",
                errno.EROFS: " (choose a writable folder with --output-dir)"}.get(exc.errno, "")
        return f"{where}{reason}{hint}"
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else text
    return first[len("error:"):].strip() if first.lower().startswith("error:") else first


def report(exc: BaseException, code: int) -> int:
    """Prints ``error: <sentence>`` on stderr (the traceback too under MPL_FAST_TRACEBACK=1)
    and returns ``code``."""
    if os.environ.get("MPL_FAST_TRACEBACK"):
        import traceback  # noqa: PLC0415

        traceback.print_exception(exc)
    print(f"error: {one_sentence(exc)}", file=sys.stderr, flush=True)
    return code
