"""Keeping the read path's data current (SPEC §18): the search index follows the memory files,
and the memory-use ledger follows the transcripts that used memory.

Both are wired by :mod:`memd.daemon`: :class:`UsageRecorder` watches every rollout an extraction
parses, :class:`SearchRefresher` re-indexes the projects whose memory files an extraction or a
consolidation changed. Neither can fail the work it follows: an error is one warning, and a stale
index is served until the next refresh (the MCP server also refreshes on demand).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from pathlib import Path

import structlog

from memd.memory.files import project_root
from memd.read.usage import CITATION_OPEN, READ_TOOL, SEARCH_TOOL, citation_uses, tool_uses
from memd.rollout.records import AssistantMessage, Item, ToolCall
from memd.store.records import ThreadRecord
from memd.store.search import SearchIndex

log = structlog.get_logger(__name__)


class UsageRecorder:
    """Records the memd memory a session used (memd MCP calls, Codex citations), idempotently.

    Args:
        db_path: the state database (the ledger lives beside the search index).
        memory_dir: the configured ``memory_dir``.
    """

    def __init__(self, db_path: Path, memory_dir: Path) -> None:
        self._db_path = db_path
        self._memory_dir = memory_dir

    def wants(self, item: Item) -> bool:
        """Whether ``item`` may show a use: a call of memd's search / read tools (its output is the
        evidence) or an assistant message with a citation block."""
        if isinstance(item, ToolCall):
            return item.name in (SEARCH_TOOL, READ_TOOL)
        return isinstance(item, AssistantMessage) and CITATION_OPEN in item.text

    def __call__(self, thread: ThreadRecord, items: Sequence[Item]) -> None:
        """Record the uses found in ``items`` (the items of ``thread``'s rollout that :meth:`wants`
        took, and the outputs of those calls, in file order). Blocking; never raises."""
        events = tool_uses(items, thread_id=thread.id, default_ts=thread.updated_at)
        events += citation_uses(
            items,
            thread_id=thread.id,
            memory_dir=self._memory_dir,
            project_root=project_root(self._memory_dir, thread.project),
            project=thread.project,
            default_ts=thread.updated_at,
        )
        if not events:
            return
        try:
            index = SearchIndex.open(self._db_path)
            if index is None:
                return
            try:
                new = index.record_uses(events)
            finally:
                index.close()
        except Exception as exc:  # the usage signal must never fail an extraction
            log.warning("usage_record_failed", thread_id=thread.id, error=str(exc))
            return
        log.info("memory_used", thread_id=thread.id, uses=len(events), new=new)


def _nothing_to_redact(text: str) -> bool:
    from memd.extract.redact import redact

    return redact(text)[1] == 0


class SearchRefresher:
    """Re-indexes the memory files of the projects marked since the last refresh.

    Args:
        db_path: the state database holding the index.
        memory_dir: the configured ``memory_dir``.
    """

    def __init__(self, db_path: Path, memory_dir: Path) -> None:
        self._db_path = db_path
        self._memory_dir = memory_dir
        self._dirty: set[str] = set()

    def mark(self, projects: str | Iterable[str] | None) -> None:
        """Note that these projects' memory files changed (``None`` is ignored)."""
        if projects is None:
            return
        self._dirty.update([projects] if isinstance(projects, str) else projects)

    async def refresh(self) -> None:
        """Bring the index in line with the marked projects' files (a few ``stat`` calls each).

        A project whose refresh failed, or was cancelled, stays marked for the next call. Raises only
        ``CancelledError``.
        """
        projects, self._dirty = self._dirty, set()
        if not projects:
            return
        try:
            left = await asyncio.to_thread(self._refresh, frozenset(projects))
        except BaseException:  # cancelled: the worker may not have finished; refresh them all again
            self._dirty |= projects
            raise
        self._dirty |= left

    def _refresh(self, projects: frozenset[str]) -> set[str]:
        """Refresh ``projects`` in order; return those not refreshed (an error stops the pass)."""
        left = set(projects)
        try:
            # Each new file version is checked against the redactor once, so `memd context` need not load it.
            index = SearchIndex.open(self._db_path, is_clean=_nothing_to_redact)
            if index is None:
                return set()  # no database or an older schema: the daemon migrates it, then marks again
            try:
                for project in sorted(projects):
                    report = index.refresh(project, project_root(self._memory_dir, project), full=True)
                    left.discard(project)
                    if report.indexed or report.removed:
                        log.debug("search_indexed", project=project, indexed=report.indexed, removed=report.removed)
            finally:
                index.close()
        except Exception as exc:  # a stale index is served until the next refresh; MCP refreshes on demand
            log.warning("search_index_failed", error=str(exc), retried=len(left))
        return left
