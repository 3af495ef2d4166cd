"""``memd mcp``: a read-only stdio MCP server over a project's memory (SPEC §18).

Built on the official ``mcp`` SDK, 2.x (``from mcp.server.mcpserver import MCPServer``; the 1.x
``FastMCP`` import no longer exists). Three tools, each annotated ``readOnlyHint: true`` (Codex runs
such a tool without an approval prompt) and each with an output schema (the pydantic models below):

* ``memory_search(query, project?, kinds?, limit=5, cursor?)`` — full-text search (bm25) over the
  project's MEMORY.md entries, skills and trace memories; at most about 1,500 tokens of hits;
* ``memory_read(path, project?, line_offset=1, max_lines=200)`` — one memory file, paged, at most about
  4,000 tokens; ``path`` is relative to the project's memory root and confined to it;
* ``memory_list(project?, path?)`` — the files of the memory root (or of one folder in it).

Resources: ``memd://summary`` (memory_summary.md) and ``memd://memory`` (MEMORY.md) of the server's
default project. The project is the ``project`` argument (a path, resolved as SPEC §4), else
``CLAUDE_PROJECT_DIR``, else the server's cwd. No memory is a clear answer (``note``), never a guess
at another project. Every text returned is redacted (SPEC §14). Logs go to stderr: stdout is the
protocol.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field

from memd import __version__
from memd.extract.redact import redact
from memd.read.context import ContextSettings, memory_root_of, resolve_project
from memd.store.search import ChunkKind, SearchIndex, memory_files

#: Byte caps of one answer (about 1,500 and 4,000 tokens at 4 bytes a token).
SEARCH_MAX_BYTES = 6_000
READ_MAX_BYTES = 16_000
MAX_LIMIT = 20
MAX_LINES = 400

INSTRUCTIONS = (
    "memd keeps a memory of earlier coding sessions in this project (Codex CLI and Claude Code): a handbook "
    "(MEMORY.md: how to build and test, user preferences, pitfalls, recent tasks), skills (skills/<name>/SKILL.md) "
    "and one trace memory per past session (trace_summaries/). Use memory_search to find what earlier sessions "
    "learned about a file, command, error or decision; memory_read to read a file it points to. The memory is "
    "guidance, not truth: the repository and the user win."
)

Kind = Literal["memory", "skill", "trace"]


class Hit(BaseModel):
    """One search hit."""

    path: str = Field(description="file relative to the memory root; pass it to memory_read")
    line_start: int = Field(description="first line of the hit in that file (1-based)")
    line_end: int = Field(description="last line of the hit (inclusive)")
    kind: Kind
    heading: str = Field(description="section heading (MEMORY.md section, trace task, skill name)")
    snippet: str
    entry: str = Field(default="", description="stable key of a MEMORY.md entry")
    session_ids: list[str] = Field(default_factory=list, description="sessions the hit comes from or cites")
    date: str | None = Field(default=None, description="date of the hit (YYYY-MM-DD)")


class SearchResult(BaseModel):
    """Answer of ``memory_search``."""

    project: str
    memory_root: str
    hits: list[Hit]
    next_cursor: str | None = Field(default=None, description="pass as cursor for more hits")
    note: str | None = None


class ReadResult(BaseModel):
    """Answer of ``memory_read``."""

    project: str
    path: str
    line_offset: int
    lines_returned: int
    total_lines: int
    text: str
    truncated: bool
    next_offset: int | None = Field(default=None, description="pass as line_offset to read on")


class ListEntry(BaseModel):
    """One file of the memory root."""

    path: str
    kind: str
    size_bytes: int
    modified: str


class ListResult(BaseModel):
    """Answer of ``memory_list``."""

    project: str
    memory_root: str
    files: list[ListEntry]
    note: str | None = None


def _log(message: str) -> None:
    print(f"memd mcp: {message}", file=sys.stderr, flush=True)


def _date(ts_s: float) -> str | None:
    import time

    return time.strftime("%Y-%m-%d", time.gmtime(ts_s)) if ts_s > 0 else None


class MemoryReader:
    """What the tools do, without the protocol (tested directly and through the SDK's client).

    Args:
        settings: the read-path settings (memory and state directories).
        environ: the environment (for ``CLAUDE_PROJECT_DIR``); default ``os.environ``.
        cwd: the server's working directory; default ``os.getcwd()`` at each call.
    """

    def __init__(
        self, settings: ContextSettings, *, environ: Mapping[str, str] | None = None, cwd: str | None = None
    ) -> None:
        self._settings = settings
        self._environ = os.environ if environ is None else environ
        self._cwd = cwd
        self._index: SearchIndex | None = None

    # -- project and paths

    def project(self, project: str | None) -> tuple[str, Path]:
        """The project key and memory root for a ``project`` argument (see the module docstring)."""
        where = (project or "").strip() or self._environ.get("CLAUDE_PROJECT_DIR", "").strip()
        if not where:
            where = self._cwd or os.getcwd()
        key = resolve_project(where, self._settings.project_key_rule)
        return key, memory_root_of(self._settings.memory_dir, key)

    @staticmethod
    def confine(root: Path, relpath: str) -> Path:
        """Resolve ``relpath`` inside ``root``; refuse absolute paths, ``..`` and symlinks that leave it.

        Raises:
            ToolError: the path is outside the memory root.
        """
        rel = relpath.strip().replace("\\", "/")
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if not rel or rel.startswith("/") or ".." in parts or "\x00" in rel:
            raise ToolError(f"path must be relative to the memory root and stay inside it: {relpath!r}")
        target = root.joinpath(*parts)
        real_root = os.path.realpath(root)
        real = os.path.realpath(target)
        if real != real_root and not real.startswith(real_root + os.sep):
            raise ToolError(f"path leaves the memory root: {relpath!r}")
        return target

    def _search_index(self) -> SearchIndex:
        if self._index is None:
            try:
                self._index = SearchIndex.open(self._settings.db_path, is_clean=_is_clean)
            except sqlite3.Error as exc:
                _log(f"state database not usable for search ({exc}); indexing in memory")
            if self._index is None:
                self._index = SearchIndex.scratch(is_clean=_is_clean)
        return self._index

    # -- tools

    def search(
        self,
        query: str,
        project: str | None = None,
        kinds: list[Kind] | None = None,
        limit: int = 5,
        cursor: str | None = None,
    ) -> SearchResult:
        """``memory_search`` (see the module docstring). Raises ToolError for a bad cursor."""
        key, root = self.project(project)
        offset = _offset(cursor)
        if not root.is_dir():
            return SearchResult(project=key, memory_root=str(root), hits=[], note=_no_memory(key))
        index = self._search_index()
        try:
            index.refresh(key, root)
        except sqlite3.Error as exc:  # locked past the timeout: serve what the index has
            _log(f"index refresh failed ({exc}); results may be stale")
        limit = max(1, min(MAX_LIMIT, limit))
        snippet_chars = max(160, (SEARCH_MAX_BYTES - 600) // limit)
        found = index.search(
            key,
            query,
            kinds=[ChunkKind(k) for k in kinds] if kinds else None,
            limit=limit + 1,
            offset=offset,
            snippet_chars=snippet_chars,
        )
        hits: list[Hit] = []
        used = 0
        for item in found[:limit]:
            hit = Hit(
                path=item.chunk.path,
                line_start=item.chunk.line_start,
                line_end=item.chunk.line_end,
                kind=item.chunk.kind.value,
                heading=redact(item.chunk.heading)[0],
                snippet=redact(item.snippet)[0],
                entry=item.chunk.entry,
                session_ids=list(item.chunk.session_ids),
                date=_date(item.chunk.date_s),
            )
            size = len(hit.model_dump_json())
            if hits and used + size > SEARCH_MAX_BYTES:
                break
            hits.append(hit)
            used += size
        more = len(hits) < len(found)
        note = None
        if not hits:
            note = "no match" if query.strip() else "empty query"
            if not any(ch.isalnum() for ch in query):
                note = "the query holds no searchable word"
        return SearchResult(
            project=key,
            memory_root=str(root),
            hits=hits,
            next_cursor=str(offset + len(hits)) if more else None,
            note=note,
        )

    def read(self, path: str, project: str | None = None, line_offset: int = 1, max_lines: int = 200) -> ReadResult:
        """``memory_read``. Raises ToolError for a path outside the root or a missing file."""
        key, root = self.project(project)
        if not root.is_dir():
            raise ToolError(_no_memory(key))
        target = self.confine(root, path)
        try:
            with open(target, "rb") as handle:
                data = handle.read(4 * 1024 * 1024)
        except IsADirectoryError:
            raise ToolError(f"{path} is a folder; use memory_list to see its files") from None
        except OSError as exc:
            raise ToolError(f"cannot read {path} in the memory of {key}: {exc.strerror or exc}") from None
        lines = data.decode("utf-8", "replace").splitlines()
        start = max(1, line_offset)
        count = max(1, min(MAX_LINES, max_lines))
        chosen: list[str] = []
        used = 0
        for line in lines[start - 1 : start - 1 + count]:
            size = len(line.encode("utf-8")) + 1
            if chosen and used + size > READ_MAX_BYTES:
                break
            chosen.append(line if size <= READ_MAX_BYTES else line[: READ_MAX_BYTES // 4] + " …")
            used += size
        end = start - 1 + len(chosen)
        truncated = end < len(lines)
        return ReadResult(
            project=key,
            path=path,
            line_offset=start,
            lines_returned=len(chosen),
            total_lines=len(lines),
            text=redact("\n".join(chosen))[0],
            truncated=truncated,
            next_offset=end + 1 if truncated else None,
        )

    def list(self, project: str | None = None, path: str | None = None) -> ListResult:
        """``memory_list``. Raises ToolError for a path outside the root."""
        import time

        key, root = self.project(project)
        if not root.is_dir():
            return ListResult(project=key, memory_root=str(root), files=[], note=_no_memory(key))
        prefix = ""
        if path and path.strip() not in ("", ".", "/"):
            self.confine(root, path)
            prefix = path.strip().strip("/") + "/"
        files = []
        stats = memory_files(root)
        for rel, st in sorted(stats.items()):
            if prefix and not rel.startswith(prefix):
                continue
            kind = "trace" if rel.startswith("trace_summaries/") else "skill" if rel.startswith("skills/") else "memory"
            modified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime))
            files.append(ListEntry(path=rel, kind=kind, size_bytes=st.st_size, modified=modified))
        note = None if files else "no memory files here"
        return ListResult(project=key, memory_root=str(root), files=files, note=note)

    def resource(self, name: str) -> str:
        """The text of ``memory_summary.md`` or ``MEMORY.md`` of the default project (ResourceError if absent)."""
        key, root = self.project(None)
        try:
            return redact((root / name).read_text(encoding="utf-8", errors="replace"))[0]
        except OSError:
            raise ResourceError(f"{name}: {_no_memory(key)}") from None


def _is_clean(text: str) -> bool:
    return redact(text)[1] == 0


def _offset(cursor: str | None) -> int:
    if cursor is None or cursor == "":
        return 0
    if not cursor.isdigit() or len(cursor) > 9:
        raise ToolError(f"invalid cursor {cursor!r}: pass the next_cursor of an earlier answer")
    return int(cursor)


def _no_memory(project: str) -> str:
    return (
        f"memd has no memory for the project {project} yet (memory is written after sessions in this project "
        "end and have been idle for a while)"
    )


def build_server(reader: MemoryReader) -> MCPServer:
    """The MCP server: three read-only tools and two resources over ``reader``."""
    server: MCPServer = MCPServer("memd", instructions=INSTRUCTIONS, version=__version__, log_level="WARNING")
    read_only = ToolAnnotations(
        read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
    )

    @server.tool(
        annotations=read_only,
        description=(
            "Search memd's memory of earlier coding sessions in this project: the MEMORY.md handbook (build/test "
            "commands, user preferences, pitfalls, recent tasks), skills and per-session trace memories. Use it "
            "before re-discovering how this repository is built, tested or configured, or to recall what was tried "
            "before. Returns hits with path, line range, heading, snippet, session ids and dates."
        ),
    )
    def memory_search(
        query: Annotated[str, Field(description="words to look for (file names, commands, errors, topics)")],
        project: Annotated[str | None, Field(description="a path in the project (default: this session's)")] = None,
        kinds: Annotated[list[Kind] | None, Field(description="restrict to memory, skill and/or trace")] = None,
        limit: Annotated[int, Field(ge=1, le=MAX_LIMIT, description="hits per page")] = 5,
        cursor: Annotated[str | None, Field(description="next_cursor of an earlier answer")] = None,
    ) -> SearchResult:
        return reader.search(query, project, kinds, limit, cursor)

    @server.tool(
        annotations=read_only,
        description=(
            "Read one file of memd's memory for this project, paged: MEMORY.md, memory_summary.md, "
            "trace_summaries/<file>.md or skills/<name>/SKILL.md (paths as memory_search or memory_list give them)."
        ),
    )
    def memory_read(
        path: Annotated[str, Field(description="path relative to the memory root, e.g. MEMORY.md")],
        project: Annotated[str | None, Field(description="a path in the project (default: this session's)")] = None,
        line_offset: Annotated[int, Field(ge=1, description="first line to return (1-based)")] = 1,
        max_lines: Annotated[int, Field(ge=1, le=MAX_LINES, description="lines to return")] = 200,
    ) -> ReadResult:
        return reader.read(path, project, line_offset, max_lines)

    @server.tool(
        annotations=read_only,
        description="List the files of memd's memory for this project (handbook, summary, skills, trace memories).",
    )
    def memory_list(
        project: Annotated[str | None, Field(description="a path in the project (default: this session's)")] = None,
        path: Annotated[str | None, Field(description="a folder inside the memory root, e.g. trace_summaries")] = None,
    ) -> ListResult:
        return reader.list(project, path)

    @server.resource(
        "memd://summary",
        name="memory_summary",
        mime_type="text/markdown",
        description="memd's routing map of this project's past sessions (memory_summary.md)",
    )
    def summary_resource() -> str:
        return reader.resource("memory_summary.md")

    @server.resource(
        "memd://memory",
        name="memory",
        mime_type="text/markdown",
        description="memd's handbook of this project (MEMORY.md)",
    )
    def memory_resource() -> str:
        return reader.resource("MEMORY.md")

    return server


def serve(settings: ContextSettings) -> int:
    """Run the server on stdio until the client closes it. Returns the exit code (0)."""
    import logging

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    server = build_server(MemoryReader(settings))
    server.run("stdio")
    return 0
