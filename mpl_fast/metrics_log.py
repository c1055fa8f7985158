"""metrics.jsonl: one strict-JSON object per line, written so that a crash or a full disk costs
at most the line being written, and read back so that such a line is dropped with a warning.

Strict JSON has no NaN or Infinity: a non-finite number (a diverged loss) is written as
``null``, so any JSON parser reads the file. Lines written by older versions with ``NaN`` /
``Infinity`` tokens are read as ``None`` too.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings

from mpl_fast.checkpoint import write_text_atomic


class MetricsFileError(ValueError):
    """A metrics file with a bad line before its last one; the message names file and line."""


class MetricsWarning(UserWarning):
    """An incomplete last line was dropped."""


def _strict(value):
    """``value`` with every non-finite float replaced by None (nested dicts, lists, tuples)."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, numbers.Integral):  # numpy integers
        return int(value)
    if isinstance(value, numbers.Real):  # float, numpy floats
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value  # json.dumps names anything else it cannot write


def to_json_line(record: dict) -> str:
    """``record`` as one strict-JSON line ending in a newline (non-finite numbers as null)."""
    return json.dumps(_strict(record), allow_nan=False) + "\n"


def _parse(raw: bytes) -> dict | str:
    """The JSON object on one line, or why it is not one."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=lambda _token: None)
    except (UnicodeDecodeError, ValueError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return value if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"


def _read(path: str) -> tuple[list[dict], str | None]:
    """(records, a warning about a dropped last line or None); MetricsFileError for a bad
    line with good lines after it."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records, bad = [], None
    for number, raw in enumerate(lines, start=1):
        if not raw.strip(b" \t\r\x00"):  # blank lines and the zero-filled tail of a crash
            continue
        if bad is not None:
            raise MetricsFileError(f"{path} line {bad[0]} is not a JSON object ({bad[1]}); fix or delete "
                                   "that line, then try again")
        parsed = _parse(raw)
        if isinstance(parsed, dict):
            records.append(parsed)
        else:
            bad = (number, parsed)
    if bad is None:
        return records, None
    return records, (f"{path} line {bad[0]} is incomplete ({bad[1]}): dropped it (a crash or a full "
                     "disk while it was written)")


def read_metrics(path: str) -> list[dict]:
    """The records of ``path`` in order. An incomplete or unreadable last line (a crash or a
    full disk while it was written) is dropped with a MetricsWarning naming the file; a bad
    line before the last raises MetricsFileError naming the file and the line."""
    records, dropped = _read(path)
    if dropped:
        warnings.warn(dropped, MetricsWarning, stacklevel=2)
    return records


def keep_through_step(path: str, step: int) -> list[dict]:
    """Rewrites ``path`` (atomically) with only its records whose ``step`` is at most ``step``
    (records without one are kept), dropping an incomplete last line as read_metrics does, and
    returns them: what a run resumed from a checkpoint of ``step`` continues from. A missing
    file is left missing."""
    if not os.path.exists(path):
        return []
    records, dropped = _read(path)
    if dropped:
        warnings.warn(dropped, MetricsWarning, stacklevel=2)
    kept = [r for r in records if not isinstance(r.get("step"), (int, float)) or r["step"] <= step]
    write_text_atomic(path, "".join(to_json_line(r) for r in kept), prefix=".metrics-")
    return kept


class MetricsLog:
    """Appends records to ``path`` as strict-JSON lines, each written whole and flushed.

    Opening a file whose last line has no newline (the line a crash cut short) first repairs
    it: a complete object gets its newline, anything else is cut off with a MetricsWarning, so
    new lines never run into a broken one. ``append=False`` starts the file empty."""

    def __init__(self, path: str, *, append: bool = True):
        self.path = path
        if append and os.path.exists(path):
            self._repair_tail()
        self._file = open(path, "a" if append else "w", encoding="utf-8")

    def _repair_tail(self) -> None:
        with open(self.path, "rb+") as f:
            data = f.read()
            if not data or data.endswith(b"\n"):
                return
            start = data.rfind(b"\n") + 1
            tail = data[start:]
            if not tail.strip(b" \t\r\x00") or isinstance(_parse(tail), str):
                if tail.strip(b" \t\r\x00"):
                    line = data.count(b"\n") + 1
                    warnings.warn(f"{self.path} line {line} is incomplete: dropped it (a crash or a full "
                                  "disk while it was written)", MetricsWarning, stacklevel=3)
                f.truncate(start)
            else:
                f.write(b"\n")

    def write(self, record: dict) -> None:
        self._file.write(to_json_line(record))
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
