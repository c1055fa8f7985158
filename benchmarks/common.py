"""What every benchmark script shares (scripts import it as `common`: they run as
`python benchmarks/<name>.py`, which puts this folder on the path)."""

from __future__ import annotations

import json
import os


def write_json(path: str, results) -> None:
    """Writes ``results`` to ``path`` (creating its folder), as every benchmark does with its table."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
