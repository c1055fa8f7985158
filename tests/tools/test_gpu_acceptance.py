"""benchmarks/gpu_acceptance.py --dry-run: every stage of the GPU acceptance run, on the CPU at toy
sizes, so the script cannot rot before a GPU runs it."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_covers_every_stage(tmp_path):
    out = tmp_path / "acceptance.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_acceptance.py", "--dry-run", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and not result["failed"]
    items = {(r["stage"], r["item"]) for r in result["rows"]}
    for expected in [("build", "plan"), ("tests", "cuda tests collected"), ("kernels", "multi_tensor_dot fp32 ms"),
                     ("kernels", "fused_sgd_ fp32 ms"), ("kernels", "rand_augment 8x3x32x32 ms"),
                     ("kernels", "torchvision RandAugment ms"), ("kernels", "DALI rand_augment ms"),
                     ("trainer", "steps")]:
        assert expected in items, expected
    assert "stage / item" in proc.stdout  # the table


def test_without_a_gpu_the_real_run_says_so():
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, "benchmarks/gpu_acceptance.py", "--skip-build"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr and "Traceback" not in proc.stderr
