"""Production feedback -> the next training set (``tuneloop feedback export``)."""

from tuneloop.feedback.export import ExportResult, eval_texts_from_file, export_feedback

__all__ = ["ExportResult", "eval_texts_from_file", "export_feedback"]
