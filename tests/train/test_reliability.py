"""The trainer under hostile input and faults (issue 19): run folders never wiped by a re-run,
every bad input one `error:` sentence with its exit code, a checkpoint on every stop path
(signals to the whole process group, during evaluation and the finetune), resumes that change
only what they may, and the end of a run resumable without duplicate lines."""

import json
import os
import resource
import signal
import subprocess
import sys

import pytest

from mpl_fast import checkpoint as ckpt
from mpl_fast.train import TrainingStopped, main, run
from mpl_fast.train.config import preset
from mpl_fast.train.errors import EXIT_BAD_INPUT, EXIT_STOPPED, UserInputError
from mpl_fast.train.resume_flags import apply_resume_flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--steps", "12", "--log-every", "4", "--eval-every", "8", "--checkpoint-every", "4",
        "--mpl.student-wait-steps", "2", "--finetune.steps", "3", "--threads", "1"]


def _lines(folder) -> list[dict]:
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(ln, parse_constant=refuse) for ln in f if ln.strip()]


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


def _sub(code: str, *, timeout=240, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


# ------------------------------------------------------------------ item 2: no run wiped by a re-run

def test_rerun_into_a_run_folder_is_refused_and_overwrite_replaces_it(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(TINY + ["--output-dir", out]) == 0
    before = open(os.path.join(out, "metrics.jsonl")).read()
    step_before = ckpt.load(os.path.join(out, "checkpoint.pt"))["step"]
    capsys.readouterr()
    assert main(TINY + ["--steps", "4", "--output-dir", out]) == EXIT_BAD_INPUT
    line = _one_error_line(capsys.readouterr().err)
    assert "--resume" in line and "--overwrite" in line and out in line
    assert open(os.path.join(out, "metrics.jsonl")).read() == before  # nothing touched
    assert ckpt.load(os.path.join(out, "checkpoint.pt"))["step"] == step_before
    assert main(TINY + ["--steps", "4", "--output-dir", out, "--overwrite"]) == 0
    assert max(r["step"] for r in _lines(out)) == 4
    assert not os.path.exists(os.path.join(out, "checkpoint.prev.pt"))  # the old run's is gone too


# ------------------------------------------------------------------ item 11: bad input, one sentence

@pytest.mark.parametrize("flags, names", [
    (["--data.batch-size", "0"], "--data.batch-size"), (["--data.batch-size", "-1"], "--data.batch-size"),
    (["--data.mu", "0"], "--data.mu"), (["--seed", "-1"], "--seed"), (["--model.dropout", "2"], "--model.dropout"),
    (["--data.labels-per-class", "0"], "--data.labels-per-class"),
    (["--data.eval-batch-size", "0"], "--data.eval-batch-size"), (["--data.num-workers", "-1"], "--data.num-workers"),
    (["--device", "foo"], "--device"), (["--device", "meta"], "--device"), (["--model.name", "foo"], "--model.name"),
    (["--teacher.lr", "inf"], "--teacher.lr"), (["--student.lr", "nan"], "student.lr"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"), (["--data.image-size", "0"], "--data.image-size"),
    (["--finetune.batch-size", "0"], "--finetune.batch-size"), (["--finetune.lr", "inf"], "--finetune.lr"),
])
def test_out_of_range_fields_are_one_sentence_naming_the_flag(tmp_path, capsys, flags, names):
    with pytest.raises(SystemExit) as exc:
        main(flags + ["--output-dir", str(tmp_path / "out")])
    assert exc.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert names in err.splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_file_data_set_without_data_dir_is_one_sentence_and_makes_no_folder(tmp_path, capsys):
    assert main(["--preset", "cifar10-4k", "--output-dir", str(tmp_path / "out")]) == EXIT_BAD_INPUT
    assert "--data-dir" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_or_unwritable_is_one_sentence(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(TINY + ["--output-dir", str(tmp_path / "afile")]) == EXIT_BAD_INPUT
    assert "--output-dir" in _one_error_line(capsys.readouterr().err)
    assert main(TINY + ["--output-dir", str(tmp_path / "afile" / "run")]) == EXIT_BAD_INPUT
    assert "--output-dir" in _one_error_line(capsys.readouterr().err)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            assert main(TINY + ["--output-dir", str(locked / "run")]) == EXIT_BAD_INPUT
            assert "not writable" in _one_error_line(capsys.readouterr().err)
        finally:
            locked.chmod(0o700)


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n", "truncated"])
def test_empty_text_or_truncated_checkpoint_on_resume_is_one_sentence(tmp_path, capsys, content):
    out = tmp_path / "run"
    if content == "truncated":
        assert main(TINY + ["--steps", "4", "--output-dir", str(out)]) == 0
        data = (out / "checkpoint.pt").read_bytes()
        (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
        (out / "checkpoint.prev.pt").unlink(missing_ok=True)
    else:
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(content)
    capsys.readouterr()
    assert main(["--resume", str(out)]) == EXIT_BAD_INPUT
    assert "checkpoint.pt" in _one_error_line(capsys.readouterr().err)


def test_resume_of_a_folder_without_checkpoint_is_one_sentence(tmp_path, capsys):
    assert main(["--resume", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "--resume" in _one_error_line(capsys.readouterr().err)


def test_full_disk_is_one_sentence_not_a_traceback(tmp_path):
    """A file-size limit (the checkpoint cannot be written) ends in one `error:` line, exit 2."""
    out = tmp_path / "run"
    limit = 64 * 1024  # metrics lines fit, a checkpoint does not

    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    code = ("import sys; from mpl_fast.train import main\n"
            f"sys.exit(main({TINY + ['--output-dir', str(out)]!r}))\n")
    proc = _sub(code, preexec_fn=limit_files)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    line = _one_error_line(proc.stderr)
    assert "checkpoint.pt" in line and "too large" in line.lower()


# ------------------------------------------------------------------ items 3 and 12: stop signals

def _stop_in_process(out, hook: str, extra=()) -> subprocess.CompletedProcess:
    """Runs the trainer in a fresh process group; ``hook`` is code patched in to send signals."""
    code = ("import os, signal, sys\n" + hook +
            "from mpl_fast.train import main\n"
            f"sys.exit(main({TINY + ['--output-dir', str(out)] + list(extra)!r}))\n")
    return _sub(code, start_new_session=True)


def test_sigterm_exits_with_the_stopped_code_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    hook = ("from mpl_fast.algo import MPL\n"
            "orig = MPL.step\n"
            "def step(self, *a, **k):\n"
            "    r = orig(self, *a, **k)\n"
            "    if k['clock'] == 5: os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return r\n"
            "MPL.step = step\n")
    proc = _stop_in_process(out, hook)
    assert proc.returncode == EXIT_STOPPED, proc.stdout + proc.stderr
    assert "checkpoint saved" in proc.stdout and f"--resume {out}" in proc.stdout
    assert ckpt.load(str(out / "checkpoint.pt"))["step"] == 6


def test_sigterm_to_the_process_group_during_evaluation_checkpoints(tmp_path):
    """DataLoader workers get the group's SIGTERM too: they ignore it, and the main process
    finishes the evaluation, checkpoints and exits with the stopped code (before: the workers
    died and the main process failed with 'DataLoader worker ... is killed by signal')."""
    from mpl_fast.data.tiny import write_tiny_cifar

    data = tmp_path / "c10"
    write_tiny_cifar(str(data), train_per_class=6, test_per_class=4)
    out = tmp_path / "run"
    hook = ("import time\n"
            "import mpl_fast.train.evaluate as ev\n"
            "orig = ev.accuracy\n"
            "def accuracy(model, batches):\n"
            "    def killing():\n"
            "        for i, b in enumerate(batches):\n"
            "            if i == 1 and not os.environ.get('KILLED'):\n"
            "                os.environ['KILLED'] = '1'\n"
            "                os.killpg(0, signal.SIGTERM)\n"
            "                time.sleep(1.0)\n"
            "            yield b\n"
            "    return orig(model, killing())\n"
            "ev.accuracy = accuracy\n")
    cifar = ["--preset", "cifar10-4k", "--data-dir", str(data), "--data.labels-per-class", "2",
             "--data.val-per-class", "2", "--data.batch-size", "2", "--data.mu", "1", "--data.num-workers", "2",
             "--data.eval-batch-size", "4", "--model.name", "digits-cnn", "--finetune.steps", "0",
             "--steps", "6", "--eval-every", "3", "--log-every", "3", "--checkpoint-every", "0"]
    code = ("import os, signal, sys\n" + hook + "from mpl_fast.train import main\n"
            f"sys.exit(main({cifar + ['--output-dir', str(out), '--threads', '1']!r}))\n")
    proc = _sub(code, start_new_session=True)
    assert proc.returncode == EXIT_STOPPED, proc.stdout + proc.stderr
    assert "killed by signal" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert ckpt.load(str(out / "checkpoint.pt"))["step"] == 3


def test_ctrl_c_during_the_finetune_stops_and_resume_finishes_without_duplicates(tmp_path):
    out = tmp_path / "run"
    hook = ("import mpl_fast.train.evaluate as ev\n"
            "orig = ev.finetune\n"
            "def finetune(*a, **k):\n"
            "    os.killpg(0, signal.SIGINT)\n"
            "    return orig(*a, **k)\n"
            "ev.finetune = finetune\n")
    proc = _stop_in_process(out, hook)
    assert proc.returncode == EXIT_STOPPED, proc.stdout + proc.stderr
    assert "during the final finetune" in proc.stdout and "Traceback" not in proc.stderr
    assert ckpt.load(str(out / "checkpoint.pt"))["step"] == 12
    assert not (out / "summary.json").exists()
    summary = run(None, resume=str(out), progress=False, quiet=True)  # the end runs again, whole
    assert summary["steps"] == 12 and "finetuned" in summary["test_top1"]
    lines = _lines(out)
    assert sum(1 for r in lines if r.get("final")) == 1
    assert sum(1 for r in lines if r.get("eval") and r["step"] == 12) == 1


# ------------------------------------------------------------------ items 6, 7, 12: what a resume may do

def test_resume_applies_allowed_flags_and_refuses_the_rest(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(TINY + ["--steps", "8", "--output-dir", out]) == 0
    capsys.readouterr()
    assert main(["--resume", out, "--model.name", "wrn28-2"]) == EXIT_BAD_INPUT
    assert "--model.name" in _one_error_line(capsys.readouterr().err)
    assert main(["--resume", out, "--preset", "two-moons"]) == EXIT_BAD_INPUT
    assert "--preset" in _one_error_line(capsys.readouterr().err)
    assert main(["--resume", out, "--steps", "12", "--teacher.lr", "0.01", "--finetune.steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "--steps 8 -> 12" in printed and "--teacher.lr 0.05 -> 0.01" in printed
    assert json.load(open(os.path.join(out, "summary.json")))["steps"] == 12
    lines = _lines(out)
    assert [r["step"] for r in lines if r.get("final")] == [8, 12]
    assert lines[-2]["step"] == 12 and abs(lines[-3]["lr_teacher"]) <= 0.01


def test_resuming_a_finished_run_says_so_and_writes_nothing(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(TINY + ["--output-dir", out]) == 0
    before = open(os.path.join(out, "metrics.jsonl")).read()
    capsys.readouterr()
    assert main(["--resume", out]) == 0
    assert "is finished" in capsys.readouterr().out
    assert open(os.path.join(out, "metrics.jsonl")).read() == before


def test_resume_needs_data_dir_on_the_command_line_for_file_data(tmp_path):
    cfg = preset("cifar10-4k")
    cfg.data.data_dir, cfg.output_dir = "/planted/by/someone", str(tmp_path)
    with pytest.raises(UserInputError, match="--data-dir /planted/by/someone"):
        apply_resume_flags(cfg, {}, str(tmp_path))
    changes = apply_resume_flags(cfg, {"data.data_dir": str(tmp_path / "mine")}, str(tmp_path))
    assert cfg.data.data_dir == str(tmp_path / "mine") and len(changes) == 1
    with pytest.raises(UserInputError, match="--data.dataset"):
        apply_resume_flags(cfg, {"data.data_dir": str(tmp_path), "data.dataset": "svhn"}, str(tmp_path))


def test_resume_under_another_world_size_is_refused_unless_asked(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(TINY + ["--steps", "4", "--checkpoint-every", "0", "--output-dir", out]) == 0
    path = os.path.join(out, "checkpoint.pt")
    state = ckpt.load(path)
    state["world_size"], state["step"] = 2, 2
    ckpt.save_atomic(state, path)
    capsys.readouterr()
    assert main(["--resume", out]) == EXIT_BAD_INPUT
    line = _one_error_line(capsys.readouterr().err)
    assert "--allow-world-size-change" in line and "torchrun --nproc-per-node 2" in line


# ------------------------------------------------------------------ wiring, items 13

def test_non_finite_stop_without_checkpoint_does_not_claim_one_and_logs_null(tmp_path):
    cfg = preset("digits")
    cfg.steps, cfg.log_every, cfg.checkpoint_every, cfg.max_nonfinite, cfg.threads = 40, 2, 0, 3, 1
    cfg.teacher.lr, cfg.teacher.warmup_steps = 1e38, 0
    cfg.output_dir = str(tmp_path / "run")
    with pytest.raises(TrainingStopped) as exc:
        run(cfg, progress=False, quiet=True)
    assert "no checkpoint was written" in str(exc.value) and "last checkpoint holds" not in str(exc.value)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    lines = _lines(tmp_path / "run")  # strict JSON: a NaN/inf loss is null
    assert any(v is None for r in lines for v in r.values())


def test_stale_temp_files_are_removed_on_resume_and_counts_are_logged(tmp_path):
    out = tmp_path / "run"
    assert main(TINY + ["--steps", "8", "--output-dir", str(out)]) == 0
    stale = out / ".ckpt-deadbeef.tmp"
    stale.write_bytes(b"x" * 100)
    (out / "notes.txt").write_text("mine")
    assert main(["--resume", str(out), "--steps", "10"]) == 0
    assert not stale.exists() and (out / "notes.txt").exists()
    train = [r for r in _lines(out) if "h" in r]
    assert all(r["corrupt_images"] == 0 and r["corrupt_skips"] == 0 for r in train)
    summary = json.load(open(out / "summary.json"))
    assert summary["corrupt_images"] == 0


def _imagefolder_cfg(data, out):
    cfg = preset("imagenet-10pct")
    cfg.data.data_dir, cfg.data.labeled_fraction, cfg.data.val_per_class = str(data), 0.6, 1
    cfg.data.batch_size, cfg.data.mu, cfg.data.num_workers, cfg.data.eval_batch_size = 2, 1, 0, 8
    cfg.data.image_size, cfg.data.loader, cfg.model.name = 32, "torch", "digits-cnn"
    cfg.steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every, cfg.threads = 8, 2, 100, 0, 1
    cfg.mpl.student_wait_steps, cfg.finetune.steps = 0, 0
    cfg.output_dir = str(out)
    return cfg


@pytest.mark.filterwarnings("ignore")
def test_corrupt_image_counts_are_logged_and_carried_across_a_resume(tmp_path):
    """The tiny ImageFolder holds a truncated JPEG: its counts reach metrics.jsonl and
    summary.json, and an interrupted + resumed run reports what the uninterrupted one does."""
    from mpl_fast.data.tiny import write_tiny_imagefolder

    data = tmp_path / "imf"
    write_tiny_imagefolder(str(data), num_classes=3, train_per_class=5, val_per_class=2, size=40)
    full = run(_imagefolder_cfg(data, tmp_path / "full"), progress=False, quiet=True)
    assert full["corrupt_images"] == 1 and full["corrupt_skips"] >= 1
    assert [r for r in _lines(tmp_path / "full") if "h" in r][-1]["corrupt_skips"] == full["corrupt_skips"]
    part = run(_imagefolder_cfg(data, tmp_path / "part"), progress=False, quiet=True, stop_after=4)
    assert part["interrupted"]
    resumed = run(None, resume=str(tmp_path / "part"), progress=False, quiet=True)
    assert (resumed["corrupt_images"], resumed["corrupt_skips"]) == (full["corrupt_images"], full["corrupt_skips"])
