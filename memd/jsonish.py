"""Lenient JSON: the first JSON object in a model's answer (SPEC §6.4).

A leaf module (no memd imports): the model client (:mod:`memd.llm.client`) and the extractors use
it to read answers that wrap their JSON in fences or prose.
"""

from __future__ import annotations

import json
import re
from typing import Any

_FENCE = re.compile(r"```(?:json|JSON)?[ \t]*\n(.*?)```", re.DOTALL)


def parse_lenient_json(text: str) -> dict[str, Any] | None:
    """Parse a JSON object from a model's answer, leniently (SPEC §6.4).

    Tries, in order: the whole text as JSON; each fenced ```` ```json ```` (or bare
    ```` ``` ````) block; each balanced ``{...}`` object embedded in prose (string-aware brace
    matching), first to last.

    Args:
        text: the raw model answer.

    Returns:
        The first JSON *object* found, or ``None`` when there is none (a JSON array or scalar
        does not count).
    """
    stripped = text.strip()
    if not stripped:
        return None
    value = _try_json(stripped)
    if isinstance(value, dict):
        return value
    for m in _FENCE.finditer(text):
        value = _try_json(m.group(1).strip())
        if isinstance(value, dict):
            return value
    start = text.find("{")
    while start != -1:
        end = _balanced_end(text, start)
        if end != -1:
            value = _try_json(text[start:end])
            if isinstance(value, dict):
                return value
        start = text.find("{", start + 1)
    return None


def _try_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _balanced_end(text: str, start: int) -> int:
    """Index just past the ``}`` that closes the ``{`` at ``start``, or -1 (string-aware)."""
    depth = 0
    in_string = False
    escaped = False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return -1
