"""Values written with a unit: sizes ("256MiB"), durations ("7d") and commands."""

from __future__ import annotations

import re
import shlex

_SIZE_UNITS = {"B": 1, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_size(value: object) -> int:
    """Given ``"256MiB"`` or an int number of bytes, return bytes. Raise ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '256MiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("expected a size such as '256MiB'")
    match = _SIZE_RE.match(value)
    unit = match.group(2).upper() if match else ""
    if not match or (unit or "B") not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size (use B, KiB, MiB, GiB, e.g. '256MiB')")
    return int(float(match.group(1)) * _SIZE_UNITS[unit or "B"])


def parse_duration(value: object) -> float:
    """Given ``"7d"``/``"90s"`` or a number of seconds, return seconds. Raise ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30s' or '7d'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("expected a duration such as '30s' or '7d'")
    match = _DURATION_RE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a duration (use s, m, h, d, e.g. '7d')")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def parse_command(value: object) -> tuple[str, ...]:
    """Given a shell-like command string or a list of strings, return argv. Raise ValueError."""
    if isinstance(value, str):
        argv = tuple(shlex.split(value))
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        argv = tuple(value)
    else:
        raise ValueError("expected a command string or list of strings")
    if not argv:
        raise ValueError("must not be empty")
    return argv
