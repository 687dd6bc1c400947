"""Canary rollouts: anytime-valid analysis and decisions (:mod:`.analysis`), notifications (:mod:`.notify`).

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
