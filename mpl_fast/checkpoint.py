"""Checkpoints that survive crashes, full disks and bit rot.

Writing (save_atomic), in this order:
  1. temp files left in the folder by writes that were killed are removed (remove_stale_temp_files);
  2. the state goes to a temp file ``.ckpt-*.tmp`` in the same folder (held under an flock while
     it is written, so a cleanup never takes a live writer's file), flushed and fsynced;
  3. the current checkpoint, if its CRCs verify, becomes ``<name>.prev.pt`` (a hard link: no
     copy); a damaged one is not promoted, so ``.prev.pt`` is always the last good checkpoint;
  4. the temp file is renamed over the checkpoint and the folder is fsynced.
A crash at any moment leaves the old or the new checkpoint, never a half-written one; a write
that fails (full disk, file-size limit, unwritable folder) raises CheckpointError and leaves
both files as they were.

Reading (load): the checkpoint is a zip archive (torch.save's format) and every record carries
a CRC-32; they are all checked before ``torch.load(weights_only=True)``, which admits tensors,
numbers, strings and containers only. A damaged checkpoint (flipped bytes, truncated, empty,
not a checkpoint at all) falls back to ``<name>.prev.pt`` with a CheckpointWarning when that one
verifies (the run then repeats the steps since it); with no good previous checkpoint it is
refused with CheckpointError, one sentence naming the file.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import uuid
import warnings
import zipfile

import torch

try:
    import fcntl
except ImportError:  # not POSIX: no locks, a cleanup could race a concurrent writer
    fcntl = None

TEMP_PREFIX, TEMP_SUFFIX = ".ckpt-", ".tmp"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message is one sentence naming the file."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was set aside for the previous good one."""


def previous_path(path: str) -> str:
    """Where the checkpoint before ``path`` is kept: run/checkpoint.pt -> run/checkpoint.prev.pt."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext or '.pt'}"


def remove_stale_temp_files(run_dir: str) -> list[str]:
    """Removes the ``.ckpt-*.tmp`` files in ``run_dir`` that no live writer holds (left by a
    write that was killed) and returns their paths. Other files are never touched."""
    removed = []
    try:
        entries = list(os.scandir(run_dir))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(TEMP_SUFFIX)):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            fd = os.open(entry.path, os.O_RDONLY)
        except OSError:
            continue
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live writer holds its file
            os.unlink(entry.path)
            removed.append(entry.path)
        except OSError:  # BlockingIOError: in use; anything else: leave it
            pass
        finally:
            os.close(fd)
    return removed


class _RecordingWriter:
    """The file object torch.save writes to, keeping the OSError (ENOSPC, EFBIG) that torch
    itself reports only as 'unexpected pos'."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self):
        self.f.flush()


