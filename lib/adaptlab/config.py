"""Typed configs for scripts: a dataclass, YAML presets and CLI overrides (jsonargparse).

Every script defines one dataclass config whose docstring documents each field (Google style
``Args:``), validates itself in ``__post_init__`` and is parsed with :func:`parse_config`::

    python scripts/extract_repr.py --config scripts/configs/extract_demo.yaml --num_shots 5

Later flags override the preset; an unknown key in a preset is an error naming the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

from jsonargparse import ActionConfigFile, ArgumentParser

T = TypeVar("T")


def build_parser(cls: type, description: str | None = None) -> ArgumentParser:
    """An argument parser with ``--config PRESET.yaml`` plus one flag per dataclass field."""
    parser = ArgumentParser(description=description or (cls.__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--config",
        action=ActionConfigFile,
        help="YAML preset (see scripts/configs/); flags given after it override its values.",
    )
    parser.add_class_arguments(cls)
    return parser


def parse_config(
    cls: type[T], argv: Sequence[str] | None = None, description: str | None = None
) -> T:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into an instance of dataclass ``cls``.

    Invalid values (a wrong type, an unknown key, a failed ``__post_init__`` check) end the
    program with one line naming the problem, before any heavy work starts.
    """
    parser = build_parser(cls, description)
    namespace = parser.parse_args(argv)
    try:
        namespace = parser.instantiate(namespace)  # nested dataclasses become instances
        return cls(**{f.name: namespace[f.name] for f in dataclasses.fields(cls) if f.init})
    except ValueError as err:
        parser.error(str(err))
        raise  # parser.error exits; this keeps type checkers satisfied


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a dataclass config (for manifests and result records)."""
    return dataclasses.asdict(config)
