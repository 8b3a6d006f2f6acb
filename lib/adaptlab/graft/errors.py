"""Errors of the grafting engine."""

from __future__ import annotations

from adaptlab.errors import UserError


class GraftError(UserError):
    """A bad grafting request: mismatched models, a bad sparsity, a mask of another model."""
