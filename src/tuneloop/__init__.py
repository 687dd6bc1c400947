"""tuneloop: fine-tuning as a gated, closed loop on the Hugging Face stack.

Public API::

    from tuneloop import PipelineConfig, FineTunePipeline, PipelineStage, StageResult, load_config
"""

from tuneloop.config import PipelineConfig, load_config
from tuneloop.errors import ConfigError, InputError, StageError, TuneloopError
from tuneloop.pipeline import FineTunePipeline, PipelineStage, StageResult
from tuneloop.version import __version__

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
