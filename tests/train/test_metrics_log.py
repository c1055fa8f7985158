"""metrics.jsonl: strict JSON out (non-finite as null), and a file cut short by a crash or a full
disk read back with its last line dropped and a warning; a bad earlier line named by number."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mpl_fast.metrics_log import MetricsFileError, MetricsLog, MetricsWarning, keep_through_step, read_metrics, to_json_line

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _strict_loads(line: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(line, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null_and_parse_strictly():
    record = {"step": 7, "loss": float("nan"), "lr": 0.1, "grad": float("inf"),
              "per_class": [1.0, float("-inf"), np.float32("nan"), np.float64(2.5)],
              "nested": {"x": np.float32(np.inf), "n": np.int64(3), "ok": True, "name": "a"}}
    with pytest.raises(ValueError, match="non-standard JSON token NaN"):
        _strict_loads(json.dumps(record, default=float))  # what a plain json.dumps writes
    line = to_json_line(record)
    assert line.endswith("\n") and line.count("\n") == 1
    assert _strict_loads(line) == {"step": 7, "loss": None, "lr": 0.1, "grad": None,
                                   "per_class": [1.0, None, None, 2.5],
                                   "nested": {"x": None, "n": 3, "ok": True, "name": "a"}}


def _write(path, text: bytes):
    with open(path, "wb") as f:
        f.write(text)


def test_an_incomplete_last_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = to_json_line({"step": 1, "loss": 0.5}) + to_json_line({"step": 2, "loss": 0.4})
    cases = [(b'{"step": 3, "lo', True), (b'{"step": 3, "lo\n', True), (b"\x00" * 4096, False)]
    for tail, dropped in cases:  # cut mid-line; cut then a newline; a zero-filled tail (no line)
        _write(path, good.encode() + tail)
        if dropped:
            with pytest.warns(MetricsWarning, match=rf"{path} line 3 is incomplete .*: dropped it"):
                records = read_metrics(str(path))
        else:
            records = read_metrics(str(path))
        assert records == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]


def test_a_bad_line_before_the_last_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, b'{"step": 1}\n\n{"step": 2, oops}\n{"step": 3}\n')
    with pytest.raises(MetricsFileError) as caught:
        read_metrics(str(path))
    assert str(caught.value).startswith(f"{path} line 3 is not a JSON object (JSONDecodeError: ")
    assert "\n" not in str(caught.value)
    _write(path, b'{"step": 1}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(MetricsFileError, match=r"line 2 is not a JSON object \(a JSON list, not an object\)"):
        read_metrics(str(path))
    _write(path, b'{"step": 1}\n{"step": "\xff"}\n{"step": 3}\n')
    with pytest.raises(MetricsFileError, match=r"line 2 is not a JSON object \(UnicodeDecodeError"):
        read_metrics(str(path))


def test_keep_through_step_drops_later_and_incomplete_lines_and_rewrites_strictly(tmp_path):
    path = tmp_path / "metrics.jsonl"
    # written by an older version: NaN tokens; then a crash mid-line
    _write(path, b'{"step": 1, "loss": NaN}\n{"eval": "val", "step": 2}\n{"step": 3}\n{"step": 4}\n{"st')
    with pytest.warns(MetricsWarning, match="line 5 is incomplete"):
        kept = keep_through_step(str(path), 3)
    assert kept == [{"step": 1, "loss": None}, {"eval": "val", "step": 2}, {"step": 3}]
    lines = path.read_text().splitlines()
    assert [_strict_loads(ln) for ln in lines] == kept
    assert keep_through_step(str(tmp_path / "absent.jsonl"), 3) == []
    assert not (tmp_path / "absent.jsonl").exists()
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_log_appends_after_repairing_a_cut_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, b'{"step": 1}\n{"step": 2, "lo')
    with pytest.warns(MetricsWarning, match=r"line 2 is incomplete: dropped it"):
        log = MetricsLog(str(path))
    with log:
        log.write({"step": 3, "loss": float("nan")})
    assert path.read_text() == '{"step": 1}\n{"step": 3, "loss": null}\n'
    _write(path, b'{"step": 1}\n{"step": 2}')  # whole, only its newline missing: kept
    with MetricsLog(str(path)) as log:
        log.write({"step": 3})
    assert read_metrics(str(path)) == [{"step": 1}, {"step": 2}, {"step": 3}]
    with MetricsLog(str(path), append=False) as log:
        log.write({"step": 1})
    assert path.read_text() == '{"step": 1}\n'


def test_disk_full_mid_line_then_read_back(tmp_path):
    """A real short write: RLIMIT_FSIZE stops the file in the middle of a line, as a full disk
    does; the lines before it are read back, the cut one is dropped with a warning."""
    path = str(tmp_path / "metrics.jsonl")
    code = f"""
        import resource, signal
        from mpl_fast.metrics_log import MetricsLog
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        log = MetricsLog({path!r}, append=False)
        try:
            for step in range(1, 1000):
                log.write({{"step": step, "loss": 1.0 / step, "note": "x" * 20}})
        except OSError as exc:
            print("stopped", exc.errno)
        """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.startswith("stopped 27"), proc.stdout + proc.stderr  # EFBIG
    assert os.path.getsize(path) == 1000 and not open(path, "rb").read().endswith(b"\n")
    with pytest.warns(MetricsWarning, match="is incomplete"):
        records = read_metrics(path)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)) and len(records) > 5
