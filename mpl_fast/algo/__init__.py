"""The MPL algorithm in plain PyTorch: the step, feedback modes, UDA, EMA, schedules, finetuning.

Knows nothing of devices, processes or data loaders: it takes models, optimizers, batches, its
config (mpl_fast.algo.config) and, for what crosses devices or processes, the Link and
GradientSync of mpl_fast.algo.interfaces (one-process defaults here; mpl_fast.parallel
implements them for torchrun ranks). It imports nothing from parallel/, train/ or the CLI.
"""

from mpl_fast.algo.config import FEEDBACK_MODES, METHODS, PSEUDO_LABEL_KINDS, MPLConfig, OptimConfig
from mpl_fast.algo.ema import ModelEMA
from mpl_fast.algo.feedback import deterministic_forward, finite_diff, grad_dot, subtract_baseline, update_dot
from mpl_fast.algo.finetune import finetune, larger_batches
from mpl_fast.algo.guard import StepGuard
from mpl_fast.algo.interfaces import GradientSync, InProcessLink, Link, NoGradientSync
from mpl_fast.algo.losses import cross_entropy, pseudo_labels
from mpl_fast.algo.mpl import LOG_KEYS, MPL
from mpl_fast.algo.schedules import Schedules, delayed, linear_ramp, warmup_cosine
from mpl_fast.algo.uda import uda_consistency
from mpl_fast.algo.update import GradClip, StepPrecision

__all__ = ["MPL", "MPLConfig", "OptimConfig", "GradClip", "StepPrecision", "Link", "GradientSync", "InProcessLink",
           "NoGradientSync", "Schedules", "METHODS", "LOG_KEYS", "FEEDBACK_MODES", "PSEUDO_LABEL_KINDS", "ModelEMA", "StepGuard",
           "cross_entropy", "pseudo_labels", "uda_consistency", "grad_dot", "update_dot", "finite_diff", "subtract_baseline",
           "deterministic_forward", "finetune", "larger_batches", "warmup_cosine", "delayed", "linear_ramp"]
