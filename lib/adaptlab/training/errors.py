"""The training package's user error, below every training module that raises it."""

from __future__ import annotations

from adaptlab.errors import UserError


class TrainingError(UserError):
    """A training setting that cannot work (optimiser, schedule, objective, freezing, data)."""
