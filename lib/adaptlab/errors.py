"""User-facing errors: bad input reported as one sentence, not a traceback.

Every check of user input raises a subclass of :class:`UserError` with a message that names the
input and says what to do. Scripts wrap their ``main`` in :func:`report_user_errors`, which
prints that sentence and exits with status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(ValueError):
    """Bad input from the user (a path, a name, an option value)."""


@contextmanager
def report_user_errors() -> Iterator[None]:
    """Turn :class:`UserError` (and embedded-asset failures) into ``error: ...`` and exit 2."""
    from adaptlab.embedded import EmbeddedAssetError

    try:
        yield
    except (UserError, EmbeddedAssetError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
