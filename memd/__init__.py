"""memd: a background daemon that gives coding agents a memory.

It watches Codex rollout files (JSONL session transcripts), extracts a trace memory of every
finished session, and consolidates each project's trace memories into ``MEMORY.md``,
``memory_summary.md`` and ``skills/``.
"""

__version__ = "0.1.0"
