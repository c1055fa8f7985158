"""The trainer's command line: every flag generated from the config tree reaches the code a
run executes, and ``--config FILE`` starts from a saved config that flags override.

Two checks per leaf flag: (1) the flag, given a non-default value, lands at its place in the
config (the CLI's side); (2) a real run reads that field (the trainer's side). Reads are
recorded on the config tree itself, ignoring the wholesale walks that reach every field without
using it (to_dict's asdict, validate, check_choices). A flag whose field nothing reads changes
nothing, and fails here (as --teacher.min-lr-ratio did while the teacher's schedule used the
student's ratio).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing

import pytest
from mpl_testing import set_fields

from mpl_fast.algo.config import literal_choices
from mpl_fast.data.tiny import write_tiny_imagefolder
from mpl_fast.train import build_parser, config_from_args, main, run
from mpl_fast.train.cli import ALIASES
from mpl_fast.train.config import TrainConfig, preset, to_dict

# Functions that walk every field without using it; a read from them does not count.
_WHOLESALE = {"_asdict_inner", "asdict", "check_choices", "validate", "need", "__repr__", "__eq__"}


def _leaves(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], prefix + f.name + ".")
        else:
            yield prefix + f.name, hints[f.name]


FLAGS = [(name, tp) for name, tp in _leaves(TrainConfig) if name != "preset"]


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _other_value(tp, current):
    """A value of type ``tp`` different from ``current``, as a command-line string."""
    choices = literal_choices(tp)
    if choices is not None:
        return next(c for c in choices if c != current)
    base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    if base is int:
        return str((current or 0) + 3)
    if base is float:
        return str((current or 0.0) + 0.25)
    return "somewhere-else" if current != "somewhere-else" else "elsewhere"


@pytest.mark.parametrize("name,tp", FLAGS, ids=[n for n, _ in FLAGS])
def test_every_flag_lands_at_its_place_in_the_config(name, tp):
    default = _get(preset("digits"), name)
    flag = "--" + name.replace("_", "-")
    if tp is bool:
        argv = [flag if not default else "--no-" + flag[2:]]
    else:
        argv = [flag, _other_value(tp, default)]
    cfg = config_from_args(build_parser().parse_args(argv))
    assert _get(cfg, name) != default, f"{flag} did not change {name}"
    changed = [n for n, _ in FLAGS if n != name and _get(cfg, n) != _get(preset("digits"), n)]
    assert changed == [], f"{flag} also changed {changed}"
    if name in ALIASES:  # the short spelling sets the same field
        alias_argv = [ALIASES[name]] + argv[1:]
        assert _get(config_from_args(build_parser().parse_args(alias_argv)), name) == _get(cfg, name)


def _recording(cfg, reads: set, path: str = ""):
    """``cfg`` (a dataclass tree) with every instance switched to a subclass that adds the
    dotted name of each leaf field read to ``reads``."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _recording(value, reads, path + f.name + ".")
    fields = {f.name for f in dataclasses.fields(cfg)}

    def __getattribute__(self, attr):
        value = object.__getattribute__(self, attr)
        if attr in fields and not dataclasses.is_dataclass(value) \
                and sys._getframe(1).f_code.co_name not in _WHOLESALE:
            reads.add(path + attr)
        return value

    cfg.__class__ = type(f"Recording{type(cfg).__name__}", (type(cfg),), {"__getattribute__": __getattribute__})
    return cfg


def _digits(tmp_path, name, **kw):
    cfg = preset("digits")
    cfg = set_fields(cfg, steps=4, log_every=2, eval_every=2, checkpoint_every=2, threads=1,
                     output_dir=str(tmp_path / name), mpl__student_wait_steps=0, finetune__steps=1,
                     teacher__grad_clip=1.0, student__grad_clip=1.0, **kw)
    return cfg


def _imagefolder(tmp_path):
    """The imagenet-10pct recipe (labeled_fraction, image folders) on a tiny folder, a few CPU steps."""
    root = write_tiny_imagefolder(str(tmp_path / "images"), num_classes=3, train_per_class=6, val_per_class=2)
    cfg = preset("imagenet-10pct")
    return set_fields(cfg, steps=2, log_every=1, eval_every=2, checkpoint_every=0, threads=1,
                      output_dir=str(tmp_path / "imagefolder"), model__name="digits-cnn", finetune__steps=0,
                      mpl__student_wait_steps=0, data__data_dir=root, data__labeled_fraction=0.5,
                      data__val_per_class=1, data__batch_size=2, data__mu=1, data__eval_batch_size=8,
                      data__image_size=16, data__loader="torch", data__num_workers=0)


