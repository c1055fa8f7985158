"""The reduced teacher T_R: identity at initialisation, trainable away from it."""

import pytest
import torch

from mpl_fast.reduced.teacher import ReducedTeacher


def _random_distributions(b, c, seed=0, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(b, c, generator=g), 1)


@pytest.mark.parametrize("c", [10, 1000])
def test_identity_at_init(c):
    torch.manual_seed(0)
    t_r = ReducedTeacher(c, hidden=32)
    p = _random_distributions(16, c, sharp=1.5)
    assert p.min() > t_r.min_prob  # no clamping in this case: exact up to float round-off
    out = torch.softmax(t_r(p), 1)
    torch.testing.assert_close(out, p, rtol=1e-5, atol=1e-7)
    assert torch.equal(out.argmax(1), p.argmax(1))


def test_zero_probabilities_are_lifted_to_min_prob():
    t_r = ReducedTeacher(5, hidden=4, min_prob=1e-6)
    p = torch.tensor([[0.7, 0.3, 0.0, 0.0, 0.0]])
    lifted = p.clamp(min=1e-6)
    torch.testing.assert_close(torch.softmax(t_r(p), 1), lifted / lifted.sum(), rtol=1e-6, atol=0.0)
    assert torch.isfinite(t_r(p)).all()


def test_moves_away_from_identity_when_trained():
    """The zero-initialised layer gets a gradient at step 0; after a few steps toward another
    target the output distribution is no longer the input's."""
    torch.manual_seed(0)
    t_r = ReducedTeacher(10, hidden=16)
    opt = torch.optim.SGD(t_r.parameters(), lr=0.5)
    p = _random_distributions(32, 10, seed=1)
    target = (p.argmax(1) + 1) % 10
    first = None
    for step in range(20):
        loss = torch.nn.functional.cross_entropy(t_r(p), target)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert t_r.out.weight.grad.abs().sum() > 0 and t_r.hidden.weight.grad.abs().sum() == 0
            first = loss.item()
        opt.step()
    assert loss.item() < first
    assert t_r.hidden.weight.grad.abs().sum() > 0  # the hidden layer learns once the output layer is non-zero
    t_r.reset_to_identity()
    torch.testing.assert_close(torch.softmax(t_r(p), 1), p, rtol=1e-5, atol=1e-7)


def test_bad_input_shape_is_one_sentence():
    t_r = ReducedTeacher(10)
    with pytest.raises(ValueError, match=r"takes \(batch, 10\) distributions, got shape \(4, 7\)"):
        t_r(torch.rand(4, 7))
    with pytest.raises(ValueError, match="min_prob"):
        ReducedTeacher(10, min_prob=0.5)
