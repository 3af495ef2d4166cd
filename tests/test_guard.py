"""The feedback-loop guard (SPEC §18): memd's own context block is stripped from any text."""

from __future__ import annotations

import pytest

from memd.rollout.guard import has_memd_context, is_only_memd_context, strip_memd_context

BLOCK = (
    '<memd-context project="/home/me/app" generated="2026-11-29T07:00:00Z">\n'
    "# Memory of /home/me/app\n"
    "## Recent tasks\n"
    "- 2026-11-20 add a Pause/Resume feature — success\n"
    "</memd-context>"
)


def test_text_without_a_block_is_returned_unchanged() -> None:
    text = "  fix the failing test in api/  \n"
    assert strip_memd_context(text) is text
    assert not has_memd_context(text)


def test_a_message_that_is_only_injected_memory_becomes_empty() -> None:
    assert strip_memd_context(BLOCK) == ""
    assert strip_memd_context("\n\n" + BLOCK + "\n\n") == ""
    assert is_only_memd_context(BLOCK + "\n" + BLOCK)


def test_the_users_own_request_around_a_block_survives() -> None:
    text = "please continue\n" + BLOCK + "\nand add a test for pause"
    out = strip_memd_context(text)
    assert out == "please continue\nand add a test for pause"
    assert "Pause/Resume" not in out
    assert not is_only_memd_context(text)


def test_every_block_goes_and_attributes_do_not_matter() -> None:
    text = "<memd-context>one</memd-context> keep <memd-context a='1'\n b=\"2\">two\nlines</memd-context>"
    assert strip_memd_context(text) == "keep"


def test_an_unclosed_block_runs_to_the_end_of_the_text() -> None:
    # A tool output cut by head+tail capping, or a transcript torn mid-block.
    text = "$ memd context\n" + BLOCK[:60]
    assert strip_memd_context(text) == "$ memd context"


def test_a_stray_closing_tag_is_dropped() -> None:
    assert strip_memd_context("tail of memory</memd-context>\nreal text") == "tail of memoryreal text"


@pytest.mark.parametrize("text", ["<memd-contextual>", "a <memd_context> b", "memd-context is a word"])
def test_similar_names_are_not_the_sentinel(text: str) -> None:
    assert strip_memd_context(text) == text
