"""Streaming validation of JSONL training files: the same rules for upload, the CLI and the worker."""

from app.datasets.report import ValidationReport
from app.datasets.validator import StreamingValidator, validate_path

__all__ = ["StreamingValidator", "ValidationReport", "validate_path"]
