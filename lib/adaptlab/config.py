"""Typed configs for scripts: a dataclass, YAML presets and CLI overrides (jsonargparse).

Every script defines one dataclass config whose docstring documents each field (Google style
``Args:``), validates itself in ``__post_init__`` and is parsed with :func:`parse_config`::

    python scripts/extract_repr.py --config scripts/configs/extract_demo.yaml --num_shots 5

Later flags override the preset; an unknown key in a preset is an error naming the key. A bad
flag or value ends the program with one ``error: ...`` line (exit status 2), not a usage dump:

    >>> one_line_error('Parser key "num_shots":\\n  Expected a <class \\'int\\'>. Got value: abc')
    "--num_shots: expected an integer, got 'abc'"
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

T = TypeVar("T")

_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "list": "a list such as [a,b]",
    "dict": "a mapping such as {a: 1}",
    "NoneType": "null",
}


def build_parser(cls: type, description: str | None = None) -> ArgumentParser:
    """An argument parser with ``--config PRESET.yaml`` plus one flag per dataclass field.

    Abbreviated flags are refused (``--num_shot`` is not ``--num_shots``), and parse errors
    raise :class:`jsonargparse.ArgumentError` instead of printing the usage (see
    :func:`parse_config`).
    """
    parser = ArgumentParser(
        description=description or (cls.__doc__ or "").split("\n")[0],
        exit_on_error=False,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        action=ActionConfigFile,
        help="YAML preset (see scripts/configs/); flags given after it override its values.",
    )
    parser.add_class_arguments(cls)
    return parser


def _type_words(text: str) -> str:
    """``<class 'int'>`` -> ``an integer``; ``typing.Literal['a', 'b']`` -> ``one of a, b``."""
    literal = re.search(r"Literal\[(.*)\]", text)
    if literal:
        choices = [c.strip().strip("'\"") for c in literal.group(1).split(",")]
        return "one of " + ", ".join(choices)
    name = re.search(r"<class '([\w.]+)'>", text)
    key = (name.group(1) if name else text).split(".")[-1].split("[")[0]
    return _TYPE_WORDS.get(key, key)


def one_line_error(message: str, options: Sequence[str] = ()) -> str:
    """Condense a jsonargparse error message into one sentence naming the flag.

    Args:
        message: the parser's (often multi-line) message.
        options: the parser's flag names, to suggest the closest one for an unknown flag.
    """
    unknown = re.match(r"unrecognized arguments: (\S+)", message)
    if unknown:
        flag = unknown.group(1)
        close = difflib.get_close_matches(flag.split("=")[0], list(options), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"unknown option {flag}{hint}"
    not_accepted = re.match(r"Option '([^']+)' is not accepted", message)
    if not_accepted:
        key = not_accepted.group(1)
        close = difflib.get_close_matches(f"--{key}", list(options), n=1)
        hint = f" (did you mean {close[0].lstrip('-')}?)" if close else ""
        return f"unknown key {key!r} in the preset{hint}"
    if message.startswith("Problems parsing config"):
        lines = message.replace('in "<unicode string>", ', "").splitlines()[1:]
        detail = " ".join(line.strip() for line in lines if line.strip())
        return f"the preset is not valid YAML: {detail or message}"
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if key:
        flag, rest = key.group(1), key.group(2)
        if flag == "config":
            return f"--config: {rest.strip()}"
        given = re.search(r"Given value: (.*)", rest) or re.search(r"Got value: (.*)", rest)
        value = given.group(1).strip() if given else None
        subtypes = re.search(r"Subtypes: \[(.*)\]", rest)
        if subtypes:
            listed = subtypes.group(1)
            parts = re.findall(r"<class '[\w.]+'>|typing\.\w+\[[^\]]*\]|[\w.]+\[[^\]]*\]", listed)
            words = [_type_words(p) for p in dict.fromkeys(parts)] or ["another type"]
            expected = " or ".join(dict.fromkeys(words))
        else:
            expected_match = re.search(r"Expected an? (.*?)\. Got value", rest, re.S)
            expected = _type_words(expected_match.group(1)) if expected_match else rest.strip()
        got = f", got {value!r}" if value is not None else ""
        return f"--{flag}: expected {expected}{got}"
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def parse_config(
    cls: type[T], argv: Sequence[str] | None = None, description: str | None = None
) -> T:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into an instance of dataclass ``cls``.

    Invalid input (an unknown flag or preset key, a wrong type, a failed ``__post_init__``
    check) ends the program with one ``error: ...`` line on stderr naming the problem and
    pointing to ``--help``, exit status 2, before any heavy work starts.
    """
    parser = build_parser(cls, description)
    prog = Path(sys.argv[0]).name if argv is None else parser.prog
    options = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    try:
        namespace = parser.parse_args(argv)
        namespace = parser.instantiate(namespace)  # nested dataclasses become instances
        return cls(**{f.name: namespace[f.name] for f in dataclasses.fields(cls) if f.init})
    except ArgumentError as err:
        message = one_line_error(str(err), options)
        print(f"error: {message}; see {prog} --help.", file=sys.stderr)
    except ValueError as err:  # __post_init__ checks name the field themselves
        print(f"error: {one_line_error(str(err))}", file=sys.stderr)
    raise SystemExit(2)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a dataclass config (for manifests and result records)."""
    return dataclasses.asdict(config)
