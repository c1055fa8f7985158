"""What a run leaves for after training besides its checkpoint: metrics.png (redrawn at each
evaluation and at the end, never failing the run), --tensorboard event files (the same scalars
as metrics.jsonl, purged on resume, closed on every exit), and finetuned.pt."""

import json
import os
import sys

import pytest
import torch

from mpl_fast.train import curves as curves_module
from mpl_fast.train import session as session_module
from mpl_fast.train import tensorboard_log
from mpl_fast.train.config import preset
from mpl_fast.train.loop import TrainingStopped, run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cfg(out_dir, **overrides):
    """A few seconds of MPL on digits: evaluations at 10 and 20, a 2-step finetune."""
    cfg = preset("digits")
    cfg.steps, cfg.eval_every, cfg.log_every, cfg.checkpoint_every = 20, 10, 5, 0
    cfg.mpl.student_wait_steps, cfg.finetune.steps, cfg.output_dir = 5, 2, str(out_dir)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _metrics(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- metrics.png

def test_the_run_draws_metrics_png_at_each_evaluation_and_at_the_end(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install mpl_fast[plot])")
    monkeypatch.delenv("MPL_FAST_NO_PLOT", raising=False)
    monkeypatch.setattr(curves_module, "SPACING", 0.0)  # never too soon: every evaluation draws
    seen = []
    real_update = curves_module.Curves.update

    def update(self, final=False):
        drew = real_update(self, final)
        with open(self.path, "rb") as f:  # the PNG at this moment covers the metrics written so far
            seen.append((final, drew, f.read(8), _metrics(self.out_dir)[-1]["step"]))
        return drew

    monkeypatch.setattr(curves_module.Curves, "update", update)
    run(_cfg(tmp_path / "run"), progress=False, quiet=True)
    # step 10's evaluation draws; step 20's is the end's (after the final line)
    assert [(final, drew, magic) for final, drew, magic, _ in seen] == [(False, True, PNG_MAGIC), (True, True, PNG_MAGIC)]
    assert seen[0][3] == 10 and seen[1][3] == 20


def test_no_plot_and_the_environment_switch_leave_metrics_png_out(tmp_path, monkeypatch):
    monkeypatch.delenv("MPL_FAST_NO_PLOT", raising=False)
    run(_cfg(tmp_path / "off", plot=False, steps=10), progress=False, quiet=True)
    assert not os.path.exists(tmp_path / "off" / "metrics.png")
    monkeypatch.setenv("MPL_FAST_NO_PLOT", "1")
    assert not curves_module.plotting_enabled(True) and not curves_module.plotting_enabled(False)


def test_a_missing_matplotlib_is_one_notice_and_the_run_finishes(tmp_path, monkeypatch):
    monkeypatch.delenv("MPL_FAST_NO_PLOT", raising=False)
    monkeypatch.setattr(curves_module, "SPACING", 0.0)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import fails
    said = []
    monkeypatch.setattr(session_module, "Curves", lambda out_dir, say: curves_module.Curves(out_dir, said.append))
    summary = run(_cfg(tmp_path / "nompl"), progress=False, quiet=True)
    assert summary["steps"] == 20
    assert said == ["note: not drawing metrics.png: plotting needs matplotlib, which is not installed: "
                    "pip install mpl_fast[plot]"]
    assert not os.path.exists(tmp_path / "nompl" / "metrics.png")


def test_a_drawing_that_fails_is_one_warning_and_the_run_finishes(tmp_path, monkeypatch):
    from mpl_fast import plot

    monkeypatch.delenv("MPL_FAST_NO_PLOT", raising=False)
    monkeypatch.setattr(curves_module, "SPACING", 0.0)
    calls = []

    def broken(run_dirs, out):
        calls.append(out)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plot, "plot_runs", broken)
    said = []
    monkeypatch.setattr(session_module, "Curves", lambda out_dir, say: curves_module.Curves(out_dir, said.append))
    summary = run(_cfg(tmp_path / "full"), progress=False, quiet=True)
    assert summary["steps"] == 20 and len(calls) == 1  # tried once, then left alone
    assert len(said) == 1 and said[0].startswith("warning: drawing metrics.png failed (OSError")
    assert "python -m mpl_fast.plot" in said[0]


def test_an_evaluation_skips_its_drawing_until_spacing_times_the_last_cost_has_passed(monkeypatch):
    from mpl_fast import plot

    now = [0.0]
    drawn = []

    def fake_plot(run_dirs, out):
        now[0] += 2.0  # each drawing takes 2 s
        drawn.append(now[0])

    monkeypatch.setattr(plot, "plot_runs", fake_plot)
    c = curves_module.Curves("run", print, clock=lambda: now[0])
    assert c.update()                     # the first evaluation draws (ends at t=2)
    now[0] = 2.0 + curves_module.SPACING * 2.0 - 0.5
    assert not c.update()                 # too soon: drawing would take more than 1/SPACING of the time
    assert c.update(final=True)           # the end always draws
    now[0] += curves_module.SPACING * 2.0
    assert c.update() and c.drawn == 3


