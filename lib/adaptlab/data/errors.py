"""The error data code raises for bad datasets, masks and data settings."""

from __future__ import annotations

from adaptlab.errors import UserError


class DataError(UserError):
    """A dataset, mask or data setting that adaptlab cannot use; the message says what to do."""
