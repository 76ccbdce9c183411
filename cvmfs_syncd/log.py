"""structlog set-up, done once: JSON lines when not on a TTY (journald), console on a TTY.

Standard-library loggers (boto3, apscheduler, watchdog) go through the same processors.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Configure structlog and stdlib logging for the process.

    ``fmt`` is ``json``, ``console`` or ``auto`` (console when ``stream`` is a TTY).
    """
    stream = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (
        fmt == "auto" and hasattr(stream, "isatty") and stream.isatty()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if use_console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if not use_console else _identity,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # Chatty libraries: keep their warnings, drop their per-request noise.
    for name in ("botocore", "boto3", "urllib3", "s3transfer", "apscheduler", "watchdog"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


def _identity(_logger: Any, _method: str, event: Any) -> Any:
    return event