def _digits_reduced(tmp_path):
    """--method reduced-mpl over a label store of the digits (its own flags: --reduced.*)."""
    import numpy as np

    from mpl_fast.data.config import DataConfig
    from mpl_fast.reduced.images import images_to_label
    from mpl_fast.reduced.store import TeacherLabelStore

    images = images_to_label(DataConfig(dataset="digits"))
    n = images.num_images
    store = TeacherLabelStore.create(str(tmp_path / "labels"), num_images=n, num_classes=10, k=2,
                                     teacher={"sha256": "0" * 64}, preprocessing={}, dataset=images.identity)
    store.write(0, np.tile([0.7, 0.2], (n, 1)), np.stack([np.arange(n) % 10, (np.arange(n) + 1) % 10], 1))
    store.commit([[0, n]])
    return _digits(tmp_path, "reduced", method="reduced-mpl", reduced__labels=str(tmp_path / "labels"))


def test_every_flag_is_read_by_a_run(tmp_path):
    reads: set = set()
    runs = [_digits(tmp_path, "grad-dot"),
            _digits(tmp_path, "finite-diff", mpl__feedback="finite-diff", mpl__pseudo_labels="soft"),
            _imagefolder(tmp_path), _digits_reduced(tmp_path)]
    for cfg in runs:
        run(_recording(cfg, reads), progress=False, quiet=True)
    unread = [name for name, _ in FLAGS if name not in reads]
    assert unread == [], f"flags whose config field no run read (they change nothing): {unread}"


def test_the_teachers_schedule_uses_the_teachers_min_lr_ratio():
    from mpl_fast.algo import Schedules

    cfg = preset("digits")
    cfg.teacher.min_lr_ratio, cfg.student.min_lr_ratio = 0.5, 0.1
    schedules = Schedules.for_run(cfg.steps, cfg.method, cfg.teacher, cfg.student, cfg.mpl)
    assert schedules.teacher(cfg.steps) == pytest.approx(cfg.teacher.lr * 0.5)
    assert schedules.student(cfg.steps) == pytest.approx(cfg.student.lr * 0.1)


# ----------------------------------------------------------------------------- --config FILE

def _parse(argv):
    return config_from_args(build_parser().parse_args(argv))


def test_a_runs_own_config_json_is_the_start_and_flags_override_it(tmp_path):
    saved = set_fields(preset("two-moons"), steps=123, mpl__feedback="update-dot", teacher__lr=0.7,
                       output_dir=str(tmp_path / "old-run"))
    (tmp_path / "old-run").mkdir()
    path = tmp_path / "old-run" / "config.json"
    path.write_text(json.dumps(to_dict(saved)))
    cfg = _parse(["--config", str(path), "--steps", "7"])
    expected = set_fields(preset("two-moons"), steps=7, mpl__feedback="update-dot", teacher__lr=0.7)
    assert cfg == expected  # output_dir: not the old run's folder (a fresh default one)
    elsewhere = set_fields(saved, output_dir=str(tmp_path / "chosen"))
    path.write_text(json.dumps(to_dict(elsewhere)))
    assert _parse(["--config", str(path)]).output_dir == str(tmp_path / "chosen")


def test_a_partial_file_fills_the_rest_from_its_preset_and_preset_flag_wins(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"preset": "cifar10-4k", "mpl": {"pseudo_labels": "soft"},
                                "data": {"labels_per_class": None, "labeled_fraction": 0.25}}))
    cfg = _parse(["--config", str(path)])
    assert cfg == set_fields(preset("cifar10-4k"), mpl__pseudo_labels="soft", data__labels_per_class=None,
                             data__labeled_fraction=0.25)
    other = _parse(["--config", str(path), "--preset", "digits", "--mpl.pseudo-labels", "sample"])
    assert other == set_fields(preset("digits"), mpl__pseudo_labels="sample", data__labels_per_class=None,
                               data__labeled_fraction=0.25)


@pytest.mark.parametrize("content,expect", [
    (None, "cannot read it"),
    ("{not json", "is not a JSON file (line 1"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"mpl": {"feedbak": "grad-dot"}}', "unknown setting 'mpl.feedbak'"),
    ('{"mpl": 3}', "'mpl' must be an object of settings"),
    ('{"steps": "many"}', "'steps' must be an integer"),
    ('{"amp": 1}', "'amp' must be true or false"),
    ('{"mpl": {"feedback": "exact"}}', "'mpl.feedback' must be one of 'grad-dot'"),
    ('{"preset": "mnist"}', "preset 'mnist' is not one of"),
    ('{"seed": null}', "'seed' cannot be null"),
])
def test_a_bad_config_file_is_one_error_naming_it(tmp_path, capsys, content, expect):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(path), "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --config {path}" in err and expect in err, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_config_and_resume_are_refused_together(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text("{}")
    with pytest.raises(SystemExit):
        main(["--config", str(path), "--resume", str(tmp_path)])
    assert "--config and --resume cannot be combined" in capsys.readouterr().err
