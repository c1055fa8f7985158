"""Checkpoints under faults: bit rot, damaged and hostile files, a full disk, a write killed
half-way. Each case ends in the old or the new state, or one sentence naming the file."""

import errno
import os
import struct
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from mpl_fast import checkpoint as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"step": step, "config": {"name": "test", "lr": 0.1},
            "mpl": {f"layer{i}.weight": torch.randn(64, 32, generator=g) for i in range(8)},
            "rng": {"torch": torch.arange(step, step + 16, dtype=torch.uint8)}}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _data_span(path, member_suffix: str) -> tuple[int, int]:
    """(offset, length) of the stored bytes of the archive record ending in ``member_suffix``."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


def _flip(path, positions) -> None:
    raw = bytearray(open(path, "rb").read())
    for p in positions:
        raw[p] ^= 0xFF
    open(path, "wb").write(bytes(raw))


def _leftovers(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(ckpt.TEMP_PREFIX))


def test_save_keeps_the_previous_good_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    ckpt.save_atomic(_state(1), path)
    assert not os.path.exists(ckpt.previous_path(path))
    ckpt.save_atomic(_state(2), path)
    ckpt.save_atomic(_state(3), path)
    assert ckpt.previous_path(path) == str(tmp_path / "checkpoint.prev.pt")
    assert _same(ckpt.load(path), _state(3))
    assert _same(ckpt.load(ckpt.previous_path(path)), _state(2))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_flipped_bytes_in_a_tensor_are_refused_naming_the_file(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    ckpt.save_atomic(_state(1), path)
    start, length = _data_span(path, "data/3")
    _flip(path, range(start + 100, start + length, length // 20)[:20])
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.load(path)
    message = str(caught.value)
    assert message.startswith(f"checkpoint {path} is damaged (record ") and "CRC-32" in message
    assert "restore it from a backup or start a new run" in message and "\n" not in message


@pytest.mark.parametrize("seed", range(40))
def test_random_bit_rot_anywhere_is_refused_or_harmless(tmp_path, seed):
    """20 bytes flipped anywhere in the file: the load refuses, or (a flip in zip padding or an
    unread header field) returns exactly the saved state; never a silently different one."""
    path = str(tmp_path / "checkpoint.pt")
    ckpt.save_atomic(_state(1), path)
    size = os.path.getsize(path)
    g = torch.Generator().manual_seed(seed)
    _flip(path, torch.randint(size, (20,), generator=g).tolist())
    try:
        loaded = ckpt.load(path)
    except ckpt.CheckpointError as exc:
        assert str(exc).startswith(f"checkpoint {path} ")
    else:
        assert _same(loaded, _state(1))


def test_damaged_latest_falls_back_to_the_previous_with_a_warning(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    ckpt.save_atomic(_state(1), path)
    ckpt.save_atomic(_state(2), path)
    start, _ = _data_span(path, "data/0")
    _flip(path, [start + 5])
    with pytest.warns(ckpt.CheckpointWarning, match=r"checkpoint .*checkpoint.pt is damaged .*loading "
                                                    r"the previous one, .*checkpoint.prev.pt \(step 1\)"):
        assert _same(ckpt.load(path), _state(1))
    with pytest.raises(ckpt.CheckpointError, match="is damaged"):
        ckpt.load(path, fallback=False)
    # The next write replaces the damaged file but does not promote it: prev stays step 1.
    with pytest.warns(ckpt.CheckpointWarning, match=r"replacing it without keeping it as checkpoint.prev.pt"):
        ckpt.save_atomic(_state(3), path)
    assert _same(ckpt.load(path), _state(3))
    assert _same(ckpt.load(ckpt.previous_path(path)), _state(1))


def test_damaged_latest_and_previous_name_both(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    ckpt.save_atomic(_state(1), path)
    ckpt.save_atomic(_state(2), path)
    open(path, "wb").close()
    open(ckpt.previous_path(path), "w").write("{}")
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint .*checkpoint.pt is damaged \(the file is "
                                                   r"empty\), and so is .*checkpoint.prev.pt \(not a complete zip"):
        ckpt.load(path)


@pytest.mark.parametrize("content", ["empty", "text", "truncated", "other zip"])
def test_empty_text_truncated_or_foreign_checkpoint_is_one_sentence(tmp_path, content):
    path = str(tmp_path / "checkpoint.pt")
    ckpt.save_atomic(_state(1), path)
    whole = open(path, "rb").read()
    if content == "other zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "hello")
    else:
        data = {"empty": b"", "text": b"step: 300\n", "truncated": whole[: len(whole) // 2]}[content]
        open(path, "wb").write(data)
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.load(path)
    message = str(caught.value)
    assert message.startswith(f"checkpoint {path} is damaged (") and "\n" not in message


def test_missing_checkpoint_is_one_sentence(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint .*nothing.pt does not exist"):
        ckpt.load(str(tmp_path / "nothing.pt"))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo ran > '{self.marker}'",)


def test_checkpoint_that_would_run_code_is_refused_even_with_a_good_previous(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    marker = tmp_path / "payload-ran"
    ckpt.save_atomic(_state(1), path)
    ckpt.save_atomic(_state(2), path)
    torch.save({"step": 3, "config": _RunsCode(marker)}, path)  # CRCs are fine: a crafted file
    with pytest.raises(ckpt.CheckpointError, match=r"holds more than tensors.*refusing to load it"):
        ckpt.load(path)
    assert not marker.exists()


def _run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, **kwargs)


def test_full_disk_while_writing_is_one_sentence_and_keeps_the_checkpoint(tmp_path):
    """A real write failure: the file-size limit (RLIMIT_FSIZE) stops the write half-way, the
    way a full disk does (EFBIG instead of ENOSPC)."""
    path = str(tmp_path / "checkpoint.pt")
    proc = _run_python(f"""
        import resource, signal, torch
        from mpl_fast import checkpoint as ckpt
        path = {path!r}
        ckpt.save_atomic({{"step": 1, "w": torch.ones(1000)}}, path)
        ckpt.save_atomic({{"step": 2, "w": torch.ones(1000) * 2}}, path)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write returns EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        try:
            ckpt.save_atomic({{"step": 3, "w": torch.ones(1_000_000)}}, path)
        except ckpt.CheckpointError as exc:
            print(exc)
        """)
    assert proc.returncode == 0, proc.stderr
    message = proc.stdout.strip()
    assert message.startswith(f"writing checkpoint {path} failed (File too large; ")
    assert message.endswith("then resume; the previous checkpoint is unchanged") and "\n" not in message
    state = ckpt.load(path)
    assert state["step"] == 2 and torch.equal(state["w"], torch.ones(1000) * 2)
    assert ckpt.load(ckpt.previous_path(path))["step"] == 1
    assert _leftovers(tmp_path) == []


def test_no_space_at_fsync_is_one_sentence_and_keeps_both_checkpoints(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    ckpt.save_atomic(_state(1), path)
    ckpt.save_atomic(_state(2), path)

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(ckpt.CheckpointError, match=r"writing checkpoint .* failed \(No space left on device; "
                                                   r"\d+ MiB free there\).*previous checkpoint is unchanged"):
        ckpt.save_atomic(_state(3), path)
    monkeypatch.undo()
    assert _same(ckpt.load(path), _state(2))
    assert _same(ckpt.load(ckpt.previous_path(path)), _state(1))
    assert _leftovers(tmp_path) == []


def test_unwritable_folder_is_one_sentence(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ckpt.CheckpointError, match=r"cannot write checkpoint .*a-file.*choose a writable folder"):
        ckpt.save_atomic(_state(1), str(tmp_path / "a-file" / "checkpoint.pt"))


def test_a_write_killed_half_way_leaves_a_temp_file_the_next_write_removes(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    proc = _run_python(f"""
        import os, signal, torch
        from mpl_fast import checkpoint as ckpt
        ckpt.save_atomic({{"step": 1, "w": torch.ones(10)}}, {path!r})
        real_save = torch.save
        def save_then_die(state, f):
            f.write(b"PK\\x03\\x04" + bytes(100_000))  # part of an archive, then SIGKILL
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = save_then_die
        ckpt.save_atomic({{"step": 2, "w": torch.ones(10)}}, {path!r})
        """)
    assert proc.returncode == -9, proc.stderr
    stale = _leftovers(tmp_path)
    assert len(stale) == 1 and os.path.getsize(tmp_path / stale[0]) >= 100_000
    assert ckpt.load(path)["step"] == 1
    ckpt.save_atomic(_state(2), path)
    assert _leftovers(tmp_path) == []
    assert ckpt.load(path)["step"] == 2 and ckpt.load(ckpt.previous_path(path))["step"] == 1


def test_remove_stale_temp_files_spares_live_writers_and_other_files(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    for name in (".ckpt-dead1.tmp", ".ckpt-prev-dead2.tmp", ".ckpt-live.tmp", "checkpoint.pt",
                 "ckpt-x.tmp", ".ckpt-x.tmp.keep", "metrics.jsonl"):
        (tmp_path / name).write_bytes(b"x")
    live = os.open(tmp_path / ".ckpt-live.tmp", os.O_RDWR)
    fcntl.flock(live, fcntl.LOCK_EX)  # as save_atomic holds its temp file while writing
    try:
        removed = ckpt.remove_stale_temp_files(str(tmp_path))
    finally:
        os.close(live)
    assert sorted(os.path.basename(p) for p in removed) == [".ckpt-dead1.tmp", ".ckpt-prev-dead2.tmp"]
    assert sorted(os.listdir(tmp_path)) == [".ckpt-live.tmp", ".ckpt-x.tmp.keep", "checkpoint.pt",
                                            "ckpt-x.tmp", "metrics.jsonl"]
    assert ckpt.remove_stale_temp_files(str(tmp_path / "no-such-folder")) == []


def test_trainer_resumes_from_the_previous_checkpoint_when_the_latest_is_damaged(tmp_path):
    """End to end through the CLI, with no trainer change: a finished 10-step run (checkpoints
    at 4, 8 and 10), its checkpoint.pt then damaged; --resume falls back to step 8, warns, and
    ends with the same weights as before."""
    out = str(tmp_path / "run")
    args = ["--steps", "10", "--checkpoint-every", "4", "--log-every", "2", "--eval-every", "5",
            "--finetune.steps", "1", "--threads", "1"]
    first = subprocess.run([sys.executable, "-m", "mpl_fast.train", *args, "--output-dir", out], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    path = os.path.join(out, "checkpoint.pt")
    finished = ckpt.load(path)
    assert finished["step"] == 10 and ckpt.load(ckpt.previous_path(path))["step"] == 8
    start, _ = _data_span(path, "data/0")
    _flip(path, range(start, start + 20))
    resumed = subprocess.run([sys.executable, "-m", "mpl_fast.train", "--resume", out], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"checkpoint {path} is damaged" in resumed.stderr and "(step 8)" in resumed.stderr
    again = ckpt.load(path)
    assert again["step"] == 10 and _same(again["mpl"], finished["mpl"])
    assert ckpt.load(ckpt.previous_path(path))["step"] == 8  # the damaged file was never promoted
