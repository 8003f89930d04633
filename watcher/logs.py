"""structlog, configured once at the entry point: console on a terminal, JSON otherwise.

Logs go to stdout so that systemd/journald take them as they are. A last processor removes
the API key from every value, should any code path ever try to log it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_secrets: set[str] = set()


def redact(secret: str) -> None:
    """Never let ``secret`` reach a log line, whatever the caller passes in."""
    if secret:
        _secrets.add(secret)


def _scrub(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if _secrets:
        for key, value in event.items():
            if isinstance(value, str) and any(s in value for s in _secrets):
                for secret in _secrets:
                    value = value.replace(secret, "***")
                event[key] = value
    return event


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if console
        else structlog.processors.JSONRenderer()
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _scrub,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # Libraries (watchdog, aiohttp) log through the standard library: warnings and up only.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, force=True)
