"""User-facing errors: bad input reported as one sentence, not a traceback.

Every check of user input raises a subclass of :class:`UserError` with a message that names the
input and says what to do. Scripts wrap their ``main`` in :func:`report_user_errors`, which
prints that sentence and exits with status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class UserError(ValueError):
    """Bad input from the user (a path, a name, an option value)."""


class EmbeddedAssetError(RuntimeError):
    """An embedded asset could not be fetched or failed its integrity check."""


_ON_ERROR: list[Callable[[], None]] = []


def on_user_error(cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` when :func:`report_user_errors` ends a run (``rundir`` releases its
    locks this way, so this module imports none of the modules that use it)."""
    if cleanup not in _ON_ERROR:
        _ON_ERROR.append(cleanup)


@contextmanager
def report_user_errors() -> Iterator[None]:
    """Turn :class:`UserError` (and embedded-asset failures) into ``error: ...`` and exit 2.

    The run ends there, so the output-folder locks it holds are released at once (a folder a
    lock created and nothing was written to is removed), also when ``main`` was called from a
    notebook or a test rather than as a program.
    """
    try:
        yield
    except (UserError, EmbeddedAssetError) as err:
        for cleanup in _ON_ERROR:
            cleanup()
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
