"""Range checks shared by the privacy contracts: each raises ConfigError that names the key."""

from __future__ import annotations

import math
import re

from fedrad.core.errors import ConfigError

__all__ = ["check_count", "check_identifier", "check_positive", "check_probability"]

_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_identifier(what: str, value: str) -> None:
    """Raise ConfigError unless ``value`` is a safe study or site identifier (also a file name)."""
    if not isinstance(value, str) or not _ID_PATTERN.fullmatch(value):
        raise ConfigError(
            f"'{what}' must be 1 to 128 letters, digits, '.', '_' or '-' (starting with a letter "
            f"or digit), got {value!r}. Set '{what}' to a name such as 'chest-xray-2026'."
        )


def check_positive(key: str, value: float) -> None:
    """Raise ConfigError unless ``value`` is a positive finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"'{key}' must be a number, got {value!r}.")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"'{key}' must be a positive finite number, got {value!r}.")


def check_probability(key: str, value: float) -> None:
    """Raise ConfigError unless ``0 < value < 1`` (a delta)."""
    check_positive(key, value)
    if not value < 1:
        raise ConfigError(f"'{key}' must be below 1 (typically far below 1/N), got {value!r}.")


def check_count(key: str, value: int) -> None:
    """Raise ConfigError unless ``value`` is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"'{key}' must be a positive integer, got {value!r}.")
