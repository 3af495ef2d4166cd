"""``memd mcp`` (SPEC §18): read-only tools over the SDK's client, in process and over stdio."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters

from memd.read.context import load_context_settings
from memd.read.mcp import READ_MAX_BYTES, SEARCH_MAX_BYTES, MemoryReader, build_server
from tests.builders import make_memory

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = (tmp_path / "app").resolve()
    (path / ".git").mkdir(parents=True)
    return path


@pytest.fixture
def memory(project: Path) -> Path:
    settings = load_context_settings()
    root = make_memory(settings.memory_dir, str(project), bullets=60)
    (root / "trace_summaries" / "019b7f94-51b4-7593-922e-ba12b5b73b52_pause.md").write_text(
        "thread_id: 019b7f94-51b4-7593-922e-ba12b5b73b52\nupdated_at: 2026-01-02T18:39:45Z\n\n"
        "# Add a pause button\n## Task: Add a pause button\nOutcome: partial\n"
        "Things that did not work: `npm test` fails with `jest: not found`; `npx jest` works.\n"
        "token = sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD\n"
    )
    return root


def reader(project: Path, **env: str) -> MemoryReader:
    return MemoryReader(load_context_settings(), environ={**os.environ, **env}, cwd=str(project))


def structured(result: Any) -> dict[str, Any]:
    assert result.is_error is False, result.content
    return result.structured_content  # type: ignore[no-any-return]


async def test_tools_are_read_only_with_output_schemas_and_plain_descriptions(project: Path, memory: Path) -> None:
    async with Client(build_server(reader(project))) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == {"memory_search", "memory_read", "memory_list"}
        for tool in tools.values():
            assert tool.annotations is not None and tool.annotations.read_only_hint is True
            assert tool.output_schema and tool.output_schema["type"] == "object"
            assert "memory" in (tool.description or "")
        assert tools["memory_search"].input_schema["properties"]["limit"]["maximum"] == 20
        resources = {str(r.uri) for r in (await client.list_resources()).resources}
        assert resources == {"memd://summary", "memd://memory"}


async def test_search_returns_hits_with_provenance_and_pages(project: Path, memory: Path) -> None:
    async with Client(build_server(reader(project))) as client:
        answer = structured(await client.call_tool("memory_search", {"query": "npx jest"}))
        assert answer["project"] == str(project) and answer["memory_root"] == str(memory)
        top = answer["hits"][0]
        assert {"path", "line_start", "line_end", "heading", "snippet", "session_ids", "date"} <= set(top)
        paths = {h["path"] for h in answer["hits"]}
        assert "MEMORY.md" in paths and "trace_summaries/019b7f94-51b4-7593-922e-ba12b5b73b52_pause.md" in paths
        page1 = structured(await client.call_tool("memory_search", {"query": "filler fact", "limit": 20}))
        assert len(json.dumps(page1["hits"])) <= SEARCH_MAX_BYTES and page1["next_cursor"]
        page2 = structured(
            await client.call_tool(
                "memory_search", {"query": "filler fact", "limit": 20, "cursor": page1["next_cursor"]}
            )
        )
        first = {(h["path"], h["line_start"]) for h in page1["hits"]}
        assert page2["hits"] and not first & {(h["path"], h["line_start"]) for h in page2["hits"]}
        only = structured(await client.call_tool("memory_search", {"query": "jest", "kinds": ["trace"]}))
        assert {h["kind"] for h in only["hits"]} == {"trace"}


async def test_what_the_server_returns_is_redacted(project: Path, memory: Path) -> None:
    async with Client(build_server(reader(project))) as client:
        hit = structured(await client.call_tool("memory_search", {"query": "token"}))["hits"][0]
        read = structured(await client.call_tool("memory_read", {"path": hit["path"]}))
    assert "sk-proj-abcdefghijkl" not in hit["snippet"] + read["text"] and "[REDACTED_SECRET]" in read["text"]


@pytest.mark.parametrize("query", ['"jest', "jest*", "NEAR(npx jest)", "-jest", "jest AND OR", "***"])
async def test_fts5_syntax_in_a_query_is_answered_not_an_error(project: Path, memory: Path, query: str) -> None:
    async with Client(build_server(reader(project))) as client:
        answer = structured(await client.call_tool("memory_search", {"query": query}))
    assert answer["hits"] or answer["note"] == "the query holds no searchable word"


async def test_read_is_paged_and_bounded(project: Path, memory: Path) -> None:
    async with Client(build_server(reader(project))) as client:
        first = structured(await client.call_tool("memory_read", {"path": "MEMORY.md", "max_lines": 10}))
        assert first["lines_returned"] == 10 and first["truncated"] and first["next_offset"] == 11
        rest = structured(await client.call_tool("memory_read", {"path": "MEMORY.md", "line_offset": 11}))
        assert rest["line_offset"] == 11 and rest["total_lines"] == first["total_lines"]
        (memory / "MEMORY.md").write_text("- " + "x" * 100 + "\n" + ("- long line " * 40 + "\n") * 200)
        big = structured(await client.call_tool("memory_read", {"path": "MEMORY.md", "max_lines": 400}))
        assert len(big["text"].encode()) <= READ_MAX_BYTES and big["truncated"]


@pytest.mark.parametrize(
    "path", ["../PROJECT", "../../other/memory/MEMORY.md", "/etc/passwd", "trace_summaries/../../x", "", "a\x00b"]
)
async def test_a_path_outside_the_memory_root_is_refused(project: Path, memory: Path, path: str) -> None:
    async with Client(build_server(reader(project))) as client:
        result = await client.call_tool("memory_read", {"path": path})
    assert result.is_error and "memory root" in result.content[0].text  # type: ignore[union-attr]


async def test_a_symlink_out_of_the_root_is_refused(project: Path, memory: Path, tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("do not read")
    (memory / "skills").mkdir()
    (memory / "skills" / "evil").symlink_to(tmp_path)
    async with Client(build_server(reader(project))) as client:
        result = await client.call_tool("memory_read", {"path": "skills/evil/secret.txt"})
    assert result.is_error and "leaves the memory root" in result.content[0].text  # type: ignore[union-attr]


async def test_list_and_resources(project: Path, memory: Path) -> None:
    async with Client(build_server(reader(project))) as client:
        listed = structured(await client.call_tool("memory_list", {}))
        assert [f["path"] for f in listed["files"]] == [
            "MEMORY.md",
            "memory_summary.md",
            "trace_summaries/019b7f94-51b4-7593-922e-ba12b5b73b52_pause.md",
        ]
        traces = structured(await client.call_tool("memory_list", {"path": "trace_summaries"}))
        assert [f["kind"] for f in traces["files"]] == ["trace"]
        summary = await client.read_resource("memd://summary")
        assert "Add a pause button" in summary.contents[0].text  # type: ignore[union-attr]


async def test_project_comes_from_the_argument_then_claude_project_dir_then_cwd(
    project: Path, memory: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (project / "sub").mkdir()
    async with Client(build_server(reader(elsewhere, CLAUDE_PROJECT_DIR=str(project / "sub")))) as client:
        assert structured(await client.call_tool("memory_list", {}))["project"] == str(project)
        other = structured(await client.call_tool("memory_list", {"project": str(elsewhere)}))
    assert other["project"] == str(elsewhere) and other["files"] == [] and "no memory" in other["note"]


async def test_an_empty_memory_and_a_root_deleted_while_serving_are_clear_answers(
    project: Path, memory: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    async with Client(build_server(reader(project))) as client:
        assert structured(await client.call_tool("memory_search", {"query": "jest"}))["hits"]
        answer = structured(await client.call_tool("memory_search", {"query": "jest", "project": str(empty)}))
        assert answer["hits"] == [] and "no memory" in answer["note"]
        shutil.rmtree(memory)
        answer = structured(await client.call_tool("memory_search", {"query": "jest"}))
        assert answer["hits"] == [] and "no memory" in answer["note"]
        result = await client.call_tool("memory_read", {"path": "MEMORY.md"})
        assert result.is_error and "no memory" in result.content[0].text  # type: ignore[union-attr]
        memory.mkdir(parents=True)
        answer = structured(await client.call_tool("memory_search", {"query": "jest"}))
        assert answer["hits"] == [] and answer["note"] == "no match"  # stale chunks are gone too


async def test_over_stdio_with_the_sdk_client(project: Path, memory: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k in ("HOME", "PATH", "XDG_DATA_HOME", "XDG_STATE_HOME")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    params = StdioServerParameters(
        command=sys.executable,
        args=[
            "-c",
            "from memd.read.context import load_context_settings as l; from memd.read.mcp import serve; serve(l())",
        ],
        env=env,
        cwd=str(project),
    )
    async with Client(params) as client:
        answer = structured(await client.call_tool("memory_search", {"query": "pause button"}))
    assert answer["project"] == str(project)
    assert "Task: Add a pause button" in {h["heading"] for h in answer["hits"]}
