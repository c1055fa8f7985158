"""The algorithm's own settings: which method, which feedback, which pseudo labels, and the
numbers of the MPL step (mpl_fast.algo.MPL takes them; the trainer's config tree holds them)."""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("mpl", "uda", "pseudo-labels", "supervised")
FEEDBACK_MODES = ("grad-dot", "update-dot", "finite-diff")
PSEUDO_LABEL_KINDS = ("hard", "soft", "sample")


@dataclass
class MPLConfig:
    """The MPL step: pseudo labels, feedback h, UDA on the teacher, label smoothing."""

    feedback: str = "grad-dot"      # one of FEEDBACK_MODES
    pseudo_labels: str = "hard"     # one of PSEUDO_LABEL_KINDS (same label for student and MPL term)
    soft_temperature: float = 0.5   # soft pseudo labels = softmax(T(x_strong) / soft_temperature)
    baseline: str = "auto"          # subtract a moving average of h: "on" | "off" | "auto" (finite-diff only)
    baseline_decay: float = 0.99    # decay of that moving average
    mpl_weight: float = 1.0         # multiplies the MPL term h * CE(y_hat, T(x_strong))
    sup_weight: float = 1.0         # multiplies the teacher's supervised CE (0: feedback-only teacher)
    uda_weight: float = 8.0         # 0 disables UDA consistency on the teacher
    uda_ramp_steps: int = 5000      # linear ramp of the UDA weight
    uda_temperature: float = 0.7
    uda_threshold: float = 0.6
    label_smoothing: float = 0.15   # on the teacher's supervised CE
    student_wait_steps: int = 3000  # the student (and so h) starts after this many steps
    ema_decay: float = 0.995        # student EMA (0 disables)
