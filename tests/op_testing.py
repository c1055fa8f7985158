"""``OpTester``: the checks every mpl_fast op gets, written once.

A subclass says only what differs per op: its sample inputs on a device, the public function,
its reference, the raw ``torch.ops`` overload for ``torch.library.opcheck``, and (for in-place
ops) what the call's result is. The shared tests run the public function against the reference
on every sample, opcheck the raw op (schema, fake kernel, autograd registration, AOT dispatch),
and compile the public function with ``fullgraph=True``. Devices: the CPU, and CUDA on a GPU
(tests marked ``cuda`` are skipped visibly elsewhere).
"""

from __future__ import annotations

import copy

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


class OpTester:
    """Base of the op test classes (pytest collects only the ``Test*`` subclasses)."""

    rtol, atol = 1e-6, 1e-6

    def sample_inputs(self, device: str) -> list[tuple[tuple, dict]]:
        """(args, kwargs) pairs for the public function."""
        raise NotImplementedError

    def function(self, *args, **kwargs):
        raise NotImplementedError

    def reference(self, *args, **kwargs):
        raise NotImplementedError

    def opcheck_inputs(self, device: str) -> list[tuple]:
        """(torch.ops overload, args, kwargs) triples for the raw op(s)."""
        raise NotImplementedError

    def result(self, fn, args: tuple, kwargs: dict):
        """What a call produces; in-place ops override it to return the tensors they write."""
        return fn(*args, **kwargs)

    def _run(self, fn, args, kwargs):
        return self.result(fn, copy.deepcopy(args), copy.deepcopy(kwargs))

    @pytest.mark.parametrize("device", DEVICES)
    def test_matches_reference(self, device):
        for args, kwargs in self.sample_inputs(device):
            torch.testing.assert_close(self._run(self.function, args, kwargs),
                                       self._run(self.reference, args, kwargs), rtol=self.rtol, atol=self.atol)

    @pytest.mark.parametrize("device", DEVICES)
    def test_opcheck(self, device):
        for op, args, kwargs in self.opcheck_inputs(device):
            torch.library.opcheck(op, args, kwargs)

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("backend", ["eager", "aot_eager"])
    def test_compiles_with_fullgraph(self, device, backend):
        for args, kwargs in self.sample_inputs(device):
            torch._dynamo.reset()  # one compilation per sample: samples differ in dtypes and shapes
            compiled = torch.compile(self.function, fullgraph=True, backend=backend)
            torch.testing.assert_close(self._run(compiled, args, kwargs), self._run(self.function, args, kwargs),
                                       rtol=self.rtol, atol=self.atol)
