import os

import pytest
import torch

# The trainer redraws metrics.png at each evaluation and at its end, about a second or two of
# matplotlib each time: across the suite's many short runs that is minutes. Tests of the curves
# remove this (monkeypatch.delenv); it reaches the suite's subprocesses and torchrun ranks too.
os.environ["MPL_FAST_NO_PLOT"] = "1"


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped, visibly, on machines without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def python_without_extension():
    """Runs ``code`` in a fresh interpreter from the repo root with MPL_FAST_NO_EXTENSION=1, so
    every op takes its pure-PyTorch reference path; asserts that it exits with 0 (its stderr as
    the message) and returns what it printed."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(code: str) -> str:
        proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                              env={**os.environ, "MPL_FAST_NO_EXTENSION": "1"}, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout
    return run
