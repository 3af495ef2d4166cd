"""The usage signal: which memory pieces later sessions actually used (SPEC §18). Pure, except file reads.

Two kinds of evidence in a transcript count as a use:

* a call of memd's own MCP tools — ``mcp__memd__memory_search`` (every hit returned) and
  ``mcp__memd__memory_read`` (the file read; for MEMORY.md, every entry in the lines returned) — in a
  Codex rollout (``function_call`` + ``function_call_output``) or a Claude Code transcript
  (``tool_use`` + ``tool_result``), both parsed into :class:`~memd.rollout.records.ToolCall` /
  :class:`~memd.rollout.records.ToolOutput`; ``memory_list`` only lists and is not a use;
* a Codex ``<oai-mem-citation>`` block at the end of an assistant message (Codex CLI memories
  feature; format ``<citation_entries>`` lines ``<path>:<start>-<end>|note=[...]`` and
  ``<rollout_ids>`` lines): an absolute path inside memd's ``memory_dir`` counts for that file (for
  MEMORY.md, the entries on the cited lines), and a rollout id that names a trace of the session's
  project counts for that trace. Codex's own memory files (relative paths) do not count.

Each use becomes a :class:`~memd.store.search.UseEvent` keyed by the session and the call (or
citation), so reading a transcript again never counts a use twice. ``usage_count`` and
``last_used_at`` of a piece are aggregates over its events (:meth:`SearchIndex.usage`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from memd.rollout.records import AssistantMessage, ToolCall, ToolOutput
from memd.store.search import MEMORY_FILE, UseEvent, chunk_memory_md, entry_key

#: Tool names of memd's MCP server as both agents record them.
SEARCH_TOOL = "mcp__memd__memory_search"
READ_TOOL = "mcp__memd__memory_read"
#: Opens a Codex citation block in an assistant message.
CITATION_OPEN = "<oai-mem-citation>"

_CITATION = re.compile(r"<oai-mem-citation>(.*?)</oai-mem-citation>", re.DOTALL)
_ENTRIES = re.compile(r"<citation_entries>(.*?)</citation_entries>", re.DOTALL)
_ROLLOUT_IDS = re.compile(r"<rollout_ids>(.*?)</rollout_ids>", re.DOTALL)
_ENTRY_LINE = re.compile(r"^(?P<path>.+?):(?P<start>\d+)(?:-(?P<end>\d+))?(?:\|.*)?$")
_BULLET = re.compile(r"^\s{0,3}[-*+]\s+")


def _answer(output: str) -> dict[str, Any] | None:
    """The structured answer of a memd tool from its recorded output text (several agent encodings)."""
    text = output.strip()
    for _ in range(3):
        try:
            value = json.loads(text)
        except ValueError:
            start = text.find("{")
            if start <= 0:
                return None
            text = text[start:]
            continue
        if isinstance(value, dict):
            for key in ("structuredContent", "structured_content"):
                if isinstance(value.get(key), dict):
                    return value[key]  # type: ignore[no-any-return]
            if "project" in value:
                return value
            content = value.get("content")
            if isinstance(content, list) and content and isinstance(content[0], dict):
                text = str(content[0].get("text", ""))
                continue
            return None
        if isinstance(value, list) and value and isinstance(value[0], dict) and "text" in value[0]:
            text = str(value[0]["text"])  # Claude Code: tool_result content blocks
            continue
        return None
    return None


def _read_entries(text: str) -> list[str]:
    """Entry keys of the MEMORY.md bullets in a returned text."""
    keys = []
    current: list[str] = []
    for line in [*text.splitlines(), ""]:
        if _BULLET.match(line) or not line.strip() or line.startswith("#"):
            if current:
                key = entry_key("\n".join(current))
                if key:
                    keys.append(key)
            current = [line] if _BULLET.match(line) else []
        elif current:
            current.append(line)
    return keys


def tool_uses(items: Iterable[object], *, thread_id: str, default_ts: float) -> list[UseEvent]:
    """Uses of memd's MCP tools in one parsed transcript.

    Args:
        items: the transcript's parsed items (calls and outputs are matched by ``call_id``).
        thread_id: the session that made the calls.
        default_ts: the time of a use whose output carries no timestamp (the session's last activity).

    Returns:
        One event per hit of a search and per file (MEMORY.md: per entry) of a read; outputs that are
        errors or not memd's answer shape give nothing.
    """
    calls: dict[str, ToolCall] = {}
    events: list[UseEvent] = []
    for item in items:
        if isinstance(item, ToolCall) and item.name in (SEARCH_TOOL, READ_TOOL):
            calls[item.call_id] = item
        elif isinstance(item, ToolOutput) and item.call_id in calls:
            call = calls.pop(item.call_id)
            answer = _answer(item.output)
            if not answer or not isinstance(answer.get("project"), str):
                continue
            ts = item.ts or call.ts or default_ts
            events.extend(_events(call, answer, thread_id, ts))
    return events


def _events(call: ToolCall, answer: dict[str, Any], thread_id: str, ts: float) -> Iterator[UseEvent]:
    project = answer["project"]
    if call.name == SEARCH_TOOL:
        for number, hit in enumerate(answer.get("hits") or []):
            if isinstance(hit, dict) and isinstance(hit.get("path"), str):
                entry = hit.get("entry") if isinstance(hit.get("entry"), str) else ""
                yield UseEvent(project, hit["path"], entry or "", thread_id, f"{call.call_id}#{number}", ts)
        return
    path = answer.get("path")
    if not isinstance(path, str):
        return
    if path == MEMORY_FILE and isinstance(answer.get("text"), str):
        for key in _read_entries(answer["text"]):
            yield UseEvent(project, path, key, thread_id, f"{call.call_id}#{key}", ts)
    else:
        yield UseEvent(project, path, "", thread_id, call.call_id, ts)


def _project_of(root: Path) -> str | None:
    try:
        return (root / "PROJECT").read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def citation_uses(
    items: Iterable[object], *, thread_id: str, memory_dir: Path, project_root: Path, project: str, default_ts: float
) -> list[UseEvent]:
    """Uses cited by Codex ``<oai-mem-citation>`` blocks in assistant messages (see the module docstring).

    Args:
        items: the transcript's parsed items.
        thread_id: the session.
        memory_dir: memd's ``memory_dir`` (absolute cited paths must lie under it).
        project_root: the memory root of the session's own project (for rollout ids).
        project: that project's key.
        default_ts: the time of a use whose message has no timestamp.
    """
    base = str(memory_dir.resolve()) + "/"
    events: list[UseEvent] = []
    number = 0
    for item in items:
        if not isinstance(item, AssistantMessage) or CITATION_OPEN not in item.text:
            continue
        ts = item.ts or default_ts
        for block in _CITATION.findall(item.text):
            for entries in _ENTRIES.findall(block):
                for line in entries.splitlines():
                    cited = _cited_file(line, base)
                    if cited is None:
                        continue
                    number += 1
                    owner, root, rel, start, end = cited
                    for key in _cited_entries(root, rel, start, end):
                        events.append(UseEvent(owner, rel, key, thread_id, f"citation#{number}#{key}", ts))
            for ids in _ROLLOUT_IDS.findall(block):
                for rollout_id in ids.split():
                    for trace in _traces_of(project_root, rollout_id.strip()):
                        events.append(UseEvent(project, trace, "", thread_id, f"rollout#{rollout_id}", ts))
    return events


def _cited_file(line: str, base: str) -> tuple[str, Path, str, int, int] | None:
    """A citation entry line (``<path>:<start>-<end>|note=...``) that names a file of one of
    memd's memory folders: ``(project, memory root, relpath, first line, last line)``, else ``None``."""
    match = _ENTRY_LINE.match(line.strip())
    if not match or not match["path"].startswith("/"):
        return None
    cited = Path(match["path"])
    resolved = str(cited.resolve()) if cited.exists() else str(cited)
    if not resolved.startswith(base):
        return None
    parts = Path(resolved[len(base) :]).parts  # <hash>/memory/<rel...>
    if len(parts) < 3 or parts[1] != "memory":
        return None
    root = Path(base) / parts[0] / "memory"
    owner = _project_of(root)
    if owner is None:
        return None
    start = int(match["start"])
    return owner, root, "/".join(parts[2:]), start, int(match["end"] or start)


def _cited_entries(root: Path, rel: str, start: int, end: int) -> list[str]:
    if rel != MEMORY_FILE:
        return [""]
    try:
        text = (root / rel).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [c.entry for c in chunk_memory_md(text) if c.entry and c.line_start <= end and c.line_end >= start]


def _traces_of(root: Path, thread_id: str) -> list[str]:
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", thread_id):
        return []
    try:
        return sorted(
            f"trace_summaries/{p.name}" for p in (root / "trace_summaries").glob(f"{thread_id}_*.md") if p.is_file()
        )
    except OSError:
        return []
