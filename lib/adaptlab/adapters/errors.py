"""The error every adapter module raises for a setting, model or folder it cannot use."""

from __future__ import annotations

from adaptlab.errors import UserError


class AdapterError(UserError):
    """An adapter setting, model or saved folder the adapters cannot work with."""
