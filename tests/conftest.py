import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped, visibly, on machines without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
