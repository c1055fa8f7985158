"""mpl_fast: Meta Pseudo Labels (Pham et al., CVPR 2021) as a fast PyTorch package."""

__version__ = "0.1.0"

from mpl_fast import ops  # noqa: E402  (loads the extension, or warns and falls back)

__all__ = ["ops", "__version__"]
