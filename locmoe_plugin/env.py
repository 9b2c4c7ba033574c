"""Integer settings read from environment variables, with errors that name the variable."""

from __future__ import annotations

import os

from .config import ConfigError


def env_int(name: str, minimum: int = 0) -> int | None:
    """``int(os.environ[name])``, or None when it is unset or empty; a :class:`ConfigError` naming the
    variable when it is not an integer >= ``minimum``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ConfigError(
            f"environment variable {name}={raw!r} must be an integer >= {minimum}: fix or unset it"
        )
    return value
