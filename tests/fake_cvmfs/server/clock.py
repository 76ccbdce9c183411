"""The fake's clock (``ROOT/fake-clock``) and the date formats it reads and writes (UTC)."""

from __future__ import annotations

import re
import time
from pathlib import Path


def utc_seconds(parts: time.struct_time) -> float:
    """Inverse of ``time.gmtime`` (seconds since the epoch of a UTC calendar time)."""
    return utc_from_fields(
        parts.tm_year, parts.tm_mon, parts.tm_mday, parts.tm_hour, parts.tm_min, parts.tm_sec
    )


def utc_from_fields(year: int, month: int, mday: int, hour: int, minute: int, sec: int) -> float:
    """Seconds since the epoch of a UTC calendar date and time."""
    shifted = year - (month <= 2)
    era = shifted // 400
    year_of_era = shifted - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + mday - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    days = era * 146097 + day_of_era - 719468
    return float(days * 86400 + hour * 3600 + minute * 60 + sec)


def utc(fmt: str, timestamp: float) -> str:
    """Format a UNIX timestamp as UTC with a ``strftime`` format."""
    return time.strftime(fmt, time.gmtime(timestamp))


def fake_now(root: Path) -> float:
    """Return "now" for the fake: ``ROOT/fake-clock`` (timestamp or ``+/-offset``) or the clock."""
    try:
        text = (root / "fake-clock").read_text().strip()
    except FileNotFoundError:
        return time.time()
    if not text:
        return time.time()
    if text[0] in "+-":
        return time.time() + float(text)
    return float(text)


TIMESPAN_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 604800}


def parse_timespan(text: str) -> float | None:
    """Parse ``N <unit>(s) ago`` (the form ``CVMFS_AUTO_TAG_TIMESPAN`` usually takes)."""
    match = re.match(r"^\s*(\d+)\s*(second|minute|hour|day|week)s?(\s+ago)?\s*$", text)
    if match is None:
        return None
    return int(match.group(1)) * TIMESPAN_UNITS[match.group(2)]


def parse_gc_time(text: str, now: float) -> float | None:
    """Parse ``gc -t`` like ``date -d``: ``@SECONDS``, ``YYYY-MM-DD[ HH:MM[:SS]]`` (UTC)
    or ``N units ago``."""
    if re.fullmatch(r"@-?\d+(\.\d+)?|\d{9,}", text):
        return float(text.lstrip("@"))
    for fmt in (
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%d",
        "%Y-%m-%dT%H:%M:%S",
        "%Y/%m/%d %H:%M:%S",
    ):
        try:
            return utc_seconds(time.strptime(text, fmt))
        except ValueError:
            continue
    span = parse_timespan(text)
    return None if span is None else now - span