# ----------------------------------------------------------------------------- tensorboard

class RecordingWriter:
    """Stands in for torch's SummaryWriter: records what the trainer asks of it."""

    instances = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        RecordingWriter.instances.append(self)

    def add_scalar(self, tag, value, global_step):
        assert not self.closed
        self.scalars.append((tag, value, global_step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


@pytest.fixture
def recording_writer(monkeypatch):
    RecordingWriter.instances = []
    monkeypatch.setattr(session_module, "TensorBoardLog",
                        lambda run_dir, resumed_at: tensorboard_log.TensorBoardLog(run_dir, resumed_at, RecordingWriter))
    monkeypatch.setattr(session_module, "check_available", lambda: None)
    return RecordingWriter.instances


def test_tensorboard_gets_every_number_of_metrics_jsonl_and_is_closed(tmp_path, recording_writer):
    out = tmp_path / "tb"
    run(_cfg(out, tensorboard=True), progress=False, quiet=True)
    (writer,) = recording_writer
    assert writer.closed and writer.purge_step is None and writer.log_dir == str(out / "tensorboard")
    expected = []
    for line in _metrics(out):
        kind = "final" if line.get("final") else "eval" if line.get("eval") else "train"
        expected += [(f"{kind}/{k}", float(v), line["step"]) for k, v in line.items()
                     if k not in ("step", "eval", "final") and isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert writer.scalars == expected
    tags = {tag for tag, _, _ in writer.scalars}
    assert {"train/loss_teacher", "train/h", "train/lr_student", "eval/val_ema", "eval/test_teacher",
            "final/test_finetuned"} <= tags


def test_tensorboard_purges_the_events_after_the_checkpoint_a_run_resumes_from(tmp_path, recording_writer):
    out = tmp_path / "resumed"
    first = run(_cfg(out, tensorboard=True), progress=False, quiet=True, stop_after=12)
    assert first["interrupted"] and recording_writer[0].closed
    run(_cfg(out, tensorboard=True), resume=str(out), progress=False, quiet=True)
    assert recording_writer[1].purge_step == 13 and recording_writer[1].closed
    assert min(step for _, _, step in recording_writer[1].scalars) > 12


def test_tensorboard_is_closed_when_the_run_fails(tmp_path, recording_writer, monkeypatch):
    from mpl_fast.train import loop

    def stop(*args, **kwargs):
        raise TrainingStopped("stopped at step 5: a test")

    monkeypatch.setattr(loop, "log_interval", stop)
    with pytest.raises(TrainingStopped):
        run(_cfg(tmp_path / "failed", tensorboard=True), progress=False, quiet=True)
    assert recording_writer[0].closed


def test_tensorboard_without_the_package_is_refused_in_one_sentence(tmp_path, monkeypatch, capsys):
    from mpl_fast.train import main

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SystemExit, match=r"--tensorboard needs the tensorboard package, which is not installed: "
                                         r"pip install mpl_fast\[tensorboard\]"):
        main(["--steps", "2", "--tensorboard", "--output-dir", str(tmp_path / "x")])
    assert not os.path.exists(tmp_path / "x")  # refused before the run made anything


def test_tensorboard_event_files_hold_the_runs_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install mpl_fast[tensorboard])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "real"
    run(_cfg(out, tensorboard=True, steps=10, eval_every=5), progress=False, quiet=True)
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    lines = _metrics(out)
    h = [(ev.step, ev.value) for ev in events.Scalars("train/h")]
    assert h == [(line["step"], pytest.approx(line["h"], rel=1e-6, abs=1e-12)) for line in lines
                 if "h" in line and not line.get("eval") and not line.get("final")]
    final = next(line for line in lines if line.get("final"))
    assert [ev.value for ev in events.Scalars("final/test_finetuned")] == [pytest.approx(final["test_finetuned"])]


# ----------------------------------------------------------------------------- finetuned.pt

def test_the_finetuned_student_is_saved_weights_only_and_loads_as_finetuned(tmp_path):
    import mpl_fast

    out = tmp_path / "ft"
    summary = run(_cfg(out), progress=False, quiet=True)
    state = torch.load(out / "finetuned.pt", map_location="cpu", weights_only=True)
    assert state["base"] == "ema" and set(state) == {"state_dict", "base"}
    model, _ = mpl_fast.load(str(out), model="finetuned")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["state_dict"][k])
    selected, _ = mpl_fast.load(str(out), model="selected")
    assert any(not torch.equal(a, b) for a, b in zip(selected.state_dict().values(), model.state_dict().values()))
    assert summary["test_top1"]["finetuned"] is not None


def test_a_run_that_does_not_finetune_writes_no_finetuned_pt(tmp_path):
    import mpl_fast
    from mpl_fast.runs import RunError

    out = tmp_path / "uda"
    run(_cfg(out, method="uda", steps=10), progress=False, quiet=True)
    assert not os.path.exists(out / "finetuned.pt")
    with pytest.raises(RunError, match="has no finetuned.pt"):
        mpl_fast.load(str(out), model="finetuned")
