"""Is the Hugging Face hub reachable from here? One short probe instead of minutes of retries."""

from __future__ import annotations

import os

TRUTHY = frozenset({"1", "ON", "YES", "TRUE"})


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the hub answers at all, asked once with a short timeout.

    The request goes through huggingface_hub's own session, so it takes the proxies and
    endpoint (``HF_ENDPOINT``) that downloads would take; transformers and datasets otherwise
    spend up to a minute on retries before they report an unreachable hub.
    """
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # requests or httpx, by huggingface_hub version: any failure is "no"
        return False
    return True


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for the local cache only."""
    from huggingface_hub import constants

    env = (os.environ.get(var, "").upper() for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(value in TRUTHY for value in env) or bool(constants.HF_HUB_OFFLINE)
