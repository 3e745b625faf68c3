"""structlog setup: JSON lines when stdout is not a TTY (journald, pods), a
console renderer on a terminal. One line per lifecycle event, never per query."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(*, level: str = "info", fmt: str = "auto") -> None:
    json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )
