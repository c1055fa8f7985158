"""Unpickling of data files (the CIFAR python batches) that cannot run code.

A pickle is a small program: its GLOBAL/STACK_GLOBAL opcodes import any callable by name and its
REDUCE opcode calls it, so ``pickle.load`` on a crafted file runs whatever the file says. The
unpickler here resolves only the names that plain data needs: the numpy array and dtype
reconstructors (both the names Python 2's numpy wrote, as in the real CIFAR files, and those of
numpy 2 pickles written by Python 3), ``bytes``/``bytearray``, and ``_codecs.encode`` limited to
latin-1 (how Python 3 writes bytes under protocol 2). Any other name, and any persistent id,
is refused with :class:`UnsafePickleError` before anything is called.
"""

from __future__ import annotations

import codecs
import pickle

_NUMPY_NAMES = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}
_BUILTIN_NAMES = {("builtins", "bytes"), ("__builtin__", "bytes"),
                  ("builtins", "bytearray"), ("__builtin__", "bytearray")}
_LATIN1_NAMES = {"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "l1"}  # compared, never looked up


class UnsafePickleError(ValueError):
    """A data pickle asked for something other than plain data (a possible code-execution payload)."""


class _PlainDataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        # latin1: Python 2 str (keys, names, raw array bytes) arrives as str with every byte kept
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return self._latin1_encode
        if (module, name) in _NUMPY_NAMES or (module, name) in _BUILTIN_NAMES:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self.path} asks to load {module}.{name}, which a data file never holds: refusing to "
            "unpickle it (only dicts, lists, strings, numbers and numpy arrays are read); replace the "
            "file with one from the original archive")

    def _latin1_encode(self, text, encoding="utf-8", errors="strict"):
        """``_codecs.encode`` as Python 3's protocol-2 pickles of bytes call it, and nothing else."""
        if not isinstance(text, str) or str(encoding).lower() not in _LATIN1_NAMES or errors != "strict":
            raise UnsafePickleError(f"{self.path} asks for _codecs.encode with {encoding!r}, which a data "
                                    "file never does: refusing to unpickle it; replace the file with one "
                                    "from the original archive")
        return codecs.encode(text, "latin-1")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.path} holds a persistent reference, which a data file never "
                                "holds: refusing to unpickle it; replace the file with one from the "
                                "original archive")


def load_plain_data(path: str):
    """The object pickled in ``path``, read without running code (see the module docstring).

    Raises UnsafePickleError (a ValueError naming ``path``) for anything but plain data; other
    damage raises what the unpickler raises."""
    with open(path, "rb") as f:
        return _PlainDataUnpickler(f, path).load()
