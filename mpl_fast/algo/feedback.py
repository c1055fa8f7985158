"""The teacher's feedback h: how much the student's step on pseudo labels helped it on
labeled data. Positive when the student improved (paper, eq. 12 and Appendix A, with the
learning rate written once):

  grad-dot:    h = lr_S * <g_l', g_u>          g_u = grad of CE(y_hat, S(x_strong)) at theta_S,
                                               g_l' = grad of CE(y_l, S(x_l)) at theta_S'
  update-dot:  h = <g_l', theta_S - theta_S'>  the optimizer's real update (momentum, weight decay)
  finite-diff: h = CE_l(theta_S) - CE_l(theta_S')

Optionally, in any mode, a moving average b of h is subtracted: b updated first, then h <- h - b,
b kept only on applied steps (the official code does this for its only feedback, a finite
difference; --mpl.baseline auto does it for finite-diff only).

By Taylor, CE_l(theta_S') ~ CE_l(theta_S) - <g_l, theta_S - theta_S'>, so all three agree in
sign to first order (tests/algo/test_algo.py pins it: test_feedback_modes_agree_in_sign_and_value_at_small_lr).

All labeled forwards of the feedback run in ``deterministic_forward``: dropout and drop-path
off, BatchNorm normalising with the batch's own statistics but without touching its running
statistics. Old and new losses therefore differ only through theta, so at lr_S = 0 the
feedback is exactly 0 in every mode, and the feedback forwards leave no trace in the model.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mpl_fast.ops import multi_tensor_dot


@contextmanager
def deterministic_forward(model: nn.Module) -> Iterator[None]:
    """Dropout/drop-path off (eval mode), BatchNorm on batch statistics without updating its
    running statistics (train mode with tracking off); every flag is restored on exit."""
    saved = [(m, m.training) for m in model.modules()]
    tracking = [(m, m.track_running_stats) for m in model.modules() if isinstance(m, _BatchNorm)]
    model.eval()
    for m, _ in tracking:
        m.training = True
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag
        for m, flag in tracking:
            m.track_running_stats = flag


def _whole(partial: torch.Tensor) -> torch.Tensor:
    return partial


def grad_dot(lr: float, g_new_labeled: Sequence[torch.Tensor], g_unlabeled: Sequence[torch.Tensor], *,
             sum_partial: Callable[[torch.Tensor], torch.Tensor] = _whole) -> torch.Tensor:
    """h = lr_S * <g_l', g_u> (one fused pass over every tensor when the extension is built).

    ``sum_partial``: when the tensors are this rank's shards (--fsdp), sums the rank's partial
    dot product over the ranks (GradientSync.sum_partial_, mpl_fast.algo.interfaces)."""
    return sum_partial(multi_tensor_dot(g_new_labeled, g_unlabeled)) * lr


def update_dot(g_new_labeled: Sequence[torch.Tensor], params_before: Sequence[torch.Tensor],
               params_after: Sequence[torch.Tensor], *,
               sum_partial: Callable[[torch.Tensor], torch.Tensor] = _whole) -> torch.Tensor:
    """h = <g_l', -delta_theta> with delta_theta = theta_after - theta_before, the applied update
    (``sum_partial`` as for grad_dot)."""
    minus_delta = [b - a for b, a in zip(params_before, params_after)]
    return sum_partial(multi_tensor_dot(g_new_labeled, minus_delta))


def finite_diff(old_loss: torch.Tensor, new_loss: torch.Tensor) -> torch.Tensor:
    """h = CE_l(theta_S) - CE_l(theta_S'): positive when the student's step lowered the labeled loss."""
    return (old_loss - new_loss).detach().float()


def subtract_baseline(h: torch.Tensor, baseline: torch.Tensor, decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h - b', b') with b' = decay * b + (1 - decay) * h, the moving average of h (updated first,
    as the official code). A baseline centres h, so that a step that helps less than usual
    counts as a failure: the variance reduction of REINFORCE. The caller commits b' only if
    the step is applied."""
    new_baseline = decay * baseline + (1 - decay) * h.detach().float()
    return h - new_baseline, new_baseline
