"""The benchmark scripts start (their imports follow the package's layout), and accuracy.py's
probe variants, reuse of finished runs and plot work on a few digits steps."""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The scripts (not the helper modules they import, such as common.py).
SCRIPTS = sorted(p for p in glob.glob(os.path.join(ROOT, "benchmarks", "*.py")) if "__main__" in open(p).read())


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_every_benchmark_starts(script):
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower()


def test_accuracy_probe_variants_reuse_and_plot(tmp_path):
    out, result, png = tmp_path / "runs", tmp_path / "acc.json", tmp_path / "acc.png"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "accuracy.py"), "--datasets", "digits", "--methods",
           "supervised", "uda-h0", "--seeds", "0", "--steps", "4", "--out", str(out), "--json", str(result),
           "--plot", str(png)]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    data = json.loads(result.read_text())
    assert {r["variant"] for r in data["runs"]} == {"supervised", "uda-h0"} and png.stat().st_size > 0
    with open(out / "digits-uda-h0-0" / "config.json") as f:
        assert json.load(f)["mpl"]["mpl_weight"] == 0.0      # the probe's change reached the run
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("reused") == 2, again.stdout
    assert json.loads(result.read_text())["table"] == data["table"]
