"""The training package's user errors, below every training module that raises them."""

from __future__ import annotations

from adaptlab.errors import UserError


class TrainingError(UserError):
    """A training setting that cannot work (optimiser, schedule, objective, freezing, data)."""


class ResumeError(UserError):
    """A run folder that cannot be resumed or reused by this config."""
