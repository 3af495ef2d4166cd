"""structlog set-up (SPEC §11).

JSON lines on stdout when stdout is not a TTY or when running under journald (``JOURNAL_STREAM``
is set); a console renderer on a TTY. Library loggers (openai, httpx, httpx2, aiosqlite,
watchfiles) go through the same pipeline at WARNING. Tracebacks are rendered without local
variables (they may hold keys).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_LIBRARY_LOGGERS = ("openai", "httpx", "httpx2", "httpcore", "aiosqlite", "watchfiles", "asyncio")


def wants_json(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """Return True when logs should be JSON lines: not a TTY, or under journald."""
    env = os.environ if environ is None else environ
    if env.get("JOURNAL_STREAM"):
        return True
    isatty = getattr(stream, "isatty", None)
    return not (isatty and isatty())


def configure_logging(level: str = "info", *, stream: TextIO | None = None, json: bool | None = None) -> None:
    """Configure structlog and the standard library logging once per process.

    Args:
        level: ``debug`` | ``info`` | ``warning`` | ``error``.
        stream: where log lines go (default ``sys.stdout``; ``memd status`` and other
            commands that print results log to ``sys.stderr``).
        json: force JSON (True) or console (False) rendering; default: :func:`wants_json`.
    """
    out = stream if stream is not None else sys.stdout
    use_json = wants_json(out) if json is None else json
    numeric = _LEVELS.get(level, logging.INFO)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if use_json:
        renderer: structlog.types.Processor = structlog.processors.JSONRenderer()
        no_locals = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        final: list[structlog.types.Processor] = [structlog.processors.ExceptionRenderer(no_locals), renderer]
    else:
        final = [structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)]

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, numeric))
