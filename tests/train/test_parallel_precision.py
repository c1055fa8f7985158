import pytest
import torch

from mpl_fast.train.precision import resolve_precision


def test_default_on_cpu_is_bf16_without_scaling():
    policy = resolve_precision(True, None, "cpu")
    assert policy.dtype == torch.bfloat16 and not policy.needs_loss_scaling
    with policy.autocast():
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
    assert not policy.grad_scaler().is_enabled()


def test_disabled_policy_changes_nothing():
    policy = resolve_precision(False, None, "cpu")
    with policy.autocast():
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.float32


@pytest.mark.parametrize("amp,dtype,match", [
    (True, "fp16", "refused on the CPU"),
    (True, "fp8", "must be one of"),
    (False, "bf16", "without --amp"),
])
def test_bad_precision_choices(amp, dtype, match):
    with pytest.raises(ValueError, match=match):
        resolve_precision(amp, dtype, "cpu")


@pytest.mark.cuda
def test_fp16_on_cuda_scales_losses():
    policy = resolve_precision(True, "fp16", "cuda")
    assert policy.needs_loss_scaling and policy.grad_scaler().is_enabled()


def test_fp16_student_only_on_the_policys_device_type():
    """A CPU student beside an fp16 GPU teacher stays fp32 and has no loss scaler (no GPU needed
    to build the policy)."""
    from mpl_fast.train.precision import PrecisionPolicy

    gpu_fp16 = PrecisionPolicy(enabled=True, dtype=torch.float16, device_type="cuda")
    with gpu_fp16.student_autocast("cpu")():
        assert not torch.is_autocast_enabled("cpu")
    assert gpu_fp16.student_grad_scaler("cpu") is None
    with pytest.warns(UserWarning):  # (GradScaler("cuda") disables itself without a GPU)
        assert gpu_fp16.student_grad_scaler("cuda:1") is not None
