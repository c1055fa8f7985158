"""mpl_fast: Meta Pseudo Labels (Pham et al., CVPR 2021) as a fast PyTorch package."""

__version__ = "0.1.0"

from mpl_fast import ops  # noqa: E402  (loads the extension, or warns and falls back)

__all__ = ["ops", "load", "__version__"]


def __getattr__(name: str):
    # mpl_fast.load reads run folders (mpl_fast.runs): imported on first use, so that
    # `import mpl_fast` does not pay for the model and data modules.
    if name == "load":
        from mpl_fast.runs import load  # noqa: PLC0415
        return load
    raise AttributeError(f"module 'mpl_fast' has no attribute {name!r}")
