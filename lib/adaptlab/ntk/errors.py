"""Errors of the eNTK engine."""

from __future__ import annotations

from adaptlab.errors import UserError


class KernelError(UserError):
    """A bad kernel request: an unknown formula, an empty parameter subset, a head mismatch."""
