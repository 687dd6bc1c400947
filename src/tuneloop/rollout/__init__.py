"""Canary rollouts: anytime-valid analysis and decisions (:mod:`.analysis`), starting and steering rollouts
whose state lives in the registry (:mod:`.controller`), the sticky traffic split (:mod:`.split`), and
notifications (:mod:`.notify`).

Reaches models only through the registry API; never imports ``pipeline``, ``stages``, ``train`` or ``cli``.
"""

from tuneloop.rollout.analysis import (
    ArmCounts,
    CanaryAnalysis,
    Decision,
    Guard,
    MetricPolicy,
    MetricStats,
    RolloutPolicy,
)

__all__ = ["ArmCounts", "CanaryAnalysis", "Decision", "Guard", "MetricPolicy", "MetricStats", "RolloutPolicy"]
