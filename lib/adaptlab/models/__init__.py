"""Model names, loading and the embedded default models.

Example::

    >>> from adaptlab.models import describe_model, load_model, load_tokenizer
    >>> model = load_model("embedded:smollm2-135m")          # doctest: +SKIP
    >>> tokenizer = load_tokenizer("embedded:smollm2-135m")  # doctest: +SKIP
    >>> describe_model("embedded:smollm2-135m")["source"]
    'embedded'
"""

from __future__ import annotations

from adaptlab.models.embedded import (
    EMBEDDED_MODELS,
    EMBEDDED_PREFIX,
    PROVENANCE_FILE,
    embedded_model_dir,
)
from adaptlab.models.errors import ModelFileError, ModelNotFoundError
from adaptlab.models.loader import (
    check_weights,
    describe_model,
    load_model,
    load_tokenizer,
    model_skeleton,
    pick_attn_implementation,
    pick_dtype,
)
from adaptlab.models.preflight import LoadOptionError, check_load
from adaptlab.models.refs import ModelRef, resolve_model

__all__ = [
    "EMBEDDED_MODELS",
    "EMBEDDED_PREFIX",
    "LoadOptionError",
    "PROVENANCE_FILE",
    "ModelFileError",
    "ModelNotFoundError",
    "ModelRef",
    "check_load",
    "check_weights",
    "describe_model",
    "embedded_model_dir",
    "load_model",
    "load_tokenizer",
    "model_skeleton",
    "pick_attn_implementation",
    "pick_dtype",
    "resolve_model",
]
