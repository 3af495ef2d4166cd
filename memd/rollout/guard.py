"""Feedback-loop guard: memd's own injected context is never learned back (SPEC §18). Pure, no I/O.

``memd context`` wraps everything it gives an agent in one sentinel block::

    <memd-context project="/home/me/app" generated="2026-11-29T07:00:00Z">
    ...memory...
    </memd-context>

The agents record that block in their transcripts: Codex as a developer message (the SessionStart
hook's ``additionalContext``), Claude Code as an ``attachment`` of type ``hook_additional_context``;
a user may also paste it, or a tool may print it (``memd context`` run in a shell). Both transcript
adapters (Codex and Claude Code) pass every text they keep — user and developer messages, tool
outputs, hook attachments, compaction summaries — through :func:`strip_memd_context` before they
count user messages and before input building, so a later session never re-learns the memory it
was given, and a session whose only user text was injected memory has no real user message.
"""

from __future__ import annotations

import re

#: The sentinel element name; the opening tag may carry attributes (``<memd-context project="...">``).
MEMD_CONTEXT_TAG = "memd-context"
#: Opening marker as it appears in text (a cheap ``in`` test before any regex work).
MEMD_CONTEXT_OPEN = "<" + MEMD_CONTEXT_TAG
#: Closing marker.
MEMD_CONTEXT_CLOSE = "</" + MEMD_CONTEXT_TAG + ">"

# An opening tag is ``<memd-context`` followed by ``>``, whitespace or ``/`` (so ``<memd-contextual>``
# is not one). A block runs to the first closing tag; an unclosed block runs to the end of the text
# (a transcript cut mid-block, or a tool output truncated by head+tail capping, still loses it all).
_BLOCK = re.compile(
    r"[ \t]*<memd-context(?=[\s>/]|\Z)[^>]*(?:>|\Z).*?(?:</memd-context>[ \t]*\n?|\Z)",
    re.DOTALL,
)
_STRAY_CLOSE = re.compile(r"[ \t]*</memd-context>[ \t]*\n?")


def has_memd_context(text: str) -> bool:
    """Whether ``text`` holds (the start of) a memd context block: one substring search, O(len).

    memd writes the tag in lower case; the check is case-sensitive so that it stays a plain search.
    """
    return MEMD_CONTEXT_OPEN in text


def strip_memd_context(text: str) -> str:
    """Remove every ``<memd-context ...>...</memd-context>`` block from ``text``.

    Args:
        text: any transcript text (user, developer or assistant message, tool output, attachment).

    Returns:
        The text without the blocks (and without stray closing tags). Text without a block is
        returned unchanged (the same object: the common case costs one substring search). When
        blocks were removed, the result is stripped of leading/trailing blank space, so a message
        that held only injected memory becomes ``""`` — which callers treat as "no user text".
    """
    if not has_memd_context(text):
        if MEMD_CONTEXT_CLOSE in text:
            return _STRAY_CLOSE.sub("", text).strip()
        return text
    stripped = _BLOCK.sub("", text)
    stripped = _STRAY_CLOSE.sub("", stripped)
    return stripped.strip()


def is_only_memd_context(text: str) -> bool:
    """Whether ``text`` holds memd context blocks and nothing else (blank space aside)."""
    return has_memd_context(text) and not strip_memd_context(text)
