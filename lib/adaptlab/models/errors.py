"""Errors of model names and files, shared by the loader and the embedded models."""

from __future__ import annotations

from adaptlab.errors import UserError


class ModelNotFoundError(UserError):
    """A model name or path does not name a model that can be loaded here."""


class ModelFileError(UserError):
    """A model's config or weight file is damaged, or holds pickle weights not allowed."""