def save_atomic(state: dict, path: str) -> None:
    """torch.save ``state`` to ``path`` atomically, keeping the previous good checkpoint as
    previous_path(path) (see the module docstring). Raises CheckpointError when the file
    cannot be written; ``path`` and its previous checkpoint are then unchanged."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temp_files(folder)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc} in {folder}; "
                              "choose a writable folder") from None
    writer = None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until the rename below
        with os.fdopen(os.dup(fd), "wb") as f:
            writer = _RecordingWriter(f)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        _keep_as_previous(path)
        os.replace(tmp, path)
    except BaseException as exc:
        _unlink_quietly(tmp)
        cause = writer.error if writer is not None and writer.error is not None else exc
        if isinstance(cause, OSError) or _is_torch_write_failure(exc):
            raise CheckpointError(_write_failure(path, folder, cause)) from None
        raise
    finally:
        os.close(fd)
    _fsync_folder(folder)


def write_text_atomic(path: str, text: str, *, prefix: str = ".text-") -> None:
    """Writes ``text`` to ``path`` atomically (temp file in the same folder, fsync, rename, fsync
    of the folder): a crash leaves the old file or the new one, never a mix. For the small text
    files beside a checkpoint (metrics after a resume, a label store's manifest)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_folder(folder)


def _is_torch_write_failure(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text)


def _write_failure(path: str, folder: str, cause: BaseException) -> str:
    reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else _first_line(cause)
    try:
        free = f"; {shutil.disk_usage(folder).free / 2**20:.0f} MiB free there"
    except OSError:
        free = ""
    kept = ("the previous checkpoint is unchanged" if os.path.exists(path)
            else "no checkpoint was written")
    return (f"writing checkpoint {path} failed ({reason}{free}): free space or raise the file-size "
            f"limit, then resume; {kept}")


def _keep_as_previous(path: str) -> None:
    """Makes the checkpoint at ``path`` the previous one, unless it is missing or damaged."""
    if not os.path.exists(path):
        return
    prev = previous_path(path)
    damage = _damage(path)
    if damage is not None:
        warnings.warn(f"checkpoint {path} is damaged ({damage}): replacing it without keeping it as "
                      f"{os.path.basename(prev)}, which stays the last good checkpoint",
                      CheckpointWarning, stacklevel=3)
        return
    staged = os.path.join(os.path.dirname(prev), f"{TEMP_PREFIX}prev-{uuid.uuid4().hex}{TEMP_SUFFIX}")
    try:
        os.link(path, staged)
    except OSError:  # a file system without hard links: copy
        shutil.copyfile(path, staged)
        with open(staged, "rb+") as f:
            os.fsync(f.fileno())
    try:
        os.replace(staged, prev)
    except BaseException:
        _unlink_quietly(staged)
        raise


def _damage(path: str) -> str | None:
    """Why ``path`` is not an intact torch checkpoint archive, or None when every CRC checks."""
    try:
        if os.path.getsize(path) == 0:
            return "the file is empty"
        with zipfile.ZipFile(path) as archive:
            if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist()):
                return "a zip archive without data.pkl, not a torch checkpoint"
            bad = archive.testzip()
    except zipfile.BadZipFile:
        return "not a complete zip archive: truncated, or not a checkpoint at all"
    except Exception as exc:  # damaged headers surface as many kinds of errors
        return f"unreadable: {_first_line(exc)}"
    return None if bad is None else f"record {bad} fails its CRC-32 check"


def verify(path: str) -> None:
    """Raises CheckpointError when ``path`` is not an intact checkpoint archive (reads it all)."""
    damage = _damage(path)
    if damage is not None:
        raise CheckpointError(f"checkpoint {path} is damaged ({damage})")


def load(path: str, map_location="cpu", *, fallback: bool = True) -> dict:
    """The state saved by save_atomic at ``path``, after checking every CRC.

    A damaged ``path`` is replaced, with a CheckpointWarning, by previous_path(path) when
    ``fallback`` and that one is intact; otherwise CheckpointError (one sentence). A file
    holding anything but tensors, numbers, strings and containers is refused (CheckpointError)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    damage = _damage(path)
    if damage is None:
        return _load_verified(path, map_location)
    prev = previous_path(path)
    prev_damage = _damage(prev) if fallback and os.path.isfile(prev) else "absent"
    if prev_damage is None:
        state = _load_verified(prev, map_location)
        step = f" (step {state['step']})" if isinstance(state.get("step"), int) else ""
        warnings.warn(f"checkpoint {path} is damaged ({damage}): loading the previous one, {prev}{step}, "
                      "instead; the steps after it are run again", CheckpointWarning, stacklevel=2)
        return state
    also = "" if prev_damage == "absent" else f", and so is {prev} ({prev_damage})"
    raise CheckpointError(f"checkpoint {path} is damaged ({damage}){also}: it cannot be loaded; restore "
                          "it from a backup or start a new run")


def _load_verified(path: str, map_location) -> dict:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused an object (or the pickle is garbage)
        detail = next((ln.strip() for ln in str(exc).splitlines() if "WeightsUnpickler error" in ln),
                      _first_line(exc))
        raise CheckpointError(f"checkpoint {path} holds more than tensors, numbers, strings and "
                              f"containers ({detail}), so it was not written by mpl_fast: refusing to "
                              "load it") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not the dict mpl_fast "
                              "writes: refusing to load it")
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_folder(folder: str) -> None:
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
