"""Errors a user can act on, raised out of the training engine."""

from __future__ import annotations


class TrainingError(Exception):
    """A training failure with a stable `code` (e.g. "nan_loss", "no_trainable_examples") and a message
    written for the user; the jobs layer copies both into the job's `error` object."""

    def __init__(self, code: str, message: str, *, param: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.param = param
