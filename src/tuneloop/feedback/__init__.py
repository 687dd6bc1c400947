"""Production feedback -> the next training set (``tuneloop feedback export``)."""

from tuneloop.feedback.export import (
    ExportResult,
    eval_texts_for_config,
    eval_texts_from_file,
    export_feedback,
    parse_since,
)

__all__ = ["ExportResult", "eval_texts_for_config", "eval_texts_from_file", "export_feedback", "parse_since"]
