"""The MPL algorithm in plain PyTorch: the step, feedback modes, UDA, EMA, schedules, finetuning.

Knows nothing of devices or data loaders: it takes models, optimizers and batches.
"""

from mpl_fast.algo.ema import ModelEMA
from mpl_fast.algo.feedback import deterministic_forward, finite_diff, grad_dot, subtract_baseline, update_dot
from mpl_fast.algo.finetune import finetune, larger_batches
from mpl_fast.algo.guard import StepGuard
from mpl_fast.algo.losses import cross_entropy, pseudo_labels
from mpl_fast.algo.mpl import LOG_KEYS, MPL, Schedules
from mpl_fast.algo.schedules import delayed, linear_ramp, warmup_cosine
from mpl_fast.algo.uda import uda_consistency
from mpl_fast.algo.config import FEEDBACK_MODES, METHODS, PSEUDO_LABEL_KINDS, MPLConfig

__all__ = ["MPL", "MPLConfig", "Schedules", "METHODS", "LOG_KEYS", "FEEDBACK_MODES", "PSEUDO_LABEL_KINDS", "ModelEMA", "StepGuard",
           "cross_entropy", "pseudo_labels", "uda_consistency", "grad_dot", "update_dot", "finite_diff", "subtract_baseline",
           "deterministic_forward", "finetune", "larger_batches", "warmup_cosine", "delayed", "linear_ramp"]
