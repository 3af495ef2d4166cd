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
from collections.abc import Callable
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


#: ``text -> (redacted_text, count)``, e.g. :func:`memd.extract.redact.redact` (injected: this module
#: imports nothing of memd).
Redactor = Callable[[str], tuple[str, int]]


def redacting_processor(redact: Redactor) -> structlog.types.Processor:
    """A structlog processor that redacts every string value of an event (SPEC §14: logs are
    redacted; an error message may quote a command with its password). Values are short: cheap."""

    def scrub(value: object) -> object:
        if isinstance(value, str):
            return redact(value)[0] if len(value) > 7 else value
        if isinstance(value, dict):  # a structured traceback (JSON lines)
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [scrub(v) for v in value]
        return value

    def process(_logger: object, _method: str, event_dict: structlog.types.EventDict) -> structlog.types.EventDict:
        for key, value in event_dict.items():
            if isinstance(value, str | dict | list | tuple):
                event_dict[key] = scrub(value)
        return event_dict

    return process


def configure_logging(
    level: str = "info", *, stream: TextIO | None = None, json: bool | None = None, redact: Redactor | None = None
) -> None:
    """Configure structlog and the standard library logging once per process.

    Args:
        level: ``debug`` | ``info`` | ``warning`` | ``error``.
        stream: where log lines go (default ``sys.stdout``; ``memd status`` and other
            commands that print results log to ``sys.stderr``).
        json: force JSON (True) or console (False) rendering; default: :func:`wants_json`.
        redact: applied to every string value of every event (and the rendered traceback)
            before it is written; ``None`` writes values as they are.
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
    scrub: list[structlog.types.Processor] = [redacting_processor(redact)] if redact is not None else []
    if use_json:
        renderer: structlog.types.Processor = structlog.processors.JSONRenderer()
        no_locals = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        final: list[structlog.types.Processor] = [structlog.processors.ExceptionRenderer(no_locals), *scrub, renderer]
    else:
        # The traceback is rendered to text first so that it is redacted like every other value.
        final = [
            structlog.processors.format_exc_info,
            *scrub,
            structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback),
        ]

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
