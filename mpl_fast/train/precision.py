"""Mixed precision policy: which autocast dtype, and whether fp16 loss scaling is needed.

bf16 runs on CPUs (fast with AMX) and GPUs without loss scaling; fp16 needs a GradScaler and
only makes sense on a GPU: on a CPU it is several times slower than fp32 (benchmarks/RESULTS.md,
bench_amp_fp16), so it is refused there.
"""

from __future__ import annotations

import contextlib
import typing
from dataclasses import dataclass
from typing import Literal

import torch

AmpDtype = Literal["bf16", "fp16"]
AMP_DTYPES: tuple[str, ...] = typing.get_args(AmpDtype)


@dataclass(frozen=True)
class PrecisionPolicy:
    enabled: bool
    dtype: torch.dtype | None
    device_type: str

    @property
    def needs_loss_scaling(self) -> bool:
        return self.enabled and self.dtype == torch.float16

    def autocast(self):
        """A context that runs the forward passes in this policy's precision (or does nothing)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def _student_dtype(self, device: torch.device | str, enabled: bool) -> torch.dtype | None:
        # fp16 only on the policy's own device type: a CPU student beside a GPU teacher stays
        # fp32 (fp16 is refused on CPUs for speed), as does every student when disabled.
        if not (enabled and self.enabled):
            return None
        if self.dtype == torch.float16 and torch.device(device).type != self.device_type:
            return None
        return self.dtype

    def student_autocast(self, device: torch.device | str, enabled: bool = True):
        """The context for the student's forward on the unlabeled batch on ``device``: this
        policy's autocast (bf16, or fp16 with the student's own loss scaler from
        ``student_grad_scaler``), or nothing (fp32) when disabled or without --amp."""
        dtype = self._student_dtype(device, enabled)
        if dtype is None:
            return contextlib.nullcontext
        device_type = torch.device(device).type
        return lambda: torch.autocast(device_type=device_type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is a no-op unless fp16 needs one."""
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_loss_scaling)

    def student_grad_scaler(self, device: torch.device | str, enabled: bool = True) -> torch.amp.GradScaler | None:
        """The student's own loss scaler where ``student_autocast(device, enabled)`` is fp16, else None."""
        if self._student_dtype(device, enabled) != torch.float16:
            return None
        return self.grad_scaler()


def resolve_precision(amp: bool, amp_dtype: str | None, device: torch.device | str, *,
                      allow_cpu_fp16: bool = False) -> PrecisionPolicy:
    """The policy for ``--amp`` [``--amp-dtype``] on ``device``; bad combinations raise ValueError.

    ``allow_cpu_fp16`` lifts the CPU fp16 refusal: for tests of the fp16 path on a machine
    without a GPU, never for real runs."""
    device = torch.device(device)
    if not amp:
        if amp_dtype is not None:
            raise ValueError(f"--amp-dtype {amp_dtype} given without --amp")
        return PrecisionPolicy(enabled=False, dtype=None, device_type=device.type)
    if amp_dtype is None:
        amp_dtype = "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    if amp_dtype not in AMP_DTYPES:
        raise ValueError(f"--amp-dtype must be one of {AMP_DTYPES}, got {amp_dtype!r}")
    if device.type == "cpu" and amp_dtype == "fp16" and not allow_cpu_fp16:
        raise ValueError("--amp-dtype fp16 is refused on the CPU (several times slower than fp32 there); "
                         "use --amp-dtype bf16, or run on a GPU")
    dtype = torch.bfloat16 if amp_dtype == "bf16" else torch.float16
    return PrecisionPolicy(enabled=True, dtype=dtype, device_type=device.type)
