"""``--config FILE``: a saved config (a run's config.json, or a user's JSON file holding any
part of the same tree) read as plain data, checked leaf by leaf against the config's types.
JSON only: nothing in the file can execute code."""

from __future__ import annotations

import json
import os
import typing

from mpl_fast.algo.config import literal_choices
from mpl_fast.train.config import PRESETS, TrainConfig, leaves

_LEAVES = {name: tp for name, tp, _field in leaves(TrainConfig)}
_BRANCHES = {name.rsplit(".", 1)[0] for name in _LEAVES if "." in name}


def read_config_file(path: str) -> dict:
    """{dotted name: value} of every leaf the file sets; ValueError (one sentence naming the
    file) for a missing or unreadable file, bad JSON, an unknown setting or a value of the wrong
    type. A run's own config.json names that run's folder as output_dir: it is dropped, so a new
    run started from it does not overwrite the old one."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = json.load(f)
    except OSError as exc:
        raise ValueError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" (line {exc.lineno}: {exc.msg})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ValueError(f"--config {path} is not a JSON file{where}") from None
    if not isinstance(tree, dict):
        raise ValueError(f"--config {path} must hold a JSON object (a run's config.json), not {type(tree).__name__}")
    values = {}
    _flatten(tree, "", path, values)
    output_dir = values.get("output_dir")
    if output_dir is not None and os.path.abspath(output_dir) == os.path.dirname(os.path.abspath(path)):
        del values["output_dir"]
    return values


def _flatten(tree: dict, prefix: str, path: str, out: dict) -> None:
    for key, value in tree.items():
        name = prefix + str(key)
        if name in _BRANCHES:
            if not isinstance(value, dict):
                raise ValueError(f"--config {path}: {name!r} must be an object of settings, got {value!r}")
            _flatten(value, name + ".", path, out)
        elif name in _LEAVES:
            _check(name, _LEAVES[name], value, path)
            out[name] = value
        else:
            raise ValueError(f"--config {path}: unknown setting {name!r} (the file holds the fields of a run's "
                             f"config.json; see python -m mpl_fast.train --help)")


def _check(name: str, tp, value, path: str) -> None:
    """Refuses a value that is not of the field's type (ints are taken where floats go)."""
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return
        raise ValueError(f"--config {path}: {name!r} cannot be null")
    if name == "preset" and value not in PRESETS:
        raise ValueError(f"--config {path}: preset {value!r} is not one of {', '.join(sorted(PRESETS))}")
    choices = literal_choices(tp)
    if choices is not None:
        if value not in choices:
            raise ValueError(f"--config {path}: {name!r} must be one of {', '.join(map(repr, choices))}, "
                             f"got {value!r}")
        return
    base = next((a for a in args if a is not type(None)), tp)
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}[base](value)
    if not ok:
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[base]
        raise ValueError(f"--config {path}: {name!r} must be {kind}, got {value!r}")
