"""tuneloop: fine-tuning as a gated, closed loop on the Hugging Face stack.

Public API::

    from tuneloop import PipelineConfig, FineTunePipeline, PipelineStage, StageResult, load_config
"""

import os as _os

# OpenMP threads that wait by spinning burn whole time slices when the CPUs are shared (CI runners, laptops):
# measured here, a small training loop took 70 s instead of 4 s next to two other busy processes. Waiting
# threads sleep instead, unless the user chose otherwise. This must happen before torch loads OpenMP, so it is
# the first thing the package does (torch imported earlier by the caller keeps its own setting).
# benchmarks/training_contention.py measures it.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tuneloop.config import PipelineConfig, load_config  # noqa: E402 PipelineConfig, load_config
from tuneloop.errors import ConfigError, InputError, StageError, TuneloopError  # noqa: E402
from tuneloop.pipeline import FineTunePipeline, PipelineStage, StageResult  # noqa: E402
from tuneloop.version import __version__  # noqa: E402

__all__ = [
    "ConfigError",
    "FineTunePipeline",
    "InputError",
    "PipelineConfig",
    "PipelineStage",
    "StageError",
    "StageResult",
    "TuneloopError",
    "__version__",
    "load_config",
]
